//! The attribution engine on tiny random models: the scoring pass equals the per-document
//! gradient inner products, per-token scores add up to document scores, and factors and
//! scores do not depend on batch size, query batching, block layout of whole factors, or
//! duplicated checkpoints.

use crate::common::model_fixtures as fixtures;

use candle_core::{Device, Tensor};
use fixtures::*;
use source_tda::attribution::{query_gradients, score_pass};
use source_tda::curvature::fit_factors;
use source_tda::data::PreparedDoc;
use source_tda::linalg::{apply_in_basis, spectral_weights, SpectralFn};
use source_tda::model::{Labels, LoadOptions, Model, TokenBatch};
use source_tda::passes::{Fisher, PassOptions};

fn doc(ids: Vec<u32>, prompt_len: Option<usize>) -> PreparedDoc {
    let n = ids.len();
    let loss_mask: Vec<u8> = (0..n)
        .map(|t| match prompt_len {
            None => (t > 0) as u8,
            Some(p) => (t >= p) as u8,
        })
        .collect();
    PreparedDoc {
        doc_id: format!("d{}", ids[0]),
        text: String::new(),
        prompt: None,
        completion: None,
        input_ids: ids,
        loss_mask,
        truncated_tokens: 0,
        source: "test".into(),
    }
}

fn setup(family: &str) -> (tempfile::TempDir, Model, Vec<PreparedDoc>, Vec<PreparedDoc>) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tensors, vocab) = if family == "gpt2" {
        let g = Gpt2Cfg::default();
        (g.config_json(), g.tensors(7), g.vocab)
    } else {
        let l = LlamaCfg::default();
        (l.config_json(), l.tensors(7), l.vocab)
    };
    write_checkpoint(dir.path(), &cfg, &tensors);
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(11);
    let train: Vec<PreparedDoc> = (0..9)
        .map(|i| doc(rng.tokens(4 + (i * 3) % 7, vocab), None))
        .collect();
    let queries: Vec<PreparedDoc> = (0..3)
        .map(|i| doc(rng.tokens(6 + i, vocab), Some(3)))
        .collect();
    (dir, model, train, queries)
}

fn opts(budget: usize, max_batch: usize) -> PassOptions {
    PassOptions {
        fisher: Fisher::Empirical,
        block_size: None,
        token_budget: budget,
        max_batch_size: max_batch,
        pad_id: 0,
        eigen_precision: Default::default(),
        capture_dir: None,
    }
}

fn rel(a: f64, b: f64, scale: f64) -> f64 {
    (a - b).abs() / scale.max(1e-30)
}

#[test]
fn scores_equal_gradient_inner_products_and_tokens_add_up() {
    for family in ["llama", "gpt2"] {
        let (_dir, model, train, queries) = setup(family);
        let o = opts(64, 4);
        let qg = query_gradients(&model, &queries, &o).unwrap();
        assert_eq!(qg.measurements.len(), 3);
        let s = score_pass(&model, &train, &qg.layers, &o, true).unwrap();
        let scale: Vec<f64> = s
            .docs
            .iter()
            .map(|row| row.iter().fold(0f64, |m, v| m.max(v.abs())))
            .collect();

        // Truth: each training document alone, its gradient per layer from capture.
        for (m, d) in train.iter().enumerate() {
            let batch =
                TokenBatch::new(&[(&d.input_ids, &d.loss_mask)], 0, None, &Device::Cpu).unwrap();
            let cap = model.capture(&batch, Labels::Data).unwrap();
            for qi in 0..queries.len() {
                let mut want = 0f64;
                for (l, layer) in cap.layers.iter().enumerate() {
                    let g = layer.doc_gradient(0).unwrap();
                    let gq = qg.layers[l].get(qi).unwrap();
                    let dot: f32 = (g * gq).unwrap().sum_all().unwrap().to_scalar().unwrap();
                    want += dot as f64;
                }
                let got = s.docs[qi][m];
                assert!(
                    rel(got, want, scale[qi]) < 1e-5,
                    "{family} q{qi} m{m}: {got} vs {want}"
                );
                let tok: f64 = s.tokens.as_ref().unwrap()[m][qi]
                    .iter()
                    .map(|&x| x as f64)
                    .sum();
                assert!(rel(tok, got, scale[qi]) < 1e-5, "token sum {tok} vs {got}");
                assert_eq!(s.tokens.as_ref().unwrap()[m][qi].len(), d.input_ids.len());
                let layers: f64 = s.per_layer.iter().map(|pl| pl[qi][m]).sum();
                assert!(
                    rel(layers, got, scale[qi]) < 1e-12,
                    "layer sum {layers} vs {got}"
                );
            }
        }
    }
}

