//! GPU parity: every CUDA kernel against its CPU reference (src/cuda/reference.rs, itself
//! tested against the project's CPU code), in each precision. Runs when a CUDA device is
//! present; otherwise each test prints SKIPPED to stderr, and fails instead when
//! SOURCE_TDA_REQUIRE_GPU=1 (scripts/gpu-check.sh sets it, so a GPU run cannot pass by
//! skipping).
//!
//! Tolerances (relative: max |gpu − ref| / max |ref|): f32 1e-5 against the f64 reference;
//! TF32 and bf16 1e-5 against the reference on the same rounded inputs (the kernel's own
//! error) and 1e-2 (TF32) / 3e-2 (bf16) against the f32 inputs (the precision's error).
#![cfg(any(feature = "cuda", feature = "cuda-kernels"))]

use source_tda::attribution::SpectralFn;
use source_tda::cuda::eigh::eigh_gpu;
use source_tda::cuda::gpu::mirror_lower;
use source_tda::cuda::reference as r;
use source_tda::cuda::{Gpu, Precision};

fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(Some(g)) => Some(g),
        Ok(None) => {
            let require = std::env::var("SOURCE_TDA_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !require,
                "{test}: SOURCE_TDA_REQUIRE_GPU=1 but no CUDA device"
            );
            eprintln!("SKIPPED {test}: no CUDA device (set SOURCE_TDA_REQUIRE_GPU=1 to fail)");
            None
        }
        Err(e) => panic!("{test}: a CUDA device is present but unusable: {e}"),
    }
}

/// Deterministic standard-normal-ish numbers (xorshift64*, sum of 4 uniforms).
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.7)
        .collect()
}

fn mask(n: usize) -> Vec<f32> {
    (0..n).map(|k| ((k * 7 + 3) % 5 < 3) as u8 as f32).collect()
}

fn bf16(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| r::to_bf16(v)).collect()
}
fn bf16_back(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| r::from_bf16(r::to_bf16(v))).collect()
}
fn tf32(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| r::round_tf32(v)).collect()
}

fn check(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let err = r::rel_error(got, want);
    eprintln!("{what}: relative error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

#[test]
fn masked_syrk_several_layers_in_one_launch() {
    let Some(g) = gpu("masked_syrk") else { return };
    let n = 300;
    let dims = [130usize, 64, 7];
    let m = mask(n);
    let dm = g.upload(&m).unwrap();
    let xs: Vec<Vec<f32>> = dims
        .iter()
        .enumerate()
        .map(|(l, d)| randn(n * d, l as u64 + 1))
        .collect();
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let mut outs: Vec<_> = dims
            .iter()
            .map(|d| g.zeros::<f32>(d * d).unwrap())
            .collect();
        let got: Vec<Vec<f32>> = if p == Precision::Bf16 {
            let dx: Vec<_> = xs.iter().map(|x| g.upload(&bf16(x)).unwrap()).collect();
            let layers: Vec<_> = dx.iter().zip(dims).collect();
            g.masked_syrk(&layers, &dm, &mut outs, p).unwrap();
            outs.iter().map(|o| g.download(o).unwrap()).collect()
        } else {
            let dx: Vec<_> = xs.iter().map(|x| g.upload(x).unwrap()).collect();
            let layers: Vec<_> = dx.iter().zip(dims).collect();
            g.masked_syrk(&layers, &dm, &mut outs, p).unwrap();
            outs.iter().map(|o| g.download(o).unwrap()).collect()
        };
        for (l, (mut got, d)) in got.into_iter().zip(dims).enumerate() {
            mirror_lower(&mut got, d);
            let exact = r::masked_syrk(&xs[l], &m, n, d);
            let what = format!("masked_syrk {p:?} layer {l} (d {d})");
            match p {
                Precision::F32 => check(&what, &got, &exact, 1e-5),
                Precision::Tf32 => {
                    check(&what, &got, &r::masked_syrk(&tf32(&xs[l]), &m, n, d), 1e-5);
                    check(&what, &got, &exact, p.tolerance());
                }
                Precision::Bf16 => {
                    check(
                        &what,
                        &got,
                        &r::masked_syrk(&bf16_back(&xs[l]), &m, n, d),
                        1e-5,
                    );
                    check(&what, &got, &exact, p.tolerance());
                }
            }
        }
    }
}

#[test]
fn eig_correction_matches_reference() {
    let Some(g) = gpu("eig_correction") else {
        return;
    };
    let (docs, seq, d_out, d_in) = (5, 61, 96, 130);
    let n = docs * seq;
    let dr = randn(n * d_out, 11);
    let ar = randn(n * d_in, 12);
    let m = mask(n);
    let dm = g.upload(&m).unwrap();
    let exact = r::eig_correction(&dr, &ar, &m, docs, seq, d_out, d_in);
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let mut out = g.zeros::<f32>(d_out * d_in).unwrap();
        let shape = (docs, seq, d_out, d_in);
        let (rounded_dr, rounded_ar) = match p {
            Precision::Bf16 => {
                let (x, y) = (g.upload(&bf16(&dr)).unwrap(), g.upload(&bf16(&ar)).unwrap());
                g.eig_correction(&x, &y, &dm, &mut out, shape, p).unwrap();
                (bf16_back(&dr), bf16_back(&ar))
            }
            _ => {
                let (x, y) = (g.upload(&dr).unwrap(), g.upload(&ar).unwrap());
                g.eig_correction(&x, &y, &dm, &mut out, shape, p).unwrap();
                if p == Precision::Tf32 {
                    (tf32(&dr), tf32(&ar))
                } else {
                    (dr.clone(), ar.clone())
                }
            }
        };
        let got = g.download(&out).unwrap();
        let what = format!("eig_correction {p:?}");
        let same = r::eig_correction(&rounded_dr, &rounded_ar, &m, docs, seq, d_out, d_in);
        check(&what, &got, &same, 1e-5);
        check(&what, &got, &exact, p.tolerance());
    }
}

