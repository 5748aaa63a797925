//! Finite-difference check of the loss gradient on tiny random models.
//!
//! The model runs in f32, so the check is a central difference of the summed batch loss
//! along a random unit direction per parameter tensor, with step h = 1e-2. Rounding error
//! in the difference is about ε_f32 · |L| / h ≈ 1e-5 · 50 / 1e-2 ≈ 5e-4 (absolute) and the
//! truncation error O(h²); measured errors stay below 5e-4; the tolerance is 1% of the directional
//! derivative + 1.5e-3 (the smallest derivatives checked are ≈ 0.03).

use crate::common::model_fixtures as fixtures;

use candle_core::{Device, Tensor};
use fixtures::*;
use source_tda::model::{LoadOptions, Model, TokenBatch, Tracking};

fn check(
    label: &str,
    config: serde_json::Value,
    tensors: std::collections::HashMap<String, Tensor>,
) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, &tensors);
    let opts = LoadOptions {
        tracking: Tracking::None,
        ..LoadOptions::default()
    };
    let model = Model::load(dir.path(), &opts, &Device::Cpu).unwrap();
    let mut rng = Rng::new(77);
    let docs = random_docs(&mut rng, &[7, 5], model.spec().vocab_size());
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let total = |m: &Model| -> f64 {
        m.doc_losses(&batch)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .sum()
    };
    let grads = model
        .loss_tensor(&batch)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let h = 1e-2;
    let mut checked = 0;
    for p in model.params() {
        let w0 = p.var.as_tensor().copy().unwrap();
        let dir = randn(&mut rng, w0.dims(), 0.0, 1.0);
        let dir = (&dir / frob_norm(&dir)).unwrap();
        let g = grads.get(p.var.as_tensor()).unwrap();
        let analytic = (g * &dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        p.var.set(&(&w0 + (&dir * h).unwrap()).unwrap()).unwrap();
        let plus = total(&model);
        p.var.set(&(&w0 - (&dir * h).unwrap()).unwrap()).unwrap();
        let minus = total(&model);
        p.var.set(&w0).unwrap();
        let fd = (plus - minus) / (2.0 * h);
        let tol = 0.01 * analytic.abs() + 1.5e-3;
        assert!(
            (fd - analytic).abs() <= tol,
            "{label} {}: finite difference {fd} vs autograd {analytic}",
            p.name
        );
        checked += 1;
    }
    assert_eq!(checked, tensors.len());
}

fn frob_norm(t: &Tensor) -> f64 {
    (t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64)
        .sqrt()
}

#[test]
fn llama_loss_gradient_matches_finite_differences() {
    let cfg = LlamaCfg {
        model_type: "qwen2",
        mlp_bias: true,
        hidden: 16,
        inter: 24,
        vocab: 29,
        heads: 4,
        kv_heads: 2,
        ..LlamaCfg::default()
    };
    check("qwen2", cfg.config_json(), cfg.tensors(61));
    let tied = LlamaCfg {
        tied: true,
        hidden: 16,
        inter: 24,
        vocab: 29,
        ..LlamaCfg::default()
    };
    check("llama-tied", tied.config_json(), tied.tensors(62));
}

#[test]
fn gpt2_loss_gradient_matches_finite_differences() {
    let cfg = Gpt2Cfg {
        n_embd: 16,
        vocab: 29,
        n_positions: 16,
        ..Gpt2Cfg::default()
    };
    check("gpt2", cfg.config_json(), cfg.tensors(63));
}
