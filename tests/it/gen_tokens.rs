//! Per-generated-token gradients (issue 25 item 2) on a tiny random Llama, against
//! independent truth: each token's log p equals log_softmax of one full-sequence forward
//! pass, the tokens' gradients add up to the whole completion's (computed on the full
//! sequence by the query gradients), and one token's gradient equals central differences of
//! −log p(y_j | prefix) evaluated on the full sequence, along a random direction per tracked
//! layer (f32; h = 1e-2, tolerance 1% + 1.5e-3 as in model_finite_diff).

use crate::common::model_fixtures::*;

use candle_core::{Device, IndexOp, Tensor, D};
use source_tda::attribution::{gen_token_gradients, query_gradients};
use source_tda::data::PreparedDoc;
use source_tda::model::{LoadOptions, Model};
use source_tda::passes::{Fisher, PassOptions};

fn opts(budget: usize) -> PassOptions {
    PassOptions {
        fisher: Fisher::Empirical,
        block_size: None,
        token_budget: budget,
        max_batch_size: 64,
        pad_id: 0,
        eigen_precision: Default::default(),
        capture_dir: None,
    }
}

fn query(id: &str, ids: Vec<u32>, prompt_len: usize) -> PreparedDoc {
    let n = ids.len();
    PreparedDoc {
        doc_id: id.into(),
        text: String::new(),
        prompt: None,
        completion: None,
        loss_mask: (0..n).map(|t| u8::from(t >= prompt_len)).collect(),
        input_ids: ids,
        truncated_tokens: 0,
        source: "test:1".into(),
    }
}

/// −log p(ids[pos] | ids[..pos]) from one forward pass over the whole of `ids`.
fn nll_at(model: &Model, ids: &[u32], pos: usize) -> f64 {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x).unwrap().i((0, pos - 1)).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    -(lsm
        .i(ids[pos] as usize)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64)
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn token_gradients_sum_to_the_completion_and_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaCfg::default();
    write_checkpoint(dir.path(), &cfg.config_json(), &cfg.tensors(5));
    let model = Model::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(9);
    let queries = vec![
        query("a", rng.tokens(9, cfg.vocab), 5),
        query("b", rng.tokens(6, cfg.vocab), 3),
    ];
    // A small budget: the 7 prefix copies run in several batches.
    let g = gen_token_gradients(&model, &queries, &opts(24)).unwrap();
    assert_eq!(g.tokens.len(), 4 + 3);
    let whole = query_gradients(&model, &queries, &opts(256)).unwrap();

    // log p per token against one full forward; Σ_j log p_j = −f(q).
    for (k, t) in g.tokens.iter().enumerate() {
        let want = -nll_at(&model, &queries[t.query].input_ids, t.position);
        assert!(
            (g.logprobs[k] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "token {k}: {} vs {want}",
            g.logprobs[k]
        );
    }
    for (qi, f) in whole.measurements.iter().enumerate() {
        let sum: f64 = g
            .tokens
            .iter()
            .zip(&g.logprobs)
            .filter(|(t, _)| t.query == qi)
            .map(|(_, &l)| l as f64)
            .sum();
        assert!(
            (sum + *f as f64).abs() <= 1e-4 * f.abs() as f64,
            "{sum} vs {f}"
        );
    }

    // Σ_j ∇f_j = ∇f(q), per layer and query.
    for (l, (per_tok, all)) in g.layers.iter().zip(&whole.layers).enumerate() {
        for qi in 0..queries.len() {
            let rows: Vec<u32> = (0..g.tokens.len() as u32)
                .filter(|&k| g.tokens[k as usize].query == qi)
                .collect();
            let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            let sum = per_tok.index_select(&idx, 0).unwrap().sum(0).unwrap();
            let want = all.get(qi).unwrap();
            let err = max_abs_diff(&sum, &want);
            assert!(
                err <= 1e-4 * max_abs(&want).max(1e-6),
                "layer {l} query {qi}: max |Σ_j g_j − g| = {err}"
            );
        }
    }

    // One token (query a's third generated token) against central differences of its own
    // −log p on the full sequence, layer by layer.
    let k = 2;
    let t = g.tokens[k];
    assert_eq!((t.query, t.gen_index), (0, 2));
    let ids = &queries[0].input_ids;
    let h = 1e-2;
    let mut checked = 0;
    for (l, info) in model.tracked_layers().iter().enumerate() {
        let name = format!("{}.weight", info.name);
        let p = model.params().iter().find(|p| p.name == name).unwrap();
        let w0 = p.var.as_tensor().copy().unwrap();
        let dir = randn(&mut rng, w0.dims(), 0.0, 1.0);
        let dir = (&dir / dot(&dir, &dir).sqrt()).unwrap();
        let grad = g.layers[l].get(k).unwrap();
        let grad = grad.narrow(1, 0, info.d_in).unwrap(); // without a bias column
        let analytic = dot(&grad, &dir);
        p.var.set(&(&w0 + (&dir * h).unwrap()).unwrap()).unwrap();
        let plus = nll_at(&model, ids, t.position);
        p.var.set(&(&w0 - (&dir * h).unwrap()).unwrap()).unwrap();
        let minus = nll_at(&model, ids, t.position);
        p.var.set(&w0).unwrap();
        let fd = (plus - minus) / (2.0 * h);
        assert!(
            (fd - analytic).abs() <= 0.01 * analytic.abs() + 1.5e-3,
            "{}: finite difference {fd} vs per-token gradient {analytic}",
            info.name
        );
        checked += 1;
    }
    assert!(checked >= 7, "{checked}");
}
