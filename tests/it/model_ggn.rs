//! Exact Gauss–Newton products: the forward-mode tangent J v against central finite
//! differences of the logits for every family variant and on the demo model, and
//! G v = Jᵀ H J v against the same product built from a dense Jacobian taken row by row with
//! autograd.

use crate::common::model_fixtures as fixtures;

use candle_core::{Device, IndexOp, Tensor};
use fixtures::*;
use source_tda::model::{LoadOptions, Model, TokenBatch, Tracking};

fn load(
    config: &serde_json::Value,
    tensors: &std::collections::HashMap<String, Tensor>,
    tracking: Tracking,
) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), config, tensors);
    let opts = LoadOptions {
        tracking,
        ..LoadOptions::default()
    };
    let model = Model::load(dir.path(), &opts, &Device::Cpu).unwrap();
    (dir, model)
}

/// K random directions per tracked layer, [K, d_out, d_in(+1)], scaled so that each
/// direction has unit norm over all layers.
fn directions(model: &Model, k: usize, rng: &mut Rng) -> Vec<Tensor> {
    let raw: Vec<Tensor> = model
        .tracked_layers()
        .iter()
        .map(|l| {
            randn(
                rng,
                &[k, l.d_out, l.d_in + usize::from(l.has_bias)],
                0.0,
                1.0,
            )
        })
        .collect();
    let norm2: Tensor = raw
        .iter()
        .map(|t| t.sqr().unwrap().sum((1, 2)).unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let scale = norm2
        .sqrt()
        .unwrap()
        .recip()
        .unwrap()
        .reshape((k, 1, 1))
        .unwrap();
    raw.iter()
        .map(|t| t.broadcast_mul(&scale).unwrap())
        .collect()
}

/// Moves every tracked layer's parameters by `h` times direction `k` (in place).
fn shift(model: &Model, v: &[Tensor], k: usize, h: f64) {
    for (info, vl) in model.tracked_layers().iter().zip(v) {
        let var = |suffix: &str| {
            model
                .params()
                .iter()
                .find(|p| p.name == format!("{}.{suffix}", info.name))
                .unwrap_or_else(|| panic!("no parameter {}.{suffix}", info.name))
                .var
                .clone()
        };
        let vk = vl.get(k).unwrap();
        let w = var("weight");
        let dw = vk.narrow(1, 0, info.d_in).unwrap();
        w.set(&(w.as_tensor() + (dw * h).unwrap()).unwrap())
            .unwrap();
        if info.has_bias {
            let b = var("bias");
            let db = vk.narrow(1, info.d_in, 1).unwrap().squeeze(1).unwrap();
            b.set(&(b.as_tensor() + (db * h).unwrap()).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn logit_tangents_match_central_differences_for_every_family() {
    let mut cases: Vec<_> = family_variants()
        .into_iter()
        .map(|(l, c, t)| (l.to_string(), c, t, Tracking::BlockLinears))
        .collect();
    // An untied head tracked as well (its tangent x Vᵀ at the output).
    let llama = LlamaCfg::default();
    cases.push((
        "llama+lm_head".into(),
        llama.config_json(),
        llama.tensors(31),
        Tracking::Patterns(vec!["*".into()]),
    ));
    for (label, config, tensors, tracking) in cases {
        let (_dir, model) = load(&config, &tensors, tracking);
        let mut rng = Rng::new(5);
        let docs = random_docs(&mut rng, &[7, 5], model.spec().vocab_size());
        check_tangents(&label, &model, &docs, &mut rng);
    }
}

/// Two random directions: the tangent pass's logits equal the plain forward's, and its J v
/// equals the central difference (f(θ + h v) − f(θ − h v)) / 2h of the logits, h = 1e-2, to
/// 1% of |J v| + 1e-3.
fn check_tangents(label: &str, model: &Model, docs: &[(Vec<u32>, Vec<u8>)], rng: &mut Rng) {
    let (k, h) = (2, 1e-2);
    let batch = TokenBatch::new(&doc_refs(docs), 0, None, &Device::Cpu).unwrap();
    let v = directions(model, k, rng);
    let ids = batch.input_ids.repeat((k, 1)).unwrap();
    let z = model.logits_tangent(&ids, &v).unwrap();
    let plain = model.forward(&batch.input_ids).unwrap();
    let b = batch.batch_size();
    for kk in 0..k {
        let zx = z.x.narrow(0, kk * b, b).unwrap();
        assert!(max_abs_diff(&zx, &plain) < 1e-4, "{label}: logits differ");
        shift(model, &v, kk, h);
        let plus = model.forward(&batch.input_ids).unwrap();
        shift(model, &v, kk, -2.0 * h);
        let minus = model.forward(&batch.input_ids).unwrap();
        shift(model, &v, kk, h);
        let fd = ((plus - minus).unwrap() / (2.0 * h)).unwrap();
        let got = z.dx.narrow(0, kk * b, b).unwrap();
        let (err, size) = (max_abs_diff(&got, &fd), max_abs(&fd));
        assert!(size > 1e-2, "{label}: the direction moves no logit");
        assert!(
            err <= 1e-2 * size + 1e-3,
            "{label} direction {kk}: |J v − finite difference| = {err}, |J v| = {size}"
        );
    }
}

/// G v from a dense Jacobian: each logit's gradient by autograd, then
/// Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) (J_t v) over the loss positions.
fn dense_gauss_newton(model: &Model, batch: &TokenBatch, v: &[Tensor]) -> Vec<Tensor> {
    let logits = model.forward(&batch.input_ids).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
    let mask: Vec<Vec<f32>> = batch.prediction_mask.to_vec2().unwrap();
    let vocab = logits.dim(2).unwrap();
    let k = v[0].dim(0).unwrap();
    let weights: Vec<(candle_core::Var, Option<candle_core::Var>)> = model
        .tracked_layers()
        .iter()
        .map(|info| {
            let find = |s: &str| {
                model
                    .params()
                    .iter()
                    .find(|p| p.name == format!("{}.{s}", info.name))
                    .map(|p| p.var.clone())
            };
            (
                find("weight").unwrap(),
                find("bias").filter(|_| info.has_bias),
            )
        })
        .collect();
    let mut out: Vec<Tensor> = v.iter().map(|t| t.zeros_like().unwrap()).collect();
    for (bi, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 0.0 {
                continue;
            }
            // J_t: one gradient per vocabulary entry, flattened per layer [d_out, d_in(+1)].
            let rows: Vec<Vec<Tensor>> = (0..vocab)
                .map(|c| {
                    let g = logits.i((bi, t, c)).unwrap().backward().unwrap();
                    weights
                        .iter()
                        .map(|(w, b)| {
                            let gw = g
                                .get(w.as_tensor())
                                .cloned()
                                .unwrap_or(w.as_tensor().zeros_like().unwrap());
                            match b {
                                Some(b) => {
                                    let gb = g
                                        .get(b.as_tensor())
                                        .cloned()
                                        .unwrap_or(b.as_tensor().zeros_like().unwrap());
                                    Tensor::cat(&[&gw, &gb.unsqueeze(1).unwrap()], 1).unwrap()
                                }
                                None => gw,
                            }
                        })
                        .collect()
                })
                .collect();
            let p: Vec<f32> = probs.i((bi, t)).unwrap().to_vec1().unwrap();
            for kk in 0..k {
                // J_t v_k: [V]
                let jv: Vec<f64> = rows
                    .iter()
                    .map(|layers| {
                        layers
                            .iter()
                            .zip(v)
                            .map(|(j, vl)| {
                                (j * vl.get(kk).unwrap())
                                    .unwrap()
                                    .sum_all()
                                    .unwrap()
                                    .to_scalar::<f32>()
                                    .unwrap() as f64
                            })
                            .sum()
                    })
                    .collect();
                let pjv: f64 = p.iter().zip(&jv).map(|(&a, b)| a as f64 * b).sum();
                let hjv: Vec<f64> = p
                    .iter()
                    .zip(&jv)
                    .map(|(&a, b)| a as f64 * (b - pjv))
                    .collect();
                for (l, o) in out.iter_mut().enumerate() {
                    let mut acc = o.get(kk).unwrap();
                    for (c, layers) in rows.iter().enumerate() {
                        acc = (acc + (&layers[l] * hjv[c]).unwrap()).unwrap();
                    }
                    let mut parts: Vec<Tensor> = (0..k).map(|j| o.get(j).unwrap()).collect();
                    parts[kk] = acc;
                    *o = Tensor::stack(&parts, 0).unwrap();
                }
            }
        }
    }
    out
}

fn rel_err(a: &[Tensor], b: &[Tensor]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        den += y
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    (num / den).sqrt()
}

#[test]
fn gauss_newton_products_equal_the_dense_jacobian_product() {
    let small = LlamaCfg {
        hidden: 16,
        inter: 24,
        vocab: 23,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        ..LlamaCfg::default()
    };
    let gpt2 = Gpt2Cfg::default();
    for (label, config, tensors) in [
        ("llama", small.config_json(), small.tensors(41)),
        ("gpt2", gpt2.config_json(), gpt2.tensors(42)),
    ] {
        let (_dir, model) = load(&config, &tensors, Tracking::BlockLinears);
        let mut rng = Rng::new(9);
        let docs = random_docs(&mut rng, &[5, 3], model.spec().vocab_size());
        let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
        let v = directions(&model, 3, &mut rng);
        let got = model.gauss_newton(&batch, &v).unwrap();
        let want = dense_gauss_newton(&model, &batch, &v);
        let e = rel_err(&got, &want);
        assert!(e < 1e-4, "{label}: G v relative error {e}");

        // Directions are independent of each other, documents add up.
        let one = model
            .gauss_newton(
                &batch,
                &v.iter()
                    .map(|t| t.narrow(0, 1, 1).unwrap())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let row1: Vec<Tensor> = got.iter().map(|t| t.narrow(0, 1, 1).unwrap()).collect();
        assert!(
            rel_err(&one, &row1) < 1e-5,
            "{label}: direction 1 alone differs"
        );
        let split: Vec<Tensor> = docs
            .iter()
            .map(|d| {
                let b = TokenBatch::new(&doc_refs(std::slice::from_ref(d)), 0, None, &Device::Cpu)
                    .unwrap();
                model.gauss_newton(&b, &v).unwrap()
            })
            .reduce(|a, b| a.iter().zip(&b).map(|(x, y)| (x + y).unwrap()).collect())
            .unwrap();
        assert!(
            rel_err(&split, &got) < 1e-5,
            "{label}: per-document sums differ"
        );

        // G is symmetric positive semi-definite: ⟨v_0, G v_1⟩ = ⟨v_1, G v_0⟩, ⟨v, G v⟩ ≥ 0.
        let dot = |a: usize, b: usize| -> f64 {
            v.iter()
                .zip(&got)
                .map(|(x, g)| {
                    (x.get(a).unwrap() * g.get(b).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                })
                .sum()
        };
        let (a, b) = (dot(0, 1), dot(1, 0));
        assert!(
            (a - b).abs() <= 1e-4 * (a.abs() + b.abs()) + 1e-7,
            "{label}: not symmetric {a} {b}"
        );
        for i in 0..3 {
            assert!(dot(i, i) > 0.0, "{label}: ⟨v, G v⟩ = {}", dot(i, i));
        }
    }
}

#[test]
fn logit_tangents_match_central_differences_on_the_demo_model() {
    let dir = crate::common::demo_tokenizer()
        .parent()
        .unwrap()
        .to_path_buf();
    let model = Model::load(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(8);
    let docs = random_docs(&mut rng, &[24, 17], model.spec().vocab_size());
    check_tangents("demo", &model, &docs, &mut rng);
}
