//! Optimizers against hand-computed textbook updates in f64, Adam state round trips, and
//! gradient clipping.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use source_tda::model::Param;
use source_tda::train::checkpoint::{read_safetensors, write_safetensors};
use source_tda::train::optim::{clip_global_norm, global_norm};
use source_tda::train::{Optimizer, OptimizerInfo};

fn param(name: &str, v: &[f32]) -> Param {
    Param {
        name: name.into(),
        var: Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap(),
        transposed_from_checkpoint: false,
    }
}

fn values(p: &Param) -> Vec<f32> {
    p.var.as_tensor().to_vec1::<f32>().unwrap()
}

/// Quadratic J(x) = ½ Σ a_i x_i²: gradient a ⊙ x.
fn quad_grad(a: &[f64], p: &Param) -> Tensor {
    let g: Vec<f32> = values(p)
        .iter()
        .zip(a)
        .map(|(x, a)| (*x as f64 * a) as f32)
        .collect();
    Tensor::new(g.as_slice(), &Device::Cpu).unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= tol * w.abs().max(1e-3),
            "{what}[{i}]: got {g}, want {w} (error {err:e})"
        );
    }
}

#[test]
fn adamw_matches_the_textbook_update_on_a_quadratic() {
    let (b1, b2, eps, wd) = (0.9, 0.99, 1e-8, 0.1);
    let a = [1.0, 4.0, 0.25];
    let x0 = [1.0f32, -0.5, 2.0];
    let p = param("x", &x0);
    let info = OptimizerInfo::AdamW {
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    };
    let mut opt = Optimizer::new(info, 1).unwrap();
    // The textbook AdamW in f64.
    let mut x: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
    let lrs = [0.1, 0.05, 0.02];
    for (t, &lr) in lrs.iter().enumerate() {
        let t = t as i32 + 1;
        let g: Vec<f64> = x.iter().zip(&a).map(|(x, a)| x * a).collect();
        for i in 0..3 {
            x[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            x[i] -= lr * mh / (vh.sqrt() + eps);
        }
        let grad = quad_grad(&a, &p);
        opt.step(std::slice::from_ref(&p), &[grad], lr).unwrap();
        assert_close(&values(&p), &x, 1e-5, &format!("x after step {t}"));
    }
    assert_eq!(opt.steps(), 3);
    // The attribution state is the bias-corrected v̂ and m̂.
    let state = opt.attribution_state(std::slice::from_ref(&p)).unwrap();
    assert_eq!(state.len(), 2);
    assert_eq!(state[0].0, "exp_avg_sq.x");
    let vh: Vec<f64> = v.iter().map(|v| v / (1.0 - b2.powi(3))).collect();
    assert_close(&state[0].1.to_vec1::<f32>().unwrap(), &vh, 1e-5, "v̂");
    assert_eq!(state[1].0, "exp_avg.x");
    let mh: Vec<f64> = m.iter().map(|m| m / (1.0 - b1.powi(3))).collect();
    assert_close(&state[1].1.to_vec1::<f32>().unwrap(), &mh, 1e-5, "m̂");
}

#[test]
fn sgd_and_momentum_match_hand_computed_steps() {
    let a = [2.0, 0.5];
    // SGD: x ← x − η a x, twice.
    let p = param("w", &[1.0, -1.0]);
    let mut opt = Optimizer::new(OptimizerInfo::Sgd { weight_decay: 0.0 }, 1).unwrap();
    for _ in 0..2 {
        let g = quad_grad(&a, &p);
        opt.step(std::slice::from_ref(&p), &[g], 0.1).unwrap();
    }
    assert_close(&values(&p), &[0.64, -0.9025], 1e-6, "sgd");
    assert!(opt
        .attribution_state(std::slice::from_ref(&p))
        .unwrap()
        .is_empty());

    // Momentum β = 0.5: b₁ = g₁, x₁ = x₀ − η b₁; b₂ = β b₁ + g₂, x₂ = x₁ − η b₂.
    let p = param("w", &[1.0, -1.0]);
    let info = OptimizerInfo::Momentum {
        beta: 0.5,
        weight_decay: 0.0,
    };
    let mut opt = Optimizer::new(info, 1).unwrap();
    let (eta, beta) = (0.1, 0.5);
    let mut x = [1.0f64, -1.0];
    let mut b = [0.0f64; 2];
    for t in 0..2 {
        for i in 0..2 {
            let g = a[i] * x[i];
            b[i] = if t == 0 { g } else { beta * b[i] + g };
            x[i] -= eta * b[i];
        }
        let g = quad_grad(&a, &p);
        opt.step(std::slice::from_ref(&p), &[g], eta).unwrap();
    }
    assert_close(&values(&p), &x, 1e-6, "momentum");
    let st = opt.attribution_state(std::slice::from_ref(&p)).unwrap();
    assert_eq!(st[0].0, "momentum.w");
    assert_close(&st[0].1.to_vec1::<f32>().unwrap(), &b, 1e-6, "buffer");
}

#[test]
fn adam_state_round_trips_through_safetensors_bit_for_bit() {
    let a = [1.0, 3.0, 0.5, 2.0];
    let info = OptimizerInfo::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let p = param("layer.weight", &[0.3, -0.7, 1.1, 0.05]);
    let mut opt = Optimizer::new(info.clone(), 1).unwrap();
    for _ in 0..3 {
        let g = quad_grad(&a, &p);
        opt.step(std::slice::from_ref(&p), &[g], 0.01).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resume.safetensors");
    write_safetensors(
        &file,
        &opt.resume_state(std::slice::from_ref(&p)),
        HashMap::new(),
    )
    .unwrap();
    let loaded = read_safetensors(&file, &Device::Cpu).unwrap();
    assert_eq!(loaded.len(), 2, "exp_avg and exp_avg_sq");

    let q = param("layer.weight", &values(&p));
    let mut restored = Optimizer::new(info, 1).unwrap();
    restored
        .restore(std::slice::from_ref(&q), 3, loaded)
        .unwrap();
    for _ in 0..2 {
        let g = quad_grad(&a, &p);
        opt.step(std::slice::from_ref(&p), &[g], 0.01).unwrap();
        let g = quad_grad(&a, &q);
        restored.step(std::slice::from_ref(&q), &[g], 0.01).unwrap();
    }
    let bits = |p: &Param| values(p).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&p), bits(&q), "continued bitwise identically");

    // A missing tensor is an error that names it.
    let mut bad = Optimizer::new(opt.info().clone(), 1).unwrap();
    let e = bad
        .restore(std::slice::from_ref(&q), 3, HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("exp_avg.layer.weight"), "{e}");
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let mut g = vec![
        Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(),
        Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
    ];
    let before = clip_global_norm(&mut g, 1.0).unwrap();
    assert!((before - 5.0).abs() < 1e-9);
    assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    let mut small = vec![Tensor::new(&[0.3f32, 0.4], &Device::Cpu).unwrap()];
    clip_global_norm(&mut small, 1.0).unwrap();
    assert_eq!(
        small[0].to_vec1::<f32>().unwrap(),
        vec![0.3, 0.4],
        "untouched"
    );
}
