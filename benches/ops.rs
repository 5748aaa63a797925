//! Achieved GFLOP/s of each hot operation of fit and score at SmolLM2-135M shapes (hidden 576,
//! MLP 1536, k/v 192, vocab 49152), next to this machine's f32 GEMM rate measured by the same
//! harness in the same run (candle's matmul, and faer's f32/f64 GEMM).
//!
//! ```text
//! cargo bench --bench ops -- [--tokens 1024] [--reps 3] [--layers 4]
//! ```
//!
//! Every operation runs `reps` times after one warm-up; the best time counts (the machine's
//! speed drifts). FLOP counts are nominal: 2·m·n·k per matrix product, 10/3·n³ for a symmetric
//! eigendecomposition with vectors (tridiagonalisation 4/3·n³ + back-transformation 2·n³),
//! 4·tokens·(tracked weights + head) for a capture (forward, and the backward to the inputs of
//! every linear layer: a capture forms no weight gradients).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use source_tda::config::EigenPrecision;
use source_tda::linalg::{apply_in_basis, token_scores};
use source_tda::linalg::{eigh, eigh_f64_with, eigh_with, CovarianceSums, EigenBasis, LambdaSums};
use source_tda::model::{Labels, LoadOptions, Model, ModelSpec, TensorMap, TokenBatch};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Best seconds of `reps` runs of `f` after one warm-up.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn row(what: &str, shape: &str, flops: f64, secs: f64, gemm: f64) {
    let g = flops / secs / 1e9;
    println!(
        "| {what} | {shape} | {:.2} | {g:.1} | {:.0}% |",
        secs * 1e3,
        100.0 * g / gemm
    );
}

fn smollm2(layers: usize, dev: &Device) -> Model {
    let (d, f, v, kv) = (576usize, 1536usize, 49152usize, 192usize);
    let spec = ModelSpec::from_json(&json!({
        "model_type": "llama", "hidden_size": d, "intermediate_size": f, "vocab_size": v,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 8192}))
    .expect("spec");
    let mut m = HashMap::new();
    let mut put = |n: String, shape: &[usize], std: f32| {
        let t = if std == 0.0 {
            Tensor::ones(shape, DType::F32, dev)
        } else {
            Tensor::randn(0f32, std, shape, dev)
        };
        m.insert(n, t.expect("weights"));
    };
    put("model.embed_tokens.weight".into(), &[v, d], 0.02);
    put("model.norm.weight".into(), &[d], 0.0);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[d], 0.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[d], 0.0);
        for (n, o, i_) in [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", kv, d),
            ("self_attn.v_proj", kv, d),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", f, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ] {
            put(format!("{p}.{n}.weight"), &[o, i_], 0.02);
        }
    }
    Model::from_source(&spec, &TensorMap(m), &LoadOptions::default(), dev).expect("model")
}

