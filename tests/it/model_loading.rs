//! Loading: truncation, sharded checkpoints, bf16/f16 weights, and errors that name the
//! tensor or key; the query measurement on prompt/completion batches.

use crate::common::model_fixtures as fixtures;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use fixtures::*;
use source_tda::model::{LoadOptions, Model, TokenBatch};

fn batch(vocab: usize) -> TokenBatch {
    let mut rng = Rng::new(4);
    let docs = random_docs(&mut rng, &[9, 6], vocab);
    TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap()
}

fn logits(dir: &std::path::Path, opts: &LoadOptions, vocab: usize) -> Tensor {
    let m = Model::load(dir, opts, &Device::Cpu).unwrap();
    m.forward(&batch(vocab).input_ids).unwrap()
}

#[test]
fn truncation_keeps_embeddings_norm_and_head() {
    let cfg = LlamaCfg {
        layers: 3,
        ..LlamaCfg::default()
    };
    let tensors = cfg.tensors(51);
    let full = tempfile::tempdir().unwrap();
    write_checkpoint(full.path(), &cfg.config_json(), &tensors);
    // The same model written with only its first layer.
    let one = LlamaCfg {
        layers: 1,
        ..cfg.clone()
    };
    let kept: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("model.layers.1.") && !k.starts_with("model.layers.2."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let small = tempfile::tempdir().unwrap();
    write_checkpoint(small.path(), &one.config_json(), &kept);

    let opts = LoadOptions {
        max_layers: Some(1),
        ..LoadOptions::default()
    };
    let m = Model::load(full.path(), &opts, &Device::Cpu).unwrap();
    assert_eq!(m.spec().num_layers(), 1);
    assert_eq!(m.tracked_layers().len(), 7);
    assert_eq!(m.params().len(), kept.len());
    assert!(m.params().iter().all(|p| !p.name.contains("layers.1.")));
    let a = logits(full.path(), &opts, cfg.vocab);
    let b = logits(small.path(), &LoadOptions::default(), cfg.vocab);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let c = logits(full.path(), &LoadOptions::default(), cfg.vocab);
    assert!(max_abs_diff(&a, &c) > 1e-3, "truncation changed nothing");
    let too_many = LoadOptions {
        max_layers: Some(4),
        ..LoadOptions::default()
    };
    let e = Model::load(full.path(), &too_many, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 layers"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let cfg = LlamaCfg::default();
    let tensors = cfg.tensors(52);
    let single = tempfile::tempdir().unwrap();
    write_checkpoint(single.path(), &cfg.config_json(), &tensors);
    let sharded = tempfile::tempdir().unwrap();
    let dir = sharded.path();
    std::fs::write(dir.join("config.json"), cfg.config_json().to_string()).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (k, v)) in tensors.iter().enumerate() {
        let s = i % 2;
        shards[s].insert(k.clone(), v.clone());
        let file = format!("model-0000{}-of-00002.safetensors", s + 1);
        weight_map.insert(k.clone(), file.into());
    }
    for (s, shard) in shards.iter().enumerate() {
        let file = dir.join(format!("model-0000{}-of-00002.safetensors", s + 1));
        candle_core::safetensors::save(shard, file).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let a = logits(single.path(), &LoadOptions::default(), cfg.vocab);
    let b = logits(dir, &LoadOptions::default(), cfg.vocab);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn half_precision_weights_are_converted_to_f32() {
    let cfg = LlamaCfg::default();
    for dtype in [DType::BF16, DType::F16] {
        let tensors = cfg.tensors(53);
        let half: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        let rounded: HashMap<String, Tensor> = half
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap()))
            .collect();
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_checkpoint(d1.path(), &cfg.config_json(), &half);
        write_checkpoint(d2.path(), &cfg.config_json(), &rounded);
        let m = Model::load(d1.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
        assert!(m.params().iter().all(|p| p.var.dtype() == DType::F32));
        let a = logits(d1.path(), &LoadOptions::default(), cfg.vocab);
        let b = logits(d2.path(), &LoadOptions::default(), cfg.vocab);
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{dtype:?}");
    }
}

fn load_err(config: &serde_json::Value, tensors: &HashMap<String, Tensor>) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), config, tensors);
    Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn loading_errors_name_the_tensor_shape_and_key() {
    let cfg = LlamaCfg::default();
    let name = "model.layers.1.mlp.up_proj.weight";
    let mut t = cfg.tensors(54);
    t.remove(name);
    let e = load_err(&cfg.config_json(), &t);
    assert!(
        e.contains(name) && e.contains("[48, 32]") && e.contains("missing"),
        "{e}"
    );

    let mut t = cfg.tensors(54);
    t.insert(
        name.into(),
        Tensor::zeros((32, 48), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&cfg.config_json(), &t);
    assert!(
        e.contains(name) && e.contains("[32, 48]") && e.contains("[48, 32]"),
        "{e}"
    );

    let mut t = cfg.tensors(54);
    t.insert(
        name.into(),
        Tensor::zeros((48, 32), DType::U32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&cfg.config_json(), &t);
    assert!(e.contains(name) && e.contains("U32"), "{e}");

    let gpt = Gpt2Cfg::default();
    let mut t = gpt.tensors(55);
    t.remove("h.1.attn.c_attn.bias");
    let e = load_err(&gpt.config_json(), &t);
    assert!(
        e.contains("h.1.attn.c_attn.bias") && e.contains("[96]"),
        "{e}"
    );

    let mut config = cfg.config_json();
    config["model_type"] = "t5".into();
    let e = load_err(&config, &cfg.tensors(54));
    assert!(
        e.contains("t5")
            && e.contains("llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, gpt2"),
        "{e}"
    );

    let mut config = cfg.config_json();
    config.as_object_mut().unwrap().remove("vocab_size");
    let e = load_err(&config, &cfg.tensors(54));
    assert!(
        e.contains("`vocab_size`") && e.contains("config.json"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.config_json().to_string(),
    )
    .unwrap();
    let e = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn query_loss_is_minus_log_prob_of_the_completion() {
    let cfg = Gpt2Cfg::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(56));
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let (prompt, completion) = ([3u32, 9, 14, 2], [7u32, 7, 30]);
    let long_prompt = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let q = TokenBatch::from_prompt_completion(
        &[(&prompt, &completion), (&long_prompt, &completion[..1])],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let losses = model.doc_losses(&q).unwrap();
    // −Σ log softmax over the completion positions, from plain logits.
    let logits = model.forward(&q.input_ids).unwrap();
    let mut want = 0f64;
    for (k, &tok) in completion.iter().enumerate() {
        let row = logits
            .i((0, prompt.len() - 1 + k))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        want += lse - row[tok as usize] as f64;
    }
    assert!(
        (losses[0] as f64 - want).abs() < 1e-4,
        "{} vs {want}",
        losses[0]
    );
    assert!(losses[1] > 0.0);
    assert!(TokenBatch::from_prompt_completion(&[(&prompt, &[])], 0, &Device::Cpu).is_err());
}
