//! Throughput of capture vs a plain forward + backward on a SmolLM2-135M-shaped Llama with
//! random weights (hidden 576, 9 heads, 3 kv heads, head_dim 64, MLP 1536, vocab 49152), and
//! of the exact Gauss–Newton product G v (docs/design.md §9) with `--ggn K` directions.
//!
//! ```text
//! cargo bench --bench capture -- [--layers 4,30] [--batch 8] [--seq 128] [--reps 3] [--ggn K]
//! ```
//!
//! Plain and capture runs alternate (the machine's speed drifts); each mode reports the best
//! and mean tokens/s over `reps` and its peak RSS, and the capture/plain time ratio. With
//! `--ggn K`, one G v over the batch for K directions (a batch of K copies) runs after them:
//! its time per direction (the cost of one refinement iteration per query and batch) and its
//! ratio to the plain forward + backward.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use source_tda::model::{Labels, LoadOptions, Model, ModelSpec, TensorMap, TokenBatch};
use source_tda::util::mem;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn smollm2_spec(layers: usize) -> ModelSpec {
    ModelSpec::from_json(&json!({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "vocab_size": 49152, "num_hidden_layers": layers, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 8192}))
    .expect("valid spec")
}

fn random_weights(layers: usize, dev: &Device) -> TensorMap {
    let (d, f, v, dkv) = (576, 1536, 49152, 192);
    let mut m = HashMap::new();
    // std 0 stands for an RMSNorm weight: all ones.
    let mut put = |n: String, shape: &[usize], std: f64| {
        let t = if std == 0.0 {
            Tensor::ones(shape, DType::F32, dev)
        } else {
            Tensor::randn(0f32, std as f32, shape, dev)
        };
        m.insert(n, t.expect("weights"));
    };
    put("model.embed_tokens.weight".into(), &[v, d], 0.02);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            put(format!("{p}.{n}.weight"), &[d], 0.0);
        }
        for (n, i_, o) in [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", d, dkv),
            ("self_attn.v_proj", d, dkv),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", d, f),
            ("mlp.up_proj", d, f),
            ("mlp.down_proj", f, d),
        ] {
            put(format!("{p}.{n}.weight"), &[o, i_], 0.02);
        }
    }
    put("model.norm.weight".into(), &[d], 0.0);
    TensorMap(m)
}

fn main() {
    // As the tool runs: candle's elementwise workers sleep at once (util::threads).
    source_tda::util::threads::configure_for_compute();
    let args: Vec<String> = std::env::args().collect();
    let layers: Vec<usize> = arg(&args, "--layers", "4,30")
        .split(',')
        .map(|s| s.parse().expect("--layers: comma-separated integers"))
        .collect();
    let b: usize = arg(&args, "--batch", "8").parse().expect("--batch");
    let t: usize = arg(&args, "--seq", "128").parse().expect("--seq");
    let reps: usize = arg(&args, "--reps", "3").parse().expect("--reps");
    let ggn: usize = arg(&args, "--ggn", "0").parse().expect("--ggn");
    let dev = Device::Cpu;
    for &n in &layers {
        let weights = random_weights(n, &dev);
        let model = Model::from_source(&smollm2_spec(n), &weights, &LoadOptions::default(), &dev)
            .expect("model");
        drop(weights);
        let ids: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..t)
                    .map(|i| ((r * 7919 + i * 104729) % 49152) as u32)
                    .collect()
            })
            .collect();
        let mask: Vec<u8> = (0..t).map(|i| u8::from(i > 0)).collect();
        let docs: Vec<(&[u32], &[u8])> = ids.iter().map(|d| (d.as_slice(), &mask[..])).collect();
        let batch = TokenBatch::new(&docs, 0, None, &dev).expect("batch");
        let tokens = (b * t) as f64;
        let plain = || {
            let loss = model.loss_tensor(&batch).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            std::hint::black_box(g);
        };
        let capture = || {
            let c = model.capture(&batch, Labels::Data).unwrap();
            std::hint::black_box(c);
        };
        plain(); // warm-up
        let (mut tp, mut tc) = (Vec::new(), Vec::new());
        let (mut rss_p, mut rss_c) = (0u64, 0u64);
        for _ in 0..reps {
            mem::reset_peak_rss();
            let s = Instant::now();
            plain();
            tp.push(s.elapsed().as_secs_f64());
            rss_p = rss_p.max(mem::peak_rss_bytes().unwrap_or(0));
            mem::reset_peak_rss();
            let s = Instant::now();
            capture();
            tc.push(s.elapsed().as_secs_f64());
            rss_c = rss_c.max(mem::peak_rss_bytes().unwrap_or(0));
        }
        let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "layers={n} batch={b} seq={t} reps={reps}\n  plain   fwd+bwd: best {:8.1} tok/s  mean {:8.1} tok/s  peak RSS {}\n  capture fwd+bwd: best {:8.1} tok/s  mean {:8.1} tok/s  peak RSS {}\n  capture/plain time: best {:.3}  mean {:.3}",
            tokens / best(&tp),
            tokens / mean(&tp),
            mem::human_bytes(rss_p),
            tokens / best(&tc),
            tokens / mean(&tc),
            mem::human_bytes(rss_c),
            best(&tc) / best(&tp),
            mean(&tc) / mean(&tp),
        );
        if ggn > 0 {
            let v: Vec<Tensor> = model
                .tracked_layers()
                .iter()
                .map(|l| Tensor::randn(0f32, 1e-3, (ggn, l.d_out, l.d_in), &dev).unwrap())
                .collect();
            let mut tg = Vec::new();
            mem::reset_peak_rss();
            for _ in 0..reps {
                let s = Instant::now();
                std::hint::black_box(model.gauss_newton(&batch, &v).unwrap());
                tg.push(s.elapsed().as_secs_f64());
            }
            let rss = mem::peak_rss_bytes().unwrap_or(0);
            println!(
                "  G v, {ggn} directions: best {:.3} s  mean {:.3} s  = {:.3} s per direction \
                 ({:.2}× plain fwd+bwd)  peak RSS {}",
                best(&tg),
                mean(&tg),
                best(&tg) / ggn as f64,
                best(&tg) / ggn as f64 / best(&tp),
                mem::human_bytes(rss),
            );
        }
    }
}
