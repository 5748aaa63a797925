//! Tests for Source's Adam variant (adam.rs).
//! Layer: attribution (tests) — may import every floor from the ground up to curvature; uses its
//! parent adam.rs, attribution's dense.rs and linalg's test_support.rs.
//!
//! Tests of Source's Adam variant against dense linear algebra and its exact limits, and of
//! P_eff (Adam's update's response to the gradient) against finite differences.

use candle_core::{Device, Tensor};

use super::*;
use crate::attribution::DenseCurvature;
use crate::linalg::test_support::{max_abs_diff, random_factors};
use crate::linalg::{eigenbasis_diagonal, ekfac_diagonal, LayerFactors};

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn ekfac_diagonal_is_the_diagonal_of_the_kronecker_curvature() {
    let f = random_factors("l", (6, 5, 4, 3), Some(3));
    let d: Vec<Vec<f32>> = ekfac_diagonal(&f).unwrap().to_vec2().unwrap();
    let qs: Vec<Vec<f32>> = f.basis.q_s.to_dense().unwrap().to_vec2().unwrap();
    let qa: Vec<Vec<f32>> = f.basis.q_a.to_dense().unwrap().to_vec2().unwrap();
    let lam: Vec<Vec<f64>> = f.lambda.to_vec2().unwrap();
    for o in 0..3 {
        for i in 0..4 {
            // H[(o,i),(o,i)] = Σ_{p,j} Q_S[o,p]² Q_A[i,j]² Λ[p,j]
            let mut want = 0f64;
            for (p, row) in lam.iter().enumerate() {
                for (j, l) in row.iter().enumerate() {
                    want += (qs[o][p] as f64).powi(2) * (qa[i][j] as f64).powi(2) * l;
                }
            }
            assert!((d[o][i] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-6));
        }
    }
}

#[test]
fn eigenbasis_diagonal_is_the_diagonal_of_the_rotated_preconditioner() {
    let f = random_factors("l", (6, 5, 4, 3), Some(3));
    let p = Tensor::rand(0.5f32, 2.0, (3, 4), &Device::Cpu).unwrap();
    let got: Vec<Vec<f32>> = eigenbasis_diagonal(&f.basis, &p)
        .unwrap()
        .to_vec2()
        .unwrap();
    let qs: Vec<Vec<f32>> = f.basis.q_s.to_dense().unwrap().to_vec2().unwrap();
    let qa: Vec<Vec<f32>> = f.basis.q_a.to_dense().unwrap().to_vec2().unwrap();
    let pv: Vec<Vec<f32>> = p.to_vec2().unwrap();
    for i in 0..3 {
        for j in 0..4 {
            // (Qᵀ diag(p) Q)[(i,j),(i,j)] = Σ_{o,k} Q_S[o,i]² Q_A[k,j]² p[o,k]
            let mut want = 0f64;
            for o in 0..3 {
                for k in 0..4 {
                    want += (qs[o][i] as f64 * qa[k][j] as f64).powi(2) * pv[o][k] as f64;
                }
            }
            assert!((got[i][j] as f64 - want).abs() <= 1e-5 * want, "{i},{j}");
        }
    }
}

/// The dense H̄ = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ that EK-FAC factors stand for.
fn dense_of(f: &LayerFactors) -> DenseCurvature {
    let (dout, din) = f.lambda.dims2().unwrap();
    let qs: Vec<Vec<f32>> = f.basis.q_s.to_dense().unwrap().to_vec2().unwrap();
    let qa: Vec<Vec<f32>> = f.basis.q_a.to_dense().unwrap().to_vec2().unwrap();
    let lv: Vec<Vec<f64>> = f.lambda.to_vec2().unwrap();
    let n = dout * din;
    let k = |row: usize, col: usize| -> f64 {
        qs[row / din][col / din] as f64 * qa[row % din][col % din] as f64
    };
    let mut h = vec![0f64; n * n];
    for r in 0..n {
        for c in 0..n {
            h[r * n + c] = (0..n)
                .map(|e| k(r, e) * lv[e / din][e % din] * k(c, e))
                .sum();
        }
    }
    DenseCurvature::new(&Tensor::from_vec(h, (n, n), &Device::Cpu).unwrap()).unwrap()
}

