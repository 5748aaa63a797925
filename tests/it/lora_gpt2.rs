//! GPT-2 LoRA adapters (Conv1D projections, PEFT's `fan_in_fan_out = true`) against the merged
//! dense model.
//!
//! No PEFT-made GPT-2 fixture is committed (torch is not installable here without the
//! multi-GB CUDA build), so the adapter is built by hand the way PEFT lays it out for Conv1D:
//! `base_model.model.transformer.h.I.attn.c_attn.lora_A.weight` of shape [r, d_in] and
//! `….lora_B.weight` of shape [d_out, r], where (d_in, d_out) is the Conv1D weight's stored
//! shape; the merged checkpoint adds s (B A)ᵀ to each stored [d_in, d_out] weight (PEFT's
//! `merge_and_unload` with fan_in_fan_out). The LoRA model's logits must equal the merged
//! model's, on the square c_proj (where a transposed ΔW would still load) as on the
//! rectangular c_attn and c_fc, for checkpoints with and without the `transformer.` prefix.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use source_tda::model::{LoadOptions, Model, TokenBatch};
use source_tda::train::checkpoint::write_safetensors;

use crate::common::model_fixtures::*;

#[test]
fn a_gpt2_conv1d_adapter_gives_the_merged_models_logits() {
    for prefixed in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = Gpt2Cfg {
            prefixed,
            ..Gpt2Cfg::default()
        };
        let tensors = cfg.tensors(11);
        let base = tmp.path().join("base");
        write_checkpoint(&base, &cfg.config_json(), &tensors);
        let (r, alpha) = (3usize, 6.0f64);
        let s = alpha / r as f64;
        let pre = if prefixed { "transformer." } else { "" };
        let mut rng = Rng::new(5);
        let mut adapter = Vec::new();
        let mut merged = tensors.clone();
        for li in 0..cfg.n_layer {
            for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
                let key = format!("{pre}h.{li}.{m}.weight");
                let w = &tensors[&key];
                let (d_in, d_out) = w.dims2().unwrap(); // Conv1D: stored [in, out]
                let a = randn(&mut rng, &[r, d_in], 0.0, 0.3);
                let b = randn(&mut rng, &[d_out, r], 0.0, 0.3);
                let delta = b.matmul(&a).unwrap().t().unwrap().affine(s, 0.0).unwrap();
                merged.insert(key, (w + delta).unwrap());
                // PEFT names modules by the GPT2LMHeadModel path, prefix or not in the file.
                let p = format!("base_model.model.transformer.h.{li}.{m}");
                adapter.push((format!("{p}.lora_A.weight"), a));
                adapter.push((format!("{p}.lora_B.weight"), b));
            }
        }
        let ad = tmp.path().join("adapter");
        std::fs::create_dir_all(&ad).unwrap();
        let config = serde_json::json!({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": "../base",
            "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": true,
            "bias": "none", "modules_to_save": null, "use_dora": false,
        });
        std::fs::write(ad.join("adapter_config.json"), config.to_string()).unwrap();
        write_safetensors(
            &ad.join("adapter_model.safetensors"),
            &adapter,
            HashMap::new(),
        )
        .unwrap();
        let mdir = tmp.path().join("merged");
        write_checkpoint(&mdir, &cfg.config_json(), &merged);

        let dev = Device::Cpu;
        let lora = Model::load(&ad, &LoadOptions::default(), &dev).unwrap();
        assert_eq!(lora.params().len(), 16, "4 modules × 2 layers × A, B");
        assert_eq!(lora.tracked_layers().len(), 16);
        let dense = Model::load(&mdir, &LoadOptions::default(), &dev).unwrap();
        let plain = Model::load(&base, &LoadOptions::default(), &dev).unwrap();
        let mut rng = Rng::new(8);
        let docs = random_docs(&mut rng, &[9, 6, 12], cfg.vocab);
        let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &dev).unwrap();
        let lo: Tensor = lora.forward(&batch.input_ids).unwrap();
        let de = dense.forward(&batch.input_ids).unwrap();
        let err = max_abs_diff(&lo, &de) / max_abs(&de).max(1.0);
        assert!(
            err <= 1e-5,
            "prefixed {prefixed}: LoRA vs merged logits, relative {err}"
        );
        let moved = max_abs_diff(&plain.forward(&batch.input_ids).unwrap(), &lo);
        assert!(
            moved > 1e-2,
            "prefixed {prefixed}: the adapter changes little ({moved})"
        );
    }
}

/// The shapes of every gradient one backward pass of `m`'s loss computes.
fn gradient_shapes(m: &Model, docs: &[(Vec<u32>, Vec<u8>)]) -> Vec<Vec<usize>> {
    let batch = TokenBatch::new(&doc_refs(docs), 0, None, &Device::Cpu).unwrap();
    let grads = m
        .loss_tensor(&batch)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads
        .get_ids()
        .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
        .collect()
}

/// A LoRA model trains A and B only: a backward pass of its loss computes no gradient for the
/// frozen embeddings ([V, d], [n_positions, d]) or LayerNorm weights ([d]), which a plain
/// model's pass does compute; the adapters' gradients are there.
#[test]
fn lora_training_computes_no_gradient_for_frozen_embeddings_and_norms() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Gpt2Cfg::default();
    let base = tmp.path().join("base");
    write_checkpoint(&base, &cfg.config_json(), &cfg.tensors(4));
    let opts = source_tda::train::finetune::train_load_options(&source_tda::config::TrainConfig {
        lora: Some(source_tda::config::LoraTrainConfig {
            r: 2,
            alpha: 4.0,
            target_modules: source_tda::config::LoraTargets::Names(vec!["c_attn".into()]),
            use_rslora: false,
            seed: Some(1),
        }),
        ..Default::default()
    });
    let lora = Model::load(&base, &opts, &Device::Cpu).unwrap();
    let plain = Model::load(&base, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(2);
    let docs = random_docs(&mut rng, &[7, 5], cfg.vocab);
    let d = cfg.n_embd;
    let frozen = [vec![cfg.vocab, d], vec![cfg.n_positions, d], vec![d]];
    let (got, want) = (
        gradient_shapes(&lora, &docs),
        gradient_shapes(&plain, &docs),
    );
    for s in &frozen {
        assert!(
            want.contains(s),
            "the plain model's pass has a {s:?} gradient"
        );
        assert!(
            !got.contains(s),
            "the LoRA pass computed a {s:?} gradient: {got:?}"
        );
    }
    assert!(
        got.contains(&vec![2, d]) && got.contains(&vec![3 * d, 2]),
        "{got:?}"
    );
}