#[test]
fn influence_scores_are_invariant_to_batching_and_duplicate_checkpoints() {
    let (_dir, model, train, queries) = setup("llama");
    let run = |o: &PassOptions, ckpts: &[&Model]| -> Vec<Vec<f64>> {
        let factors = fit_factors(ckpts, &train, o, "test").unwrap();
        let qg = query_gradients(&model, &queries, o).unwrap();
        let u: Vec<Tensor> = factors
            .iter()
            .zip(&qg.layers)
            .map(|(f, g)| {
                let w = spectral_weights(&f.lambda, SpectralFn::Inverse { damping: 1e-3 }).unwrap();
                apply_in_basis(&f.basis, &w, g).unwrap()
            })
            .collect();
        score_pass(&model, &train, &u, o, false).unwrap().docs
    };
    let base = run(&opts(64, 4), &[&model]);
    let scale = base.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for (label, other) in [
        ("batch of 1", run(&opts(64, 1), &[&model])),
        ("large batches", run(&opts(4096, 64), &[&model])),
        (
            "duplicated checkpoint",
            run(&opts(64, 4), &[&model, &model]),
        ),
    ] {
        for (a, b) in base.iter().flatten().zip(other.iter().flatten()) {
            assert!(
                (a - b).abs() <= 2e-3 * scale,
                "{label}: {a} vs {b} (scale {scale})"
            );
        }
    }
}

