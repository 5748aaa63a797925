//! The attribution engine on tiny random models: the scoring pass equals the per-document
//! gradient inner products, per-token scores add up to document scores, and factors and
//! scores do not depend on batch size, query batching, block layout of whole factors, or
//! duplicated checkpoints.

#[path = "common/model_fixtures.rs"]
mod fixtures;

use candle_core::{Device, Tensor};
use fixtures::*;
use source_tda::attribution::{
    apply_in_basis, query_gradients, score_pass, spectral_weights, SpectralFn,
};
use source_tda::curvature::{fit_factors, Fisher, FitOptions};
use source_tda::data::PreparedDoc;
use source_tda::model::{Labels, LoadOptions, Model, TokenBatch};

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

fn opts(budget: usize, max_batch: usize) -> FitOptions {
    FitOptions {
        fisher: Fisher::Empirical,
        block_size: None,
        token_budget: budget,
        max_batch_size: max_batch,
        pad_id: 0,
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
    let run = |o: &FitOptions, ckpts: &[&Model]| -> Vec<Vec<f64>> {
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
        let o = FitOptions {
            fisher,
            block_size: block,
            ..opts(64, 4)
        };
        fit_factors(&[&model], &train, &o, "t").unwrap()
    };
    let lam = |f: &[source_tda::curvature::LayerFactors]| -> Vec<f64> {
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
