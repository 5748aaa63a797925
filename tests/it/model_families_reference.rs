//! Qwen3, Phi-3, Gemma 2 and Gemma 3 forwards equal candle-transformers' `models::qwen3`,
//! `models::phi3`, `models::gemma2` and `models::gemma3` on the same randomly initialised
//! weights (no download). candle's models return only the
//! last position's logits, so every prefix of every document is run through them and
//! compared with our logits at that position of a padded batch.

use crate::common::model_fixtures as fixtures;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::{gemma2, gemma3, phi3, qwen3};
use fixtures::*;
use serde_json::json;
use source_tda::model::{LoadOptions, Model, TokenBatch};

/// max |ours − reference| / max |reference| over every prefix of three documents, where
/// `reference(ids)` gives the reference's last-position logits [V] of a fresh model.
fn worst_relative(cfg: &LlamaCfg, seed: u64, reference: impl FnMut(&[u32]) -> Tensor) -> f32 {
    worst_relative_with(cfg, &cfg.config_json(), seed, reference)
}

/// [`worst_relative`] with our model built from `config` (and `cfg`'s tensors).
fn worst_relative_with(
    cfg: &LlamaCfg,
    config: &serde_json::Value,
    seed: u64,
    mut reference: impl FnMut(&[u32]) -> Tensor,
) -> f32 {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), config, &cfg.tensors(seed));
    let ours = Model::load(dir.path(), &LoadOptions::default(), &dev).unwrap();
    let mut rng = Rng::new(seed + 100);
    let docs = random_docs(&mut rng, &[9, 5, 12], cfg.vocab);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &dev).unwrap();
    let logits = ours.forward(&batch.input_ids).unwrap();
    assert!(max_abs(&logits) > 0.1, "logits are degenerate");
    let (mut diff, mut scale) = (0f32, 0f32);
    for (b, (ids, _)) in docs.iter().enumerate() {
        for len in 1..=ids.len() {
            let want = reference(&ids[..len]);
            diff = diff.max(max_abs_diff(&logits.i((b, len - 1)).unwrap(), &want));
            scale = scale.max(max_abs(&want));
        }
    }
    diff / scale
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Asserts that our logits equal the reference's to 1e-5 relative, `run(vb, ids)` giving the
/// reference's last-position logits of a model freshly built from the same tensors.
fn assert_parity(
    family: &str,
    cfg: &LlamaCfg,
    seed: u64,
    run: impl Fn(candle_nn::VarBuilder, &Tensor) -> candle_core::Result<Tensor>,
) {
    let tensors = cfg.tensors(seed);
    let worst = worst_relative(cfg, seed, |ids| {
        let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        run(vb, &ids_tensor(ids)).unwrap().flatten_all().unwrap()
    });
    assert!(
        worst <= 1e-5,
        "{family}: max relative |ours − candle-transformers| = {worst}"
    );
}

fn qwen3_parity(cfg: LlamaCfg, seed: u64) {
    let ref_cfg: qwen3::Config = serde_json::from_value(cfg.config_json()).unwrap();
    assert_parity("qwen3", &cfg, seed, |vb, ids| {
        qwen3::ModelForCausalLM::new(&ref_cfg, vb)?.forward(ids, 0)
    });
}

#[test]
fn qwen3_with_qk_norm_and_explicit_head_dim_matches_candle_transformers() {
    // head_dim 16 ≠ hidden / heads = 8, as in the Qwen3 checkpoints.
    qwen3_parity(
        LlamaCfg {
            model_type: "qwen3",
            head_dim: Some(16),
            ..LlamaCfg::default()
        },
        31,
    );
}

#[test]
fn qwen3_tied_matches_candle_transformers() {
    qwen3_parity(
        LlamaCfg {
            model_type: "qwen3",
            tied: true,
            kv_heads: 1,
            head_dim: Some(8),
            ..LlamaCfg::default()
        },
        32,
    );
}

#[test]
fn phi3_with_fused_projections_matches_candle_transformers() {
    let cfg = LlamaCfg {
        model_type: "phi3",
        ..LlamaCfg::default()
    };
    let ref_cfg: phi3::Config = serde_json::from_value(cfg.config_json()).unwrap();
    assert_parity("phi3", &cfg, 33, |vb, ids| {
        phi3::Model::new(&ref_cfg, vb)?.forward(ids, 0)
    });
}

#[test]
fn gemma2_with_soft_capping_and_sandwich_norms_matches_candle_transformers() {
    // Tied head (Gemma's default), GQA 2:1, head_dim 16 ≠ d / H.
    let cfg = LlamaCfg {
        model_type: "gemma2",
        tied: true,
        head_dim: Some(16),
        ..LlamaCfg::default()
    };
    let ref_cfg: gemma2::Config = serde_json::from_value(cfg.config_json()).unwrap();
    assert_parity("gemma2", &cfg, 35, |vb, ids| {
        gemma2::Model::new(false, &ref_cfg, vb)?.forward(ids, 0)
    });
}

