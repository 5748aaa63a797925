//! Capture correctness: Σ_t δ_t a_tᵀ equals autograd's per-document weight gradient, every
//! trainable weight gets a gradient, (a, δ) do not depend on batch mates or padding, and
//! sampled labels are seeded.

use crate::common::model_fixtures as fixtures;

use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};
use fixtures::*;
use source_tda::model::{Labels, LoadOptions, Model, TokenBatch, Tracking};

fn load(dir: &Path, tracking: Tracking) -> Model {
    let opts = LoadOptions {
        tracking,
        ..LoadOptions::default()
    };
    Model::load(dir, &opts, &Device::Cpu).unwrap()
}

fn frob(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    (frob(&(got - want).unwrap()) / frob(want).max(1e-30)).sqrt()
}

#[test]
fn assembled_gradients_equal_autograd_per_document() {
    for (label, config, tensors) in family_variants() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &config, &tensors);
        let model = load(dir.path(), Tracking::BlockLinears);
        let vocab = model.spec().vocab_size();
        let mut rng = Rng::new(7);
        let docs = random_docs(&mut rng, &[8, 4, 11], vocab);
        let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
        let cap = model.capture(&batch, Labels::Data).unwrap();
        assert_eq!(cap.layers.len(), model.tracked_layers().len());
        // GPT-2: c_attn, c_proj, c_fc, mlp c_proj; Phi-3: qkv, o, gate_up, down.
        let per_block = if label == "gpt2" || label == "phi3" {
            4
        } else {
            7
        };
        assert_eq!(cap.layers.len(), 2 * per_block, "{label}");
        let params = model.params();
        let var = |n: &str| params.iter().find(|p| p.name == n).unwrap().var.clone();
        for b in 0..docs.len() {
            let loss = model.loss_tensor(&batch).unwrap().i(b).unwrap();
            let want_loss = loss.to_scalar::<f32>().unwrap();
            assert!((want_loss - cap.losses[b]).abs() <= 1e-5 * want_loss.abs());
            let grads = loss.backward().unwrap();
            for (layer, info) in cap.layers.iter().zip(model.tracked_layers()) {
                let g = layer.doc_gradient(b).unwrap();
                let w = var(&format!("{}.weight", layer.name));
                let gw = grads.get(w.as_tensor()).unwrap();
                let got_w = g.narrow(1, 0, info.d_in).unwrap();
                let e = rel_err(&got_w, gw);
                assert!(
                    e <= 1e-5,
                    "{label} doc {b} {}: weight rel err {e}",
                    layer.name
                );
                assert!(frob(gw) > 0.0, "{label} {}: zero gradient", layer.name);
                if info.has_bias {
                    let bv = var(&format!("{}.bias", layer.name));
                    let gb = grads.get(bv.as_tensor()).unwrap();
                    let got_b = g.narrow(1, info.d_in, 1).unwrap().squeeze(1).unwrap();
                    let e = rel_err(&got_b, gb);
                    assert!(
                        e <= 1e-5,
                        "{label} doc {b} {}: bias rel err {e}",
                        layer.name
                    );
                }
            }
        }
    }
}

#[test]
fn every_trainable_weight_receives_a_gradient() {
    for (label, config, tensors) in family_variants() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &config, &tensors);
        let model = load(dir.path(), Tracking::None);
        let n_expected = tensors.len();
        assert_eq!(
            model.params().len(),
            n_expected,
            "{label}: one Var per tensor"
        );
        let mut rng = Rng::new(3);
        let docs = random_docs(&mut rng, &[9, 6], model.spec().vocab_size());
        let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
        let loss = model.loss_tensor(&batch).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for p in model.params() {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {}", p.name));
            assert!(max_abs(g) > 0.0, "{label}: zero gradient for {}", p.name);
        }
    }
}

/// Rows 0..n of document `b` of a capture, per layer: (a, δ).
fn rows(cap: &source_tda::model::Capture, b: usize, n: usize) -> Vec<(Tensor, Tensor)> {
    cap.layers
        .iter()
        .map(|l| {
            (
                l.a.i(b).unwrap().narrow(0, 0, n).unwrap(),
                l.delta.i(b).unwrap().narrow(0, 0, n).unwrap(),
            )
        })
        .collect()
}

