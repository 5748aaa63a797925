//! GPU benchmark of the project's CUDA kernels (scripts/gpu/gpu-check.sh runs it on the GPU
//! machine). Measures the device's cuBLAS SGEMM rate (f32 and TF32 tensor cores) and copy
//! bandwidth, then times every kernel on the linear-layer shapes of one transformer block of
//! SmolLM2-135M and of Llama-3.2-1B and reports:
//!   - GFLOP/s of each kernel and its fraction of the measured SGEMM rate (the bound for
//!     these compute-bound kernels at these shapes);
//!   - fit tokens/s (covariances of A and S, rotation into the eigenbasis and the eigenvalue
//!     correction, all layers at full depth) and score tokens/s (the fused contraction for
//!     16 queries, all layers), kernels only: the model's forward/backward is not included.
//!
//!   cargo run --release --features cuda-kernels --example cuda_bench   # or dist/cuda/cuda_bench
//!
//! Options: SOURCE_TDA_BENCH_TOKENS (default 8192), SOURCE_TDA_BENCH_QUERIES (default 16).

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
fn main() -> anyhow::Result<()> {
    bench::run()
}

#[cfg(not(any(feature = "cuda", feature = "cuda-kernels")))]
fn main() {
    eprintln!("cuda_bench needs --features cuda-kernels (or cuda)");
    std::process::exit(2);
}

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
mod bench {
    use std::time::Instant;

    use anyhow::{anyhow, Context};
    use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
    use source_tda::backend::cuda::{Gpu, Precision};

    struct Model {
        name: &'static str,
        depth: usize,
        /// (name, d_in, d_out) of the tracked linear layers of one block.
        layers: Vec<(&'static str, usize, usize)>,
    }

    fn llama(name: &'static str, depth: usize, h: usize, kv: usize, inter: usize) -> Model {
        Model {
            name,
            depth,
            layers: vec![
                ("q_proj", h, h),
                ("k_proj", h, kv),
                ("v_proj", h, kv),
                ("o_proj", h, h),
                ("gate_proj", h, inter),
                ("up_proj", h, inter),
                ("down_proj", inter, h),
            ],
        }
    }