/// The EK-FAC path and an f64 dense eigendecomposition of the same H̄ agree, for the
/// propagation and the injection of the Adam variant.
#[test]
fn ekfac_adam_variant_equals_the_dense_one() {
    let f = random_factors("l", (6, 5, 4, 3), None);
    let dense = dense_of(&f);
    let dev = Device::Cpu;
    let p = Tensor::rand(0.2f32, 3.0, (3, 4), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
    let flat = |t: &Tensor| t.reshape((2, 1, 12)).unwrap();
    let factors = vec![f];
    let ek = AdamCurvature {
        inner: &factors,
        p_bar: vec![p.clone()],
    };
    let de = AdamCurvature {
        inner: &dense,
        p_bar: vec![p.reshape((1, 12)).unwrap()],
    };
    for fun in [
        SpectralFn::Propagate { s: 0.7 },
        SpectralFn::Inject { s: 0.7 },
    ] {
        let a = ek.apply(std::slice::from_ref(&v), fun).unwrap();
        let b = de.apply(&[flat(&v)], fun).unwrap();
        let scale = max_abs(&b[0]);
        assert!(
            max_abs_diff(&flat(&a[0]), &b[0]) <= 1e-4 * scale,
            "{fun:?}: {} vs scale {scale}",
            max_abs_diff(&flat(&a[0]), &b[0])
        );
    }
}

/// Exact limits: with P = c I the variant is the SGD form at mass c s; for s σ ≪ 1 the
/// injection is s P v (Adam's preconditioned gradient); p = 0 propagates unchanged.
#[test]
fn limits_of_the_adam_variant() {
    let dev = Device::Cpu;
    let f = vec![random_factors("l", (6, 5, 4, 3), Some(2))];
    let v = vec![Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap()];
    let c = 2.5;
    let uniform = AdamCurvature {
        inner: &f,
        p_bar: vec![(Tensor::ones((3, 4), DType::F32, &dev).unwrap() * c).unwrap()],
    };
    for s in [1e-3, 0.4, 30.0] {
        for (adam, sgd) in [
            (
                SpectralFn::Propagate { s },
                SpectralFn::Propagate { s: s * c },
            ),
            (SpectralFn::Inject { s }, SpectralFn::Inject { s: s * c }),
        ] {
            let a = uniform.apply(&v, adam).unwrap();
            let b = f.apply(&v, sgd).unwrap();
            let scale = max_abs(&b[0]);
            assert!(max_abs_diff(&a[0], &b[0]) <= 1e-5 * scale, "{adam:?}");
        }
    }
    // Non-uniform P, s σ ≪ 1: u = s P v.
    let p = Tensor::rand(0.1f32, 4.0, (3, 4), &dev).unwrap();
    let adam = AdamCurvature {
        inner: &f,
        p_bar: vec![p.clone()],
    };
    let s = 1e-9; // s σ p ≲ 1e-6 for the random factors' Λ (up to ~10²)
    let u = adam.apply(&v, SpectralFn::Inject { s }).unwrap();
    let want = (v[0].broadcast_mul(&p).unwrap() * s).unwrap();
    assert!(max_abs_diff(&u[0], &want) <= 1e-5 * max_abs(&want));
    let zero = AdamCurvature {
        inner: &f,
        p_bar: vec![Tensor::zeros((3, 4), DType::F32, &dev).unwrap()],
    };
    let out = zero.apply(&v, SpectralFn::Propagate { s: 5.0 }).unwrap();
    assert!(max_abs_diff(&out[0], &v[0]) <= 1e-6 * max_abs(&v[0]));
    // A preconditioner of the wrong shape is an error, not a panic.
    let bad = AdamCurvature {
        inner: &f,
        p_bar: vec![Tensor::zeros((4, 3), DType::F32, &dev).unwrap()],
    };
    assert!(bad.apply(&v, SpectralFn::Inject { s: 1.0 }).is_err());
}

#[test]
fn phi_limits() {
    assert_eq!(phi(0.0), 1.0);
    assert_eq!(phi(-3.0), 1.0);
    assert!((phi(1e-12) - 1.0).abs() < 1e-12);
    assert!((phi(2.0) - (1.0 - (-2.0f64).exp()) / 2.0).abs() < 1e-15);
    assert!((phi(1e8) - 1e-8).abs() < 1e-20);
}

/// Adam's update u_t = m̂_t / (√v̂_t + ε) after t steps with gradients `gs[k] + delta` (the
/// same δ at every step), in f64 from the textbook recursion.
fn adam_update(gs: &[Vec<f64>], delta: &[f64], b1: f64, b2: f64, eps: f64) -> Vec<f64> {
    let n = delta.len();
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    for g in gs {
        for i in 0..n {
            let g = g[i] + delta[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        }
    }
    let t = gs.len() as i32;
    (0..n)
        .map(|i| {
            let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
            mh / (vh.sqrt() + eps)
        })
        .collect()
}

/// m̂_t and v̂_t (bias-corrected) after the steps `gs`, as f32 tensors.
fn adam_moments(gs: &[Vec<f64>], b1: f64, b2: f64) -> (Tensor, Tensor) {
    let n = gs[0].len();
    let t = gs.len() as i32;
    let (mut m, mut v) = (vec![0.0f64; n], vec![0.0f64; n]);
    for g in gs {
        for i in 0..n {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        }
    }
    let f = |x: Vec<f64>, bc: f64| {
        let x: Vec<f32> = x.iter().map(|x| (x / bc) as f32).collect();
        Tensor::new(x.as_slice(), &Device::Cpu).unwrap()
    };
    (f(m, 1.0 - b1.powi(t)), f(v, 1.0 - b2.powi(t)))
}

#[test]
fn p_eff_is_the_finite_difference_of_adams_update_in_the_gradient() {
    // Independent truth: central differences of the textbook update u_t in a gradient
    // perturbation δ e_i shared by every step (Source's stationarity assumption). The
    // response formula is exact after one step (m̂ = g, v̂ = g²: the sign-like first step),
    // for constant gradients, and for any history when β₁ = β₂ (v̂'s weights equal m̂'s).
    let eps = 1e-3; // large, so that the ε terms matter
    let g1 = vec![0.02, -0.5, 1.3, -0.004, 0.0007];
    let varied: Vec<Vec<f64>> = (0..4)
        .map(|k| {
            g1.iter()
                .map(|g| g * (1.0 + 0.4 * k as f64) - 0.1 * k as f64)
                .collect()
        })
        .collect();
    let cases: [(&str, Vec<Vec<f64>>, f64, f64); 3] = [
        ("first step", vec![g1.clone()], 0.9, 0.999),
        ("constant gradients", vec![g1.clone(); 4], 0.9, 0.999),
        ("β₁ = β₂, varied gradients", varied, 0.8, 0.8),
    ];
    for (what, gs, b1, b2) in cases {
        let (m_hat, v_hat) = adam_moments(&gs, b1, b2);
        let p: Vec<f32> = adam_p_eff(&v_hat, None, eps).unwrap().to_vec1().unwrap();
        let got: Vec<f32> = adam_p_eff(&v_hat, Some(&m_hat), eps)
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = g1.len();
        for i in 0..n {
            let h = 1e-6 * gs.iter().map(|g| g[i].abs()).fold(1e-3, f64::max);
            let mut d = vec![0.0; n];
            d[i] = h;
            let up = adam_update(&gs, &d, b1, b2, eps);
            d[i] = -h;
            let down = adam_update(&gs, &d, b1, b2, eps);
            let fd = (up[i] - down[i]) / (2.0 * h);
            // Relative to P: the fixed-v̂ answer the response reduces.
            let err = (got[i] as f64 - fd).abs();
            assert!(
                err <= 1e-4 * p[i] as f64,
                "{what}, entry {i}: P_eff {} vs finite difference {fd} (P {})",
                got[i],
                p[i]
            );
        }
    }
    // The first step is sign-like: its response is ε/(|g| + ε) of P, nearly nothing.
    let (m_hat, v_hat) = adam_moments(std::slice::from_ref(&g1), 0.9, 0.999);
    let ratio = (adam_p_eff(&v_hat, Some(&m_hat), eps).unwrap()
        / adam_p_eff(&v_hat, None, eps).unwrap())
    .unwrap();
    let r: Vec<f32> = ratio.to_vec1().unwrap();
    assert!(r[2] < 1e-3 && r[1] < 3e-3, "{r:?}");
}

#[test]
fn p_eff_with_zero_first_moment_is_p_bit_for_bit() {
    // m̂ = 0 gives back v̂-held-fixed exactly, also where v̂ = 0 (no 0/0).
    let v = Tensor::new(&[0.0f32, 1e-12, 3e-7, 0.25, 4.0, 1e-30], &Device::Cpu).unwrap();
    let zero = v.zeros_like().unwrap();
    for eps in [1e-8, 1e-3] {
        let p: Vec<f32> = adam_p_eff(&v, None, eps).unwrap().to_vec1().unwrap();
        let q: Vec<f32> = adam_p_eff(&v, Some(&zero), eps).unwrap().to_vec1().unwrap();
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&q));
        // And P is the plain expression 1/(√v̂ + ε).
        let old: Vec<f32> = (v.sqrt().unwrap() + eps)
            .unwrap()
            .recip()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(bits(&p), bits(&old));
    }
    // |m̂| > √v̂ (possible when β₁ ≠ β₂) clamps to 0, never negative; shapes must agree.
    let m = Tensor::new(&[0.0f32, 1e-5, 1.0, 1.0, -3.0, 0.0], &Device::Cpu).unwrap();
    let pe: Vec<f32> = adam_p_eff(&v, Some(&m), 1e-8).unwrap().to_vec1().unwrap();
    assert!(pe.iter().all(|x| x.is_finite() && *x >= 0.0), "{pe:?}");
    assert_eq!(pe[2], 0.0);
    let short = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
    assert!(adam_p_eff(&v, Some(&short), 1e-8).is_err());
}