#[test]
fn capture_is_invariant_to_batch_mates_and_padding() {
    for (label, config, tensors) in family_variants() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &config, &tensors);
        let model = load(dir.path(), Tracking::BlockLinears);
        let vocab = model.spec().vocab_size();
        let mut rng = Rng::new(9);
        let docs = random_docs(&mut rng, &[6, 13, 9], vocab);
        let target = &docs[0];
        let n = target.0.len();
        let alone = TokenBatch::new(&doc_refs(&docs[..1]), 0, None, &Device::Cpu)
            .unwrap()
            .with_keys(vec![42])
            .unwrap();
        let mut mixed_docs = vec![docs[1].clone(), docs[2].clone(), target.clone()];
        mixed_docs.swap(0, 2);
        mixed_docs.swap(0, 1); // target in the middle row
        let mixed = TokenBatch::new(&doc_refs(&mixed_docs), 5, Some(20), &Device::Cpu)
            .unwrap()
            .with_keys(vec![7, 42, 8])
            .unwrap();
        for labels in [Labels::Data, Labels::Sampled { seed: 3 }] {
            let c1 = model.capture(&alone, labels).unwrap();
            let c2 = model.capture(&mixed, labels).unwrap();
            let tol = 1e-5 * c1.losses[0].abs().max(1.0);
            assert!(
                (c1.losses[0] - c2.losses[1]).abs() <= tol,
                "{label} {labels:?}: loss {} vs {}",
                c1.losses[0],
                c2.losses[1]
            );
            for (l, ((a1, d1), (a2, d2))) in rows(&c1, 0, n).iter().zip(rows(&c2, 1, n)).enumerate()
            {
                let ea = max_abs_diff(a1, &a2) / max_abs(a1).max(1e-6);
                let ed = max_abs_diff(d1, &d2) / max_abs(d1).max(1e-6);
                assert!(
                    ea <= 1e-5 && ed <= 1e-5,
                    "{label} layer {l}: a {ea}, δ {ed}"
                );
            }
            // Padding rows carry nothing.
            for layer in &c2.layers {
                let pad_a = layer.a.i(1).unwrap().narrow(0, n, 20 - n).unwrap();
                let pad_d = layer.delta.i(1).unwrap().narrow(0, n, 20 - n).unwrap();
                assert_eq!(max_abs(&pad_a), 0.0);
                assert_eq!(max_abs(&pad_d), 0.0);
            }
        }
    }
}

#[test]
fn sampled_labels_are_seeded_and_follow_the_prediction_mask() {
    let cfg = LlamaCfg::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(31));
    let model = load(dir.path(), Tracking::BlockLinears);
    let mut rng = Rng::new(1);
    let mut docs = random_docs(&mut rng, &[20, 14], cfg.vocab);
    docs[1].1[..5].fill(0); // a prompt whose tokens are not targets
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let a = model.capture(&batch, Labels::Sampled { seed: 1 }).unwrap();
    let b = model.capture(&batch, Labels::Sampled { seed: 1 }).unwrap();
    let c = model.capture(&batch, Labels::Sampled { seed: 2 }).unwrap();
    let data = model.capture(&batch, Labels::Data).unwrap();
    let ta = a.targets.to_vec2::<u32>().unwrap();
    assert_eq!(ta, b.targets.to_vec2::<u32>().unwrap());
    assert_eq!(a.losses, b.losses);
    assert_eq!(max_abs_diff(&a.layers[3].delta, &b.layers[3].delta), 0.0);
    assert_ne!(ta, c.targets.to_vec2::<u32>().unwrap());
    assert_ne!(a.losses, c.losses);
    assert_ne!(a.losses, data.losses);
    let mask = batch.prediction_mask.to_vec2::<f32>().unwrap();
    for (row, m) in ta.iter().zip(&mask) {
        for (t, on) in row.iter().zip(m) {
            if *on == 0.0 {
                assert_eq!(*t, 0, "a label where nothing is predicted");
            }
        }
    }
    // Labels are spread over the vocabulary, not stuck on one token.
    let mut seen: Vec<u32> = ta.concat();
    seen.sort();
    seen.dedup();
    assert!(seen.len() > 5, "sampled labels {seen:?}");
}

#[test]
fn tracking_patterns_select_layers() {
    let cfg = LlamaCfg::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(41));
    let model = load(
        dir.path(),
        Tracking::Patterns(vec!["*.mlp.down_proj".into(), "lm_head".into()]),
    );
    let names: Vec<&str> = model
        .tracked_layers()
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "model.layers.0.mlp.down_proj",
            "model.layers.1.mlp.down_proj",
            "lm_head"
        ]
    );
    let mut rng = Rng::new(2);
    let docs = random_docs(&mut rng, &[7], cfg.vocab);
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let cap = model.capture(&batch, Labels::Data).unwrap();
    assert_eq!(cap.layers[2].a.dims(), &[1, 7, cfg.hidden]);
    assert_eq!(cap.layers[2].delta.dims(), &[1, 7, cfg.vocab]);
    // With lm_head tracked the capture forms the logits (its δ is their gradient); without,
    // the head and the loss run fused (no logits). Both give the same losses and δ.
    let fused = load(
        dir.path(),
        Tracking::Patterns(vec!["*.mlp.down_proj".into()]),
    );
    let f = fused.capture(&batch, Labels::Data).unwrap();
    assert!((f.losses[0] - cap.losses[0]).abs() <= 1e-5 * cap.losses[0].abs());
    for (x, y) in f.layers.iter().zip(&cap.layers[..2]) {
        let e = rel_err(&x.delta, &y.delta);
        assert!(e <= 1e-5, "{}: δ rel err {e}", x.name);
    }
    let opts = LoadOptions {
        tracking: Tracking::Patterns(vec!["*.nope".into()]),
        ..LoadOptions::default()
    };
    let e = Model::load(dir.path(), &opts, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("*.nope"), "{e}");
}