    fn env(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Median seconds of `reps` runs of `f` after one warm-up (f synchronises).
    fn time<F: FnMut() -> anyhow::Result<()>>(reps: usize, mut f: F) -> anyhow::Result<f64> {
        f()?;
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps {
            let s = Instant::now();
            f()?;
            t.push(s.elapsed().as_secs_f64());
        }
        t.sort_by(|a, b| a.total_cmp(b));
        Ok(t[reps / 2])
    }

    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// cuBLAS SGEMM rate (FLOP/s) at 8192³, f32 or TF32 tensor-core math.
    fn sgemm_rate(g: &Gpu, tf32: bool) -> anyhow::Result<f64> {
        let n = 8192usize;
        let blas = CudaBlas::new(g.stream().clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        let mode = if tf32 {
            blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: a valid handle and a valid math mode.
        unsafe { blas_sys::cublasSetMathMode(*blas.handle(), mode) }
            .result()
            .map_err(|e| anyhow!("cublasSetMathMode: {e:?}"))?;
        let a = g.upload(&fill(n * n, 1))?;
        let b = g.upload(&fill(n * n, 2))?;
        let mut c = g.zeros::<f32>(n * n)?;
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: n as i32,
            k: n as i32,
            alpha: 1.0f32,
            lda: n as i32,
            ldb: n as i32,
            beta: 0.0f32,
            ldc: n as i32,
        };
        let s = time(5, || {
            // SAFETY: all three buffers are n × n.
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| anyhow!("sgemm: {e:?}"))?;
            Ok(g.synchronize()?)
        })?;
        Ok(2.0 * (n as f64).powi(3) / s)
    }

    fn copy_bandwidth(g: &Gpu) -> anyhow::Result<f64> {
        let n = 256 << 20; // 1 GiB of f32
        let a = g.zeros::<f32>(n)?;
        let mut b = g.zeros::<f32>(n)?;
        let s = time(5, || {
            g.stream()
                .memcpy_dtod(&a, &mut b)
                .map_err(|e| anyhow!("{e:?}"))?;
            Ok(g.synchronize()?)
        })?;
        Ok(2.0 * 4.0 * n as f64 / s)
    }

    pub fn run() -> anyhow::Result<()> {
        let g = Gpu::new(0)?.context("no CUDA device")?;
        println!("device: {} ({})", g.name, g.arch);
        let f32_rate = sgemm_rate(&g, false)?;
        let tf32_rate = sgemm_rate(&g, true)?;
        let bw = copy_bandwidth(&g)?;
        println!(
            "cuBLAS SGEMM 8192³: f32 {:.1} TFLOP/s, TF32 {:.1} TFLOP/s; copy bandwidth {:.0} GB/s",
            f32_rate / 1e12,
            tf32_rate / 1e12,
            bw / 1e9
        );
        let n = env("SOURCE_TDA_BENCH_TOKENS", 8192);
        let queries = env("SOURCE_TDA_BENCH_QUERIES", 16);
        let seq = 512.min(n);
        let docs = n / seq;
        let n = docs * seq;
        println!("tokens {n} ({docs} documents of {seq}), queries {queries}");
        let models = [
            llama("SmolLM2-135M", 30, 576, 192, 1536),
            llama("Llama-3.2-1B", 16, 2048, 512, 8192),
        ];
        let mask = g.upload(&vec![1.0f32; n])?;
        for m in &models {
            println!(
                "\n== {} ({} blocks; one block timed, × depth)",
                m.name, m.depth
            );
            println!(
                "{:<10} {:>6} {:>6} {:<16} {:>9} {:>9} {:>7} {:>7}",
                "layer", "d_in", "d_out", "kernel", "ms", "TFLOP/s", "%f32", "%TF32"
            );
            let (mut fit_s, mut score_s) = (0.0, 0.0);
            for &(name, d_in, d_out) in &m.layers {
                let a = g.upload(&fill(n * d_in, 3))?;
                let d = g.upload(&fill(n * d_out, 4))?;
                let qa = g.upload(&fill(d_in * d_in, 5))?;
                let qs = g.upload(&fill(d_out * d_out, 6))?;
                let u = g.upload(&fill(queries * d_out * d_in, 7))?;
                let lam = g.upload(&vec![0.5f32; d_out * d_in])?;
                let report = |kernel: &str, s: f64, flop: f64| {
                    let r = flop / s;
                    println!(
                        "{:<10} {:>6} {:>6} {:<16} {:>9.3} {:>9.2} {:>6.1}% {:>6.1}%",
                        name,
                        d_in,
                        d_out,
                        kernel,
                        s * 1e3,
                        r / 1e12,
                        100.0 * r / f32_rate,
                        100.0 * r / tf32_rate
                    );
                };
                for p in [Precision::F32, Precision::Tf32] {
                    let tag = if p == Precision::F32 { "" } else { " tf32" };
                    let mut oa = vec![g.zeros::<f32>(d_in * d_in)?];
                    let mut os = vec![g.zeros::<f32>(d_out * d_out)?];
                    let s_cov = time(3, || {
                        g.masked_syrk(&[(&a, d_in)], &mask, &mut oa, p)?;
                        g.masked_syrk(&[(&d, d_out)], &mask, &mut os, p)?;
                        Ok(())
                    })?;
                    let flop_cov = n as f64 * ((d_in * (d_in + 64)) + d_out * (d_out + 64)) as f64;
                    report(&format!("covariance{tag}"), s_cov, flop_cov);
                    let s_rot = time(3, || {
                        g.rotate_rows(&a, &qa, n, d_in, p)?;
                        g.rotate_rows(&d, &qs, n, d_out, p)?;
                        Ok(())
                    })?;
                    report(
                        &format!("rotate{tag}"),
                        s_rot,
                        2.0 * n as f64 * (d_in * d_in + d_out * d_out) as f64,
                    );
                    let mut lam_sum = g.zeros::<f32>(d_out * d_in)?;
                    let s_eig = time(3, || {
                        g.eig_correction(&d, &a, &mask, &mut lam_sum, (docs, seq, d_out, d_in), p)?;
                        Ok(())
                    })?;
                    report(
                        &format!("eig_corr{tag}"),
                        s_eig,
                        2.0 * n as f64 * (d_out * d_in) as f64,
                    );
                    let mut tok = g.zeros::<f32>(queries * n)?;
                    let mut doc = g.zeros::<f32>(queries * docs)?;
                    let s_score = time(3, || {
                        g.score_tokens(
                            &u,
                            &a,
                            &d,
                            &mask,
                            &mut tok,
                            &mut doc,
                            (queries, d_out, d_in, seq),
                            p,
                        )?;
                        Ok(())
                    })?;
                    report(
                        &format!("score{tag}"),
                        s_score,
                        2.0 * (queries * n) as f64 * (d_out * d_in + d_out) as f64,
                    );
                    let s_apply = time(3, || {
                        // The weights W = F(Λ) come from the host; any [d_out, d_in] buffer times it.
                        g.apply_in_basis(&qs, &qa, &lam, &u, (queries, d_out, d_in), p)?;
                        Ok(())
                    })?;
                    report(
                        &format!("apply_fn{tag}"),
                        s_apply,
                        4.0 * queries as f64 * (d_out * d_in) as f64 * (d_in + d_out) as f64,
                    );
                    if p == Precision::F32 {
                        fit_s += s_cov + s_rot + s_eig;
                        score_s += s_score;
                    }
                }
            }
            println!(
                "{}: kernels-only f32 tokens/s at full depth: fit {:.0}, score ({} queries) {:.0}",
                m.name,
                n as f64 / (fit_s * m.depth as f64),
                queries,
                n as f64 / (score_s * m.depth as f64)
            );
        }
        Ok(())
    }
}