#[test]
fn true_fisher_is_seeded_and_block_size_of_the_whole_layer_changes_nothing() {
    let (_dir, model, train, _) = setup("llama");
    let fit = |fisher, block| {
        let o = PassOptions {
            fisher,
            block_size: block,
            ..opts(64, 4)
        };
        fit_factors(&[&model], &train, &o, "t").unwrap()
    };
    let lam = |f: &[source_tda::linalg::LayerFactors]| -> Vec<f64> {
        f.iter()
            .flat_map(|l| l.lambda.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    };
    let a = lam(&fit(Fisher::True { seed: 5 }, None));
    let b = lam(&fit(Fisher::True { seed: 5 }, None));
    let c = lam(&fit(Fisher::True { seed: 6 }, None));
    assert_eq!(a, b, "same seed, same factors");
    assert_ne!(a, c, "another seed samples other labels");
    let whole = lam(&fit(Fisher::Empirical, None));
    let huge_block = lam(&fit(Fisher::Empirical, Some(1 << 20)));
    assert_eq!(whole, huge_block);
}

fn abs64(t: &Tensor) -> f64 {
    let t = t.to_dtype(candle_core::DType::F64).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn diff64(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    abs64(&(f(a) - f(b)).unwrap())
}

/// Brute force for one layer from single-document captures: A = Σ a aᵀ / n_tok,
/// S = Σ δ δᵀ / n_tok over every real token, and per-document gradients G_m.
fn brute_factors(model: &Model, docs: &[PreparedDoc], l: usize) -> (Tensor, Tensor, Vec<Tensor>) {
    let (mut a_sum, mut s_sum, mut grads, mut n) = (None::<Tensor>, None::<Tensor>, Vec::new(), 0);
    for d in docs {
        let batch =
            TokenBatch::new(&[(&d.input_ids, &d.loss_mask)], 0, None, &Device::Cpu).unwrap();
        let cap = model.capture(&batch, Labels::Data).unwrap();
        let layer = &cap.layers[l];
        let a = layer
            .a
            .get(0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let s = layer
            .delta
            .get(0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let aa = a.t().unwrap().matmul(&a).unwrap();
        let ss = s.t().unwrap().matmul(&s).unwrap();
        a_sum = Some(a_sum.map_or(aa.clone(), |x| (x + aa).unwrap()));
        s_sum = Some(s_sum.map_or(ss.clone(), |x| (x + ss).unwrap()));
        grads.push(layer.doc_gradient(0).unwrap());
        n += d.input_ids.len();
    }
    let n = n as f64;
    (
        (a_sum.unwrap() / n).unwrap(),
        (s_sum.unwrap() / n).unwrap(),
        grads,
    )
}

#[test]
fn fitted_factors_equal_brute_force_with_shared_inputs_blocks_and_checkpoints() {
    let (_dir, model, train, _) = setup("llama");
    let names: Vec<String> = model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    for (block, ckpts) in [(None, 1), (Some(5), 1), (None, 2)] {
        let o = PassOptions {
            block_size: block,
            ..opts(64, 4)
        };
        let refs: Vec<&Model> = (0..ckpts).map(|_| &model).collect();
        let f =
            source_tda::curvature::fit_factors_with_covariances(&refs, &train, &o, "t").unwrap();
        for (l, lf) in f.iter().enumerate() {
            let (a, s, grads) = brute_factors(&model, &train, l);
            let qa = lf.basis.q_a.to_dense().unwrap();
            let qs = lf.basis.q_s.to_dense().unwrap();
            // Whole factors: the kept covariances equal brute force; the basis
            // diagonalises each diagonal block of it.
            let c = &lf.covariances;
            for (got, layout, want, q) in
                [(&c.a, &c.a_layout, &a, &qa), (&c.s, &c.s_layout, &s, &qs)]
            {
                let scale = abs64(want);
                for (blk, (off, len)) in got.iter().zip(&layout.ranges) {
                    let w = want
                        .narrow(0, *off, *len)
                        .unwrap()
                        .narrow(1, *off, *len)
                        .unwrap();
                    let e = diff64(blk, &w);
                    assert!(e <= 1e-5 * scale, "{block:?}/{ckpts} {}: {e}", names[l]);
                    let qb = q
                        .narrow(0, *off, *len)
                        .unwrap()
                        .narrow(1, *off, *len)
                        .unwrap();
                    let qb = qb.to_dtype(candle_core::DType::F64).unwrap();
                    let d = qb.t().unwrap().matmul(&w).unwrap().matmul(&qb).unwrap();
                    let off_diag = (d.clone()
                        - Tensor::eye(*len, candle_core::DType::F64, &Device::Cpu)
                            .unwrap()
                            .mul(&d)
                            .unwrap())
                    .unwrap();
                    assert!(abs64(&off_diag) <= 1e-4 * scale, "{}", names[l]);
                }
            }
            // Λ = mean over documents of (Q_Sᵀ G_m Q_A)².
            let mut want = None::<Tensor>;
            for g in &grads {
                let r = qs.t().unwrap().matmul(g).unwrap().matmul(&qa).unwrap();
                let r2 = r.sqr().unwrap().to_dtype(candle_core::DType::F64).unwrap();
                want = Some(want.map_or(r2.clone(), |x| (x + r2).unwrap()));
            }
            let want = (want.unwrap() / grads.len() as f64).unwrap();
            let e = diff64(&lf.lambda, &want);
            assert!(e <= 1e-4 * abs64(&want), "Λ {}: {e}", names[l]);
        }
        // q, k and v read the same input, so they share one activation basis.
        let find = |suffix: &str| names.iter().position(|n| n.ends_with(suffix)).unwrap();
        let (q, k, v) = (find("q_proj"), find("k_proj"), find("v_proj"));
        for other in [k, v] {
            assert_eq!(f[q].basis.eig_a, f[other].basis.eig_a);
            let d = diff64(
                &f[q].basis.q_a.to_dense().unwrap(),
                &f[other].basis.q_a.to_dense().unwrap(),
            );
            assert_eq!(d, 0.0);
        }
    }
}

#[test]
fn a_model_that_produces_nan_is_refused_naming_checkpoint_layer_and_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaCfg::default();
    let mut tensors = cfg.tensors(7);
    let name = "model.layers.0.mlp.up_proj.weight";
    let w = tensors[name].clone();
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(name.to_string(), nan);
    write_checkpoint(dir.path(), &cfg.config_json(), &tensors);
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let (_d, _, train, _) = setup("llama");
    let err = fit_factors(&[&model], &train, &opts(64, 4), "segment 1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("segment 1 checkpoint 0"), "{err}");
    assert!(err.contains("layer `model.layers.0."), "{err}");
    assert!(err.contains("batch 0"), "{err}");
    assert!(err.contains("non-finite"), "{err}");
}

#[test]
fn captures_kept_for_the_eigenvalue_correction_give_the_same_factors_bitwise() {
    // Two different checkpoints and sampled labels: the correction pass must see exactly
    // the captures of the covariance pass, checkpoint by checkpoint.
    let (dir, model, train, _) = setup("llama");
    let other_dir = tempfile::tempdir().unwrap();
    let l = LlamaCfg::default();
    write_checkpoint(other_dir.path(), &l.config_json(), &l.tensors(8));
    let other = Model::load(other_dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let spill_dir = tempfile::tempdir().unwrap();
    let base = PassOptions {
        fisher: Fisher::True { seed: 5 },
        ..opts(40, 3)
    };
    let kept = PassOptions {
        capture_dir: Some(spill_dir.path().to_path_buf()),
        ..base.clone()
    };
    let _ = source_tda::util::phase::take();
    let a = fit_factors(&[&model, &other], &train, &base, "t").unwrap();
    let read_back = |phases: Vec<(&'static str, f64, u64)>| {
        phases
            .iter()
            .find(|(n, _, _)| *n == "fit: read back captures")
            .map_or(0, |p| p.2)
    };
    assert_eq!(read_back(source_tda::util::phase::take()), 0);
    let b = fit_factors(&[&model, &other], &train, &kept, "t").unwrap();
    assert!(
        read_back(source_tda::util::phase::take()) > 0,
        "the correction read the captures back"
    );
    let bits = |t: &Tensor| -> Vec<u64> {
        let v: Vec<f64> = t
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(bits(&x.lambda), bits(&y.lambda), "{}: Λ", x.name);
        assert_eq!(x.basis.eig_a, y.basis.eig_a, "{}", x.name);
        assert_eq!(
            bits(&x.basis.q_s.to_dense().unwrap()),
            bits(&y.basis.q_s.to_dense().unwrap())
        );
    }
    // The kept captures lived in an unnamed file: nothing is left behind.
    assert_eq!(std::fs::read_dir(spill_dir.path()).unwrap().count(), 0);
    drop(dir);
}
