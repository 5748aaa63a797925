//! Our GPT-2 forward equals an independent f64 reference written here with plain loops and
//! the textbook formulas, on the raw Hugging Face tensors (Conv1D weights [in, out]).

use crate::common::model_fixtures as fixtures;

use std::collections::HashMap;

use candle_core::{Device, IndexOp};
use fixtures::*;
use source_tda::model::{LoadOptions, Model, TokenBatch};

type W = HashMap<String, Vec<f64>>;

fn to_f64(tensors: &HashMap<String, candle_core::Tensor>) -> W {
    tensors
        .iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k.clone(), v.into_iter().map(f64::from).collect())
        })
        .collect()
}

fn layer_norm(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    (0..x.len())
        .map(|i| (x[i] - mean) * inv * w[i] + b[i])
        .collect()
}

/// x · W + b with W stored [d_in, d_out] row-major.
fn conv1d(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let d_out = b.len();
    let mut y = b.to_vec();
    for (i, xi) in x.iter().enumerate() {
        for j in 0..d_out {
            y[j] += xi * w[i * d_out + j];
        }
    }
    y
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// Logits [T][V] of one sequence.
fn reference(cfg: &Gpt2Cfg, w: &W, ids: &[u32]) -> Vec<Vec<f64>> {
    let (d, nh) = (cfg.n_embd, cfg.n_head);
    let hd = d / nh;
    let t_len = ids.len();
    let g = |n: &str| &w[n];
    let mut h: Vec<Vec<f64>> = (0..t_len)
        .map(|t| {
            (0..d)
                .map(|i| g("wte.weight")[ids[t] as usize * d + i] + g("wpe.weight")[t * d + i])
                .collect()
        })
        .collect();
    for l in 0..cfg.n_layer {
        let p = |n: &str| format!("h.{l}.{n}");
        let qkv: Vec<Vec<f64>> = h
            .iter()
            .map(|x| {
                let x = layer_norm(x, g(&p("ln_1.weight")), g(&p("ln_1.bias")));
                conv1d(&x, g(&p("attn.c_attn.weight")), g(&p("attn.c_attn.bias")))
            })
            .collect();
        let mut y = vec![vec![0.0; d]; t_len];
        for head in 0..nh {
            for t in 0..t_len {
                let q = &qkv[t][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|u| {
                        let k = &qkv[u][d + head * hd..d + (head + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (u, eu) in e.iter().enumerate() {
                    for i in 0..hd {
                        y[t][head * hd + i] += eu / z * qkv[u][2 * d + head * hd + i];
                    }
                }
            }
        }
        for t in 0..t_len {
            let o = conv1d(
                &y[t],
                g(&p("attn.c_proj.weight")),
                g(&p("attn.c_proj.bias")),
            );
            for i in 0..d {
                h[t][i] += o[i];
            }
            let x = layer_norm(&h[t], g(&p("ln_2.weight")), g(&p("ln_2.bias")));
            let z: Vec<f64> = conv1d(&x, g(&p("mlp.c_fc.weight")), g(&p("mlp.c_fc.bias")))
                .into_iter()
                .map(gelu_tanh)
                .collect();
            let o = conv1d(&z, g(&p("mlp.c_proj.weight")), g(&p("mlp.c_proj.bias")));
            for i in 0..d {
                h[t][i] += o[i];
            }
        }
    }
    h.iter()
        .map(|x| {
            let x = layer_norm(x, g("ln_f.weight"), g("ln_f.bias"));
            (0..cfg.vocab)
                .map(|v| (0..d).map(|i| x[i] * g("wte.weight")[v * d + i]).sum())
                .collect()
        })
        .collect()
}

#[test]
fn gpt2_forward_matches_independent_f64_reference() {
    for prefixed in [false, true] {
        let cfg = Gpt2Cfg {
            prefixed,
            ..Gpt2Cfg::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let tensors = cfg.tensors(11);
        write_checkpoint(dir.path(), &cfg.config_json(), &tensors);
        let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
        let unprefixed = Gpt2Cfg {
            prefixed: false,
            ..cfg.clone()
        };
        let w = to_f64(&unprefixed.tensors(11));

        let mut rng = Rng::new(5);
        let docs = random_docs(&mut rng, &[10, 3, 7], cfg.vocab);
        let batch = TokenBatch::new(&doc_refs(&docs), 0, Some(12), &Device::Cpu).unwrap();
        let logits = model.forward(&batch.input_ids).unwrap();
        let mut worst = 0f64;
        for (b, (ids, _)) in docs.iter().enumerate() {
            let want = reference(&cfg, &w, ids);
            let got = logits.i(b).unwrap().to_vec2::<f32>().unwrap();
            for t in 0..ids.len() {
                for v in 0..cfg.vocab {
                    worst = worst.max((got[t][v] as f64 - want[t][v]).abs());
                }
            }
        }
        assert!(
            worst <= 1e-4,
            "prefixed={prefixed}: max |ours − reference| = {worst}"
        );
        assert!(max_abs(&logits) > 0.1);
    }
}

#[test]
fn gpt2_rejects_sequences_longer_than_n_positions() {
    let cfg = Gpt2Cfg::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(1));
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let ids = vec![1u32; cfg.n_positions + 1];
    let mut mask = vec![1u8; ids.len()];
    mask[0] = 0;
    let batch = TokenBatch::new(&[(&ids, &mask)], 0, None, &Device::Cpu).unwrap();
    let e = model.forward(&batch.input_ids).unwrap_err().to_string();
    assert!(e.contains("n_positions"), "{e}");
}
