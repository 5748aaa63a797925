//! Fine-tuning throughput of a SmolLM2-135M-shaped Llama (hidden 576, 9 heads / 3 kv heads,
//! head_dim 64, intermediate 1536, vocab 49152, tied embeddings) with random weights:
//! AdamW steps on batches of B documents × S tokens, as the `finetune` stage takes them
//! (forward, backward, accumulation, global norm, optimizer update).
//!
//! Usage: bench_finetune LAYERS [STEPS] [B] [S]   (defaults: 4, 5, 8, 128)
//! Prints steps/s and tokens/s over STEPS timed steps after one warm-up step.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use source_tda::config::BatchingConfig;
use source_tda::config::LossNormalization;
use source_tda::data::PreparedDoc;
use source_tda::model::{LoadOptions, Model, ModelSpec, TensorMap};
use source_tda::train::finetune::step_gradients;
use source_tda::train::optim::global_norm;
use source_tda::train::{Optimizer, OptimizerInfo};
use source_tda::util::rng::SplitMix64;

fn randn(rng: &mut SplitMix64, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    // Sum of 4 uniforms, centred and scaled: close enough to normal for a speed test.
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let s: f32 = (0..4)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
                .sum();
            (s - 2.0) * std * 1.732
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: LAYERS [STEPS] [B] [S]"))
        .collect();
    let layers = *args.first().unwrap_or(&4);
    let steps = *args.get(1).unwrap_or(&5);
    let (b, s) = (*args.get(2).unwrap_or(&8), *args.get(3).unwrap_or(&128));
    let (d, f, v, kv) = (576usize, 1536usize, 49152usize, 192usize);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": d, "intermediate_size": f, "vocab_size": v,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 8192,
    });
    let spec = ModelSpec::from_json(&config).unwrap();
    let mut rng = SplitMix64::new(1);
    let mut m = HashMap::new();
    m.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&mut rng, &[v, d], 0.02),
    );
    m.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            m.insert(
                format!("{p}.{n}.weight"),
                Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        }
        for (n, shape) in [
            ("self_attn.q_proj", [d, d]),
            ("self_attn.k_proj", [kv, d]),
            ("self_attn.v_proj", [kv, d]),
            ("self_attn.o_proj", [d, d]),
            ("mlp.gate_proj", [f, d]),
            ("mlp.up_proj", [f, d]),
            ("mlp.down_proj", [d, f]),
        ] {
            m.insert(format!("{p}.{n}.weight"), randn(&mut rng, &shape, 0.02));
        }
    }
    let model =
        Model::from_source(&spec, &TensorMap(m), &LoadOptions::default(), &Device::Cpu).unwrap();
    let n_params: usize = model.params().iter().map(|p| p.var.elem_count()).sum();
    let docs: Vec<PreparedDoc> = (0..b * (steps + 1))
        .map(|i| {
            let ids: Vec<u32> = (0..s).map(|_| rng.below(v as u64) as u32).collect();
            let mut mask = vec![1u8; s];
            mask[0] = 0;
            PreparedDoc {
                doc_id: format!("d{i}"),
                text: String::new(),
                prompt: None,
                completion: None,
                input_ids: ids,
                loss_mask: mask,
                truncated_tokens: 0,
                source: String::new(),
            }
        })
        .collect();
    let batching = BatchingConfig {
        token_budget: b * s,
        max_batch_size: b,
    };
    let info = OptimizerInfo::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = Optimizer::new(info, model.params().len()).unwrap();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "SmolLM2-135M shape, {layers} layers, {:.1} M parameters, batch {b} × {s} tokens, AdamW, \
         {threads} threads",
        n_params as f64 / 1e6
    );
    let mut t0 = Instant::now();
    for k in 0..=steps {
        let refs: Vec<&PreparedDoc> = docs[k * b..(k + 1) * b].iter().collect();
        let (grads, loss, _) =
            step_gradients(&model, &refs, LossNormalization::SumPerDocument, &batching).unwrap();
        let norm = global_norm(&grads).unwrap();
        opt.step(model.params(), &grads, 1e-4).unwrap();
        println!(
            "step {k}: loss {loss:.2}, |g| {norm:.3}, {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        if k == 0 {
            t0 = Instant::now(); // the first step is warm-up
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{:.3} steps/s, {:.0} tokens/s ({steps} timed steps, {secs:.1} s)",
        steps as f64 / secs,
        (steps * b * s) as f64 / secs
    );
}
