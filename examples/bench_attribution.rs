//! Our side of `scripts/bench/vs-kronfluence.sh`: the influence method (EK-FAC, empirical
//! Fisher, damping 0.1 × mean Λ per layer) on the exact token ids of a workload file, stage
//! by stage, with wall time and peak RSS of each (the peak is reset between stages through
//! `/proc/self/clear_refs`).
//!
//! ```text
//! cargo run --release --example bench_attribution -- MODEL_DIR INPUTS.safetensors OUT_DIR [BATCH [TOKENS]]
//! ```
//!
//! INPUTS holds `{train,query}_{input_ids,attention_mask,labels}` (int64, right-padded rows,
//! labels −100 where a token is not a target: the kronfluence reference pack's layout).
//! OUT_DIR receives `factors.safetensors` (written by the fit stage, read by the scoring
//! stages layer by layer, as the pipeline does), `scores.safetensors` (`pairwise` [Q, N], `per_token` [Q, N, T], f32)
//! and `report.json` (seconds, peak RSS and predicted peak per stage).
//!
//! `BENCH_FIT_ONLY=1` stops after the fit; `BENCH_SCORE_ONLY=1` reuses OUT_DIR's factors
//! (when present) and runs one pass of pairwise and per-token scores (both for profiling).
//! `BENCH_ONE_PASS=1` runs only the `pairwise_and_per_token` pass after the fit (its scores
//! stand for all three). `BENCH_EIGEN=f32` runs the factor eigendecompositions in f32 (`[attribution] eigendecomposition`).
//! `BENCH_RECOMPUTE_CAPTURES=1` makes the fit's eigenvalue correction run the model again
//! instead of reading back the covariance pass's captures (`PassOptions::capture_dir`).
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT=25000` restores candle's default spinning of its elementwise workers
//! (this binary, like the CLI, sets 0 when the variable is unset: see `util::threads`).
//!
//! Stages, as kronfluence runs them: `fit` (covariances, eigendecomposition, Λ), `pairwise`
//! (query gradients + one scoring pass), `per_token` (the same with per-token scores), and
//! `pairwise_and_per_token` (both from one pass: what the `score` stage does).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use source_tda::attribution::{
    precondition_inverse, precondition_inverse_factored, query_gradients, score_pass, Damping,
};
use source_tda::config::EigenPrecision;
use source_tda::curvature::{fit_factors, save_factors, FactorFile};
use source_tda::data::PreparedDoc;
use source_tda::model::{memory, LoadOptions, Model};
use source_tda::passes::{Fisher, PassOptions};
use source_tda::util::{mem, phase};

fn i64_tensor(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("inputs: tensor `{name}`: {e:?}"));
    let v = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

/// Rows of `{split}_input_ids` as documents: real tokens only, loss targets from the labels.
fn docs(st: &safetensors::SafeTensors, split: &str) -> (Vec<PreparedDoc>, usize) {
    let (shape, ids) = i64_tensor(st, &format!("{split}_input_ids"));
    let (_, attn) = i64_tensor(st, &format!("{split}_attention_mask"));
    let (_, labels) = i64_tensor(st, &format!("{split}_labels"));
    let (rows, len) = (shape[0], shape[1]);
    let docs = (0..rows)
        .map(|r| {
            let n = (0..len).filter(|&t| attn[r * len + t] == 1).count();
            PreparedDoc {
                doc_id: format!("{split}-{r}"),
                text: String::new(),
                prompt: None,
                completion: None,
                input_ids: (0..n).map(|t| ids[r * len + t] as u32).collect(),
                loss_mask: (0..n)
                    .map(|t| (t > 0 && labels[r * len + t] != -100) as u8)
                    .collect(),
                truncated_tokens: 0,
                source: format!("{split}:{r}"),
            }
        })
        .collect();
    (docs, len)
}

struct Stage {
    name: &'static str,
    seconds: f64,
    cpu_seconds: f64,
    peak: u64,
}

/// User + system CPU seconds of this process (all threads), from /proc/self/stat (fields 14
/// and 15, in clock ticks of 1/100 s). Robust to other processes competing for the cores,
/// unlike wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // After the command name: state is field 3, utime field 14, stime field 15.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn timed<T>(name: &'static str, out: &mut Vec<Stage>, f: impl FnOnce() -> T) -> T {
    mem::reset_peak_rss();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let v = f();
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds() - c0;
    let peak = mem::peak_rss_bytes().unwrap_or(0);
    eprintln!(
        "bench_attribution: {name}: {seconds:.2} s ({cpu_seconds:.2} CPU s), peak RSS {}",
        mem::human_bytes(peak)
    );
    for (phase, secs, n) in phase::take() {
        eprintln!("bench_attribution:   {phase}: {secs:.2} s ({n}×)");
    }
    out.push(Stage {
        name,
        seconds,
        cpu_seconds,
        peak,
    });
    v
}

fn main() {
    // As the CLI does (candle's elementwise workers sleep instead of spinning).
    source_tda::util::threads::configure_for_compute();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: bench_attribution MODEL_DIR INPUTS.safetensors OUT_DIR [BATCH [TOKENS]]");
        std::process::exit(2);
    }
    let (model_dir, inputs, out) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let batch: usize = args.get(3).map_or(8, |b| b.parse().expect("BATCH"));
    // Documents per batch at most BATCH (kronfluence's batch size), and at most TOKENS
    // tokens (default 256): the same documents and tokens, in batches whose autograd graph
    // (about 4 MiB per token on SmolLM2-135M) stays small.
    let tokens: usize = args.get(4).map_or(256, |t| t.parse().expect("TOKENS"));
    std::fs::create_dir_all(&out).expect("OUT_DIR");
    let bytes = std::fs::read(&inputs).expect("inputs file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("inputs: safetensors");
    let (train, max_len) = docs(&st, "train");
    let (queries, _) = docs(&st, "query");
    let opts = PassOptions {
        fisher: Fisher::Empirical,
        block_size: None,
        token_budget: tokens.max(max_len),
        max_batch_size: batch,
        pad_id: 2,
        eigen_precision: match std::env::var("BENCH_EIGEN").as_deref() {
            Ok("f32") => EigenPrecision::F32,
            Ok("f64") | Err(_) => EigenPrecision::F64,
            Ok(other) => panic!("BENCH_EIGEN={other}: expected f32 or f64"),
        },
        // As the fit stage does (its staging folder there).
        capture_dir: match std::env::var("BENCH_RECOMPUTE_CAPTURES").as_deref() {
            Ok("1") => None,
            _ => Some(out.clone()),
        },
    };
    let dev = Device::Cpu;
    let mut stages = Vec::new();
    let model = timed("load", &mut stages, || {
        Model::load(&model_dir, &LoadOptions::default(), &dev).expect("model")
    });
    let predicted_fit = memory::fit_peak_bytes(
        &model,
        opts.token_budget,
        opts.block_size,
        opts.fisher.labels(),
        opts.capture_dir.is_some(),
    );
    let predicted_score = memory::score_peak_bytes(&model, opts.token_budget, queries.len(), true);
    eprintln!(
        "bench_attribution: predicted peak memory: fit {}, score {}",
        mem::human_bytes(predicted_fit),
        mem::human_bytes(predicted_score)
    );
    // As the pipeline (and kronfluence) do: fit writes the factors to disk; each scoring
    // pass reads them back one layer at a time while preconditioning the query gradients.
    let factor_path = out.join("factors.safetensors");
    let score_only = std::env::var("BENCH_SCORE_ONLY").is_ok_and(|v| v == "1");
    if score_only && factor_path.exists() {
        eprintln!(
            "bench_attribution: BENCH_SCORE_ONLY=1: reusing {}",
            factor_path.display()
        );
    } else {
        timed("fit", &mut stages, || {
            let factors = fit_factors(&[&model], &train, &opts, "bench").expect("fit");
            let _t = phase::timer("fit: write factors");
            save_factors(&factor_path, &factors, &serde_json::json!({})).expect("save factors");
        });
    }
    let score = |keep_tokens: bool| {
        let qg = query_gradients(&model, &queries, &opts).expect("queries");
        let file = FactorFile::open(&factor_path).expect("factors");
        let names: Vec<String> = file.layer_names().map(str::to_string).collect();
        // BENCH_DENSE_QUERIES=1: rotate the dense query gradients (the form before the
        // token-factored one), for a side-by-side timing.
        let dense = std::env::var("BENCH_DENSE_QUERIES").is_ok_and(|v| v == "1");
        let u: Vec<Tensor> = qg
            .layers
            .into_iter()
            .zip(qg.factors)
            .zip(&names)
            .map(|((g, tf), name)| {
                let f = {
                    let _t = phase::timer("precondition: read factors");
                    file.load_layers(std::slice::from_ref(name), &dev)
                        .expect("layer")
                };
                let _t = phase::timer("precondition");
                let damping = Damping::MeanLambda(0.1);
                if dense {
                    precondition_inverse(&f, &[g], damping)
                } else {
                    precondition_inverse_factored(&f, &[tf], damping)
                }
                .expect("precondition")
                .pop()
                .expect("one layer")
            })
            .collect();
        score_pass(&model, &train, &u, &opts, keep_tokens).expect("score")
    };
    if std::env::var("BENCH_FIT_ONLY").is_ok_and(|v| v == "1") {
        eprintln!("bench_attribution: BENCH_FIT_ONLY=1: stopping after the fit");
        return;
    }
    if score_only {
        timed("pairwise_and_per_token", &mut stages, || score(true));
        eprintln!("bench_attribution: BENCH_SCORE_ONLY=1: stopping after one scoring pass");
        return;
    }
    // BENCH_ONE_PASS=1: only the pass the score stage runs (both kinds of score at once).
    let one_pass = std::env::var("BENCH_ONE_PASS").is_ok_and(|v| v == "1");
    let pairwise = (!one_pass).then(|| timed("pairwise", &mut stages, || score(false)));
    let per_token = (!one_pass).then(|| timed("per_token", &mut stages, || score(true)));
    let both = timed("pairwise_and_per_token", &mut stages, || score(true));
    let pairwise = pairwise.as_ref().unwrap_or(&both);
    let per_token = per_token.as_ref().unwrap_or(&both);

    let (q, n) = (queries.len(), train.len());
    let flat_pairs: Vec<f32> = pairwise.docs.iter().flatten().map(|&v| v as f32).collect();
    let both_pairs: Vec<f32> = both.docs.iter().flatten().map(|&v| v as f32).collect();
    let mut tok = vec![0f32; q * n * max_len];
    let per_doc = per_token.tokens.as_ref().expect("tokens");
    for (m, per_q) in per_doc.iter().enumerate() {
        for (qi, row) in per_q.iter().enumerate() {
            tok[(qi * n + m) * max_len..][..row.len()].copy_from_slice(row);
        }
    }
    let tensors: HashMap<String, Tensor> = [
        ("pairwise", Tensor::from_vec(flat_pairs, (q, n), &dev)),
        (
            "pairwise_from_token_pass",
            Tensor::from_vec(both_pairs, (q, n), &dev),
        ),
        ("per_token", Tensor::from_vec(tok, (q, n, max_len), &dev)),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t.expect("tensor")))
    .collect();
    candle_core::safetensors::save(&tensors, out.join("scores.safetensors")).expect("save");
    let mut report = serde_json::Map::new();
    for s in &stages {
        report.insert(
            s.name.into(),
            serde_json::json!({"seconds": s.seconds, "cpu_seconds": s.cpu_seconds,
                "peak_rss_bytes": s.peak}),
        );
    }
    report.insert(
        "predicted_peak_bytes".into(),
        serde_json::json!({"fit": predicted_fit, "score": predicted_score}),
    );
    report.insert(
        "workload".into(),
        serde_json::json!({
            "train_docs": n, "queries": q,
            "train_tokens": train.iter().map(|d| d.n_tokens()).sum::<usize>(),
            "tracked_layers": model.tracked_layers().len(), "batch": batch,
            "token_budget": opts.token_budget,
            "rayon_threads": std::env::var("RAYON_NUM_THREADS").ok(),
            "eigendecomposition": opts.eigen_precision.name(),
        }),
    );
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("report");
}