#[test]
fn score_tokens_matches_reference_per_token_and_per_document() {
    let Some(g) = gpu("score_tokens") else { return };
    let (q, d_out, d_in, seq, docs) = (3, 70, 130, 60, 5);
    let n = seq * docs;
    let u = randn(q * d_out * d_in, 21);
    let a = randn(n * d_in, 22);
    let d = randn(n * d_out, 23);
    let m = mask(n);
    let (du, dm) = (g.upload(&u).unwrap(), g.upload(&m).unwrap());
    let (exact_tok, exact_doc) = r::score_tokens(&u, &a, &d, &m, q, d_out, d_in, seq);
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let mut tok = g.zeros::<f32>(q * n).unwrap();
        let mut doc = g.zeros::<f32>(q * docs).unwrap();
        let shape = (q, d_out, d_in, seq);
        let (ru, ra, rd) = match p {
            Precision::Bf16 => {
                let (x, y) = (g.upload(&bf16(&a)).unwrap(), g.upload(&bf16(&d)).unwrap());
                g.score_tokens(&du, &x, &y, &dm, &mut tok, &mut doc, shape, p)
                    .unwrap();
                (u.clone(), bf16_back(&a), bf16_back(&d))
            }
            _ => {
                let (x, y) = (g.upload(&a).unwrap(), g.upload(&d).unwrap());
                g.score_tokens(&du, &x, &y, &dm, &mut tok, &mut doc, shape, p)
                    .unwrap();
                if p == Precision::Tf32 {
                    (tf32(&u), tf32(&a), tf32(&d))
                } else {
                    (u.clone(), a.clone(), d.clone())
                }
            }
        };
        let (gt, gd) = (g.download(&tok).unwrap(), g.download(&doc).unwrap());
        let (st, sd) = r::score_tokens(&ru, &ra, &rd, &m, q, d_out, d_in, seq);
        check(&format!("score_tokens {p:?} per token"), &gt, &st, 1e-5);
        check(&format!("score_tokens {p:?} per document"), &gd, &sd, 1e-5);
        check(
            &format!("score_tokens {p:?} per token vs f32"),
            &gt,
            &exact_tok,
            p.tolerance(),
        );
        check(
            &format!("score_tokens {p:?} per doc vs f32"),
            &gd,
            &exact_doc,
            p.tolerance(),
        );
    }
}