/// worst_relative of our Gemma 3 (config.json edited by `ours`) against candle-transformers'
/// built from our config.json edited by `reference`.
fn gemma3_gap(
    cfg: &LlamaCfg,
    seed: u64,
    ours: &[(&str, serde_json::Value)],
    reference: &[(&str, serde_json::Value)],
) -> f32 {
    let edited = |edits: &[(&str, serde_json::Value)]| {
        let mut json = cfg.config_json();
        for (k, v) in edits {
            json[*k] = v.clone();
        }
        json
    };
    let mut ref_json = edited(reference);
    // candle-transformers masks key j for query i when j + window < i (window + 1 keys),
    // transformers (and we) when i − j ≥ window (window keys): the same mask at window − 1.
    ref_json["sliding_window"] = json!(ref_json["sliding_window"].as_u64().unwrap() - 1);
    let ref_cfg: gemma3::Config = serde_json::from_value(ref_json).unwrap();
    let tensors = cfg.tensors(seed);
    worst_relative_with(cfg, &edited(ours), seed, |ids| {
        let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        gemma3::Model::new(false, &ref_cfg, vb)
            .and_then(|mut m| m.forward(&ids_tensor(ids), 0))
            .unwrap()
            .flatten_all()
            .unwrap()
    })
}

#[test]
fn gemma3_sliding_and_global_layers_match_candle_transformers() {
    // q/k norms with weights 1 + w, tied head, head_dim ≠ d / H, no soft caps, the sliding
    // layers' RoPE base 1e4 and the global layers' 1e6, window 4 (shorter than the
    // documents). candle-transformers 0.11.1's Gemma 3 fails on a global layer (its plain KV
    // cache is handed a non-contiguous v), so each kind of layer is compared on its own:
    let cfg = LlamaCfg {
        model_type: "gemma3_text",
        tied: true,
        head_dim: Some(16),
        ..LlamaCfg::default()
    };
    // (1) every layer sliding (pattern 3 > 2 layers) on both sides;
    let every_sliding = [("sliding_window_pattern", json!(3))];
    let sliding = gemma3_gap(&cfg, 37, &every_sliding, &every_sliding);
    // (2) every layer global in ours (pattern 1) against the reference's sliding layers
    // given a window longer than any document and the global RoPE base.
    let global_ref = [
        ("sliding_window_pattern", json!(3)),
        ("sliding_window", json!(4096)),
        ("rope_local_base_freq", json!(1_000_000.0)),
    ];
    let global = gemma3_gap(
        &cfg,
        37,
        &[("sliding_window_pattern", json!(1))],
        &global_ref,
    );
    for (what, gap) in [("sliding layers", sliding), ("global layers", global)] {
        assert!(
            gap <= 1e-5,
            "gemma3 {what}: max relative |ours − candle| = {gap}"
        );
    }
    // The comparison sees each particular: a reference with the other RoPE base, or
    // without the window, differs.
    let wrong_base = [
        ("sliding_window_pattern", json!(3)),
        ("rope_local_base_freq", json!(1_000_000.0)),
    ];
    let no_window = [
        ("sliding_window_pattern", json!(3)),
        ("sliding_window", json!(4096)),
    ];
    for (what, reference) in [("RoPE base", &wrong_base[..]), ("window", &no_window[..])] {
        let gap = gemma3_gap(&cfg, 37, &every_sliding, reference);
        assert!(gap > 1e-3, "{what}: the reference should differ, gap {gap}");
    }
}

#[test]
fn gemma3_multimodal_checkpoints_are_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaCfg {
        model_type: "gemma3_text",
        tied: true,
        ..LlamaCfg::default()
    };
    let mut json = cfg.config_json();
    json["model_type"] = serde_json::json!("gemma3");
    write_checkpoint(dir.path(), &json, &cfg.tensors(38));
    let e = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemma3_text") && e.contains("multimodal"), "{e}");
}

#[test]
fn gemma2_soft_caps_bound_the_logits() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaCfg {
        model_type: "gemma2",
        tied: true,
        ..LlamaCfg::default()
    };
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(36));
    let m = Model::load(dir.path(), &LoadOptions::default(), &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7]], &dev).unwrap();
    let z = m.forward(&ids).unwrap();
    // |c·tanh(z/c)| < c = 3, and the cap bends (some |z| above 1).
    assert!(max_abs(&z) < 3.0 && max_abs(&z) > 1.0, "{}", max_abs(&z));
}

#[test]
fn unsupported_family_particulars_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaCfg {
        model_type: "phi3",
        ..LlamaCfg::default()
    };
    let mut json = cfg.config_json();
    json["partial_rotary_factor"] = serde_json::json!(0.75);
    write_checkpoint(dir.path(), &json, &cfg.tensors(34));
    let e = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("partial_rotary_factor"), "{e}");
}