fn main() {
    // As the CLI does (candle's elementwise workers sleep instead of spinning).
    source_tda::util::threads::configure_for_compute();
    let args: Vec<String> = std::env::args().collect();
    let n: usize = arg(&args, "--tokens", "1024").parse().expect("--tokens");
    let reps: usize = arg(&args, "--reps", "3").parse().expect("--reps");
    let layers: usize = arg(&args, "--layers", "4").parse().expect("--layers");
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).expect("randn");

    // Reference GEMM rates: [n, 576] × [576, 1536] (an MLP projection of the batch).
    let (k, m) = (576usize, 1536usize);
    let (x, w) = (rand(&[n, k]), rand(&[k, m]));
    let gemm_flops = 2.0 * (n * k * m) as f64;
    let t_candle = best(reps, || {
        x.matmul(&w).expect("matmul");
    });
    let gemm = gemm_flops / t_candle / 1e9;
    let fa = faer::Mat::<f32>::from_fn(n, k, |i, j| ((i * 7 + j * 3) % 11) as f32 - 5.0);
    let fb = faer::Mat::<f32>::from_fn(k, m, |i, j| ((i * 5 + j) % 13) as f32 - 6.0);
    let t_faer32 = best(reps, || {
        std::hint::black_box(&fa * &fb);
    });
    let da = faer::Mat::<f64>::from_fn(n, k, |i, j| ((i * 7 + j * 3) % 11) as f64 - 5.0);
    let db = faer::Mat::<f64>::from_fn(k, m, |i, j| ((i * 5 + j) % 13) as f64 - 6.0);
    let t_faer64 = best(reps, || {
        std::hint::black_box(&da * &db);
    });
    println!(
        "threads: rayon {} (RAYON_NUM_THREADS={:?}); tokens per batch {n}; best of {reps}\n",
        rayon_threads(),
        std::env::var("RAYON_NUM_THREADS").ok()
    );
    println!("| operation | shape | ms | GFLOP/s | of f32 GEMM |");
    println!("|---|---|---|---|---|");
    let shape = format!("[{n},{k}]×[{k},{m}]");
    row("GEMM f32 (candle)", &shape, gemm_flops, t_candle, gemm);
    row("GEMM f32 (faer)", &shape, gemm_flops, t_faer32, gemm);
    row("GEMM f64 (faer)", &shape, gemm_flops, t_faer64, gemm);

    // Capture: forward + backward of a SmolLM2-shaped model on one batch.
    let model = smollm2(layers, &dev);
    let (b, t) = (8usize, n / 8);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t)
                .map(|i| ((r * 131 + i * 17) % 49152) as u32)
                .collect()
        })
        .collect();
    // Every token is a target except the first (it has no context).
    let masks: Vec<Vec<u8>> = ids
        .iter()
        .map(|r| (0..r.len()).map(|i| (i > 0) as u8).collect())
        .collect();
    let pairs: Vec<(&[u32], &[u8])> = ids
        .iter()
        .zip(&masks)
        .map(|(i, m)| (i.as_slice(), m.as_slice()))
        .collect();
    let batch = TokenBatch::new(&pairs, 0, None, &dev).expect("batch");
    let tracked: usize = model
        .tracked_layers()
        .iter()
        .map(|l| l.d_in * l.d_out)
        .sum();
    let capture_flops = 4.0 * (b * t) as f64 * (tracked + 576 * 49152) as f64;
    let mut cap = None;
    let t_cap = best(reps.min(2), || {
        cap = Some(model.capture(&batch, Labels::Data).expect("capture"));
    });
    row(
        "capture (fwd+bwd)",
        &format!("{layers} layers, {b}×{t}"),
        capture_flops,
        t_cap,
        gemm,
    );
    let logits_flops = 2.0 * 3.0 * (b * t * 576 * 49152) as f64;
    let h = rand(&[b * t, 576]);
    let emb = rand(&[49152, 576]);
    let t_head = best(reps, || {
        let l = h.matmul(&emb.t().expect("t")).expect("logits");
        let g = l.matmul(&emb).expect("dx");
        std::hint::black_box(l.t().expect("t").matmul(&h).expect("dW"));
        std::hint::black_box(g);
    });
    row(
        "head GEMMs alone (logits, dx, dW)",
        &format!("[{},576]×[576,49152]", b * t),
        logits_flops,
        t_head,
        gemm,
    );

    // Per-layer factor work at the widest layer (down_proj: d_in 1536, d_out 576).
    let (din, dout) = (1536usize, 576usize);
    let a = rand(&[n, din]);
    let d = rand(&[n, dout]);
    let mut sums = CovarianceSums::new(din, dout, None, &dev).expect("sums");
    let t_cov = best(reps, || sums.add(&a, &d).expect("cov"));
    row(
        "covariance A, S accumulation (one triangle)",
        &format!("{n} tok, {din}/{dout}"),
        n as f64 * (din * (din + 1) + dout * (dout + 1)) as f64,
        t_cov,
        gemm,
    );
    let cov = sums.normalized().expect("normalized");
    let t_eig = best(reps.min(2), || {
        eigh(&cov.a[0], "bench").expect("eigh");
    });
    row(
        "eigendecomposition f64 (faer)",
        &format!("{din}×{din}"),
        10.0 / 3.0 * (din as f64).powi(3),
        t_eig,
        gemm,
    );
    let a0: Vec<f64> = cov.a[0]
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("f64");
    let t_eig32 = best(reps.min(2), || {
        eigh_with(&a0, din, "bench", faer::Par::rayon(0), EigenPrecision::F32).expect("eigh");
    });
    row(
        "eigendecomposition f32 (faer; `eigendecomposition = \"f32\"`)",
        &format!("{din}×{din}"),
        10.0 / 3.0 * (din as f64).powi(3),
        t_eig32,
        gemm,
    );
    // Several decompositions (a fit has hundreds): one after another with every thread each,
    // or side by side with one thread each.
    let jobs = 4usize;
    let mats: Vec<Vec<f64>> = (0..jobs)
        .map(|_| {
            cov.a[0]
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("f64")
        })
        .collect();
    let t_seq = best(1, || {
        for m in &mats {
            eigh_f64_with(m, din, "bench", faer::Par::rayon(0)).expect("eigh");
        }
    });
    let t_side = best(1, || {
        use rayon::prelude::*;
        mats.par_iter()
            .for_each(|m| drop(eigh_f64_with(m, din, "bench", faer::Par::Seq).expect("eigh")));
    });
    let t_nested = best(1, || {
        use rayon::prelude::*;
        mats.par_iter()
            .for_each(|m| drop(eigh_f64_with(m, din, "bench", faer::Par::rayon(0)).expect("eigh")));
    });
    let eig_flops = jobs as f64 * 10.0 / 3.0 * (din as f64).powi(3);
    let what = format!("{jobs}× {din}×{din}");
    row(
        "  · one after another, all threads each",
        &what,
        eig_flops,
        t_seq,
        gemm,
    );
    row(
        "  · side by side, one thread each",
        &what,
        eig_flops,
        t_side,
        gemm,
    );
    row(
        "  · side by side, all threads each",
        &what,
        eig_flops,
        t_nested,
        gemm,
    );
    let basis = EigenBasis::from_covariances(&cov, "bench", &dev).expect("basis");
    let a3 = a.reshape((b, t, din)).expect("a3");
    let d3 = d.reshape((b, t, dout)).expect("d3");
    let mask = Tensor::ones((b, t), DType::F32, &dev).expect("mask");
    let mut lam = LambdaSums::new(dout, din, &dev).expect("lambda");
    let t_lam = best(reps, || {
        lam.add_batch(&basis, &a3, &d3, &mask).expect("lambda")
    });
    row(
        "eigenvalue correction (Λ pass)",
        &format!("{b}×{t} tok, {din}/{dout}"),
        2.0 * n as f64 * (din * din + dout * dout + din * dout) as f64,
        t_lam,
        gemm,
    );
    let q = 4usize;
    let v = rand(&[q, dout, din]);
    let wts = rand(&[dout, din]);
    let t_apply = best(reps, || {
        apply_in_basis(&basis, &wts, &v).expect("apply");
    });
    row(
        "eigenbasis function application",
        &format!("{q}×[{dout},{din}]"),
        4.0 * q as f64 * (dout * din * (din + dout)) as f64,
        t_apply,
        gemm,
    );
    let t_score = best(reps, || {
        token_scores(&v, &a3, &d3, &mask).expect("score");
    });
    row(
        "scoring contraction (per token)",
        &format!("{q} q, {b}×{t} tok, {din}/{dout}"),
        2.0 * (q * n * din * dout) as f64,
        t_score,
        gemm,
    );
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
