//! Our Llama forward equals candle-transformers' `models::llama` on the same weights.
//! candle's model returns only last-position logits, so every prefix of every document is
//! run through it and compared with our logits at that position of a padded batch.

use crate::common::model_fixtures as fixtures;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as ref_llama;
use fixtures::*;
use serde_json::json;
use source_tda::model::{LoadOptions, Model, TokenBatch};

fn compare(cfg: &LlamaCfg, seed: u64) {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let tensors = cfg.tensors(seed);
    let config = cfg.config_json();
    write_checkpoint(dir.path(), &config, &tensors);
    let ours = Model::load(dir.path(), &LoadOptions::default(), &dev).unwrap();

    let ref_cfg: ref_llama::LlamaConfig = serde_json::from_value(config).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let reference = ref_llama::Llama::load(vb, &ref_cfg).unwrap();

    let mut rng = Rng::new(seed + 100);
    let docs = random_docs(&mut rng, &[9, 5, 12], cfg.vocab);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &dev).unwrap();
    let logits = ours.forward(&batch.input_ids).unwrap();
    let mut worst = 0f32;
    for (b, (ids, _)) in docs.iter().enumerate() {
        for len in 1..=ids.len() {
            let mut cache = ref_llama::Cache::new(false, DType::F32, &ref_cfg, &dev).unwrap();
            let x = Tensor::new(&ids[..len], &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = reference
                .forward(&x, 0, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let got = logits.i((b, len - 1)).unwrap();
            worst = worst.max(max_abs_diff(&got, &want));
        }
    }
    assert!(worst <= 1e-4, "max |ours − candle-transformers| = {worst}");
    assert!(max_abs(&logits) > 0.1, "logits are degenerate");
}

#[test]
fn llama_untied_gqa_matches_candle_transformers() {
    compare(&LlamaCfg::default(), 1);
}

#[test]
fn llama_tied_matches_candle_transformers() {
    let cfg = LlamaCfg {
        tied: true,
        kv_heads: 1,
        ..LlamaCfg::default()
    };
    compare(&cfg, 2);
}

#[test]
fn llama_no_gqa_three_layers_matches_candle_transformers() {
    let cfg = LlamaCfg {
        kv_heads: 4,
        layers: 3,
        ..LlamaCfg::default()
    };
    compare(&cfg, 3);
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    // Short original context so that all three frequency bands occur at head_dim 8.
    let cfg = LlamaCfg {
        rope_scaling: json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        ..LlamaCfg::default()
    };
    compare(&cfg, 4);
}