#[test]
fn apply_in_basis_matches_reference_for_every_function() {
    let Some(g) = gpu("apply_in_basis") else {
        return;
    };
    let (q, d_out, d_in) = (3, 70, 130);
    // Orthonormal bases from the CPU eigendecomposition of random covariances.
    let basis = |d: usize, seed: u64| -> Vec<f32> {
        let x = randn(2 * d * d, seed);
        let c = r::masked_syrk(&x, &vec![1.0; 2 * d], 2 * d, d);
        let t = candle_core::Tensor::from_vec(c, (d, d), &candle_core::Device::Cpu).unwrap();
        let e = source_tda::curvature::eigh(&t, "test").unwrap();
        e.vectors.iter().map(|&v| v as f32).collect()
    };
    let (qs, qa) = (basis(d_out, 31), basis(d_in, 32));
    let lambda: Vec<f32> = randn(d_out * d_in, 33)
        .iter()
        .map(|v| v * v * 0.5)
        .collect();
    let v = randn(q * d_out * d_in, 34);
    let (dqs, dqa, dl, dv) = (
        g.upload(&qs).unwrap(),
        g.upload(&qa).unwrap(),
        g.upload(&lambda).unwrap(),
        g.upload(&v).unwrap(),
    );
    for f in [
        SpectralFn::Propagate { s: 0.7 },
        SpectralFn::Inject { s: 0.7 },
        SpectralFn::Inverse { damping: 1e-2 },
        SpectralFn::Identity,
    ] {
        let want = r::apply_in_basis(&qs, &qa, &lambda, &v, f, d_out, d_in);
        for p in [Precision::F32, Precision::Tf32] {
            let out = g
                .apply_in_basis(&dqs, &dqa, &dl, &dv, (q, d_out, d_in), f, p)
                .unwrap();
            let got = g.download(&out).unwrap();
            check(
                &format!("apply_in_basis {f:?} {p:?}"),
                &got,
                &want,
                p.tolerance(),
            );
        }
    }
}

#[test]
fn gpu_eigh_matches_cpu_eigh_in_f64() {
    let Some(g) = gpu("eigh") else { return };
    let d = 200;
    let x = randn(3 * d * d, 41);
    let c = r::masked_syrk(&x, &vec![1.0; 3 * d], 3 * d, d);
    let t = candle_core::Tensor::from_vec(c.clone(), (d, d), &candle_core::Device::Cpu).unwrap();
    let cpu = source_tda::curvature::eigh(&t, "test").unwrap();
    let gpu = eigh_gpu(&g, &c, d, "test").unwrap();
    let top = cpu.values[d - 1];
    for (a, b) in gpu.values.iter().zip(&cpu.values) {
        assert!((a - b).abs() <= 1e-10 * top, "eigenvalue {a} vs {b}");
    }
    // Reconstruction Q diag(λ) Qᵀ = C (sign-invariant).
    let mut err = 0.0f64;
    for i in 0..d {
        for j in 0..d {
            let s: f64 = (0..d)
                .map(|k| gpu.vectors[i * d + k] * gpu.values[k] * gpu.vectors[j * d + k])
                .sum();
            err = err.max((s - c[i * d + j]).abs());
        }
    }
    eprintln!(
        "eigh f64: reconstruction error {:.3e} (relative to λ_max)",
        err / top
    );
    assert!(err <= 1e-10 * top);
    // A NaN is rejected before cuSOLVER sees it, naming the factor.
    let mut bad = c.clone();
    bad[5] = f64::NAN;
    let e = eigh_gpu(&g, &bad, d, "layer 3 A").unwrap_err().to_string();
    assert!(e.contains("layer 3 A") && e.contains("NaN"));
}

#[test]
fn mismatched_shapes_are_errors_not_crashes() {
    let Some(g) = gpu("shapes") else { return };
    let a = g.upload(&randn(10 * 4, 1)).unwrap();
    let m = g.upload(&mask(10)).unwrap();
    let mut out = g.zeros::<f32>(9).unwrap();
    let e = g
        .masked_syrk(
            &[(&a, 4)],
            &m,
            std::slice::from_mut(&mut out),
            Precision::F32,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("masked_syrk layer 0"), "{e}");
    let mut out = g.zeros::<f32>(16).unwrap();
    let e = g
        .masked_syrk(
            &[(&a, 4)],
            &m,
            std::slice::from_mut(&mut out),
            Precision::Bf16,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("Bf16"), "{e}");
}
