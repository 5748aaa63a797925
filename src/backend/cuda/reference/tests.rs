//! Tests for the kernels' CPU references (reference.rs) against the project's CPU code.
//! Layer: backend (tests) — may import the ground and linalg; uses its parent reference.rs and
//! linalg's test_support.rs.
//!
//! The CPU references against the project's own CPU code (the math the kernels must match)
//! and against exact values.

use super::*;
use crate::linalg::test_support::random_factors;
use crate::linalg::{masked_rows, token_scores, CovarianceSums, LambdaSums};
use candle_core::{DType, Device, Tensor};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Half the tokens masked, in a pattern that is not aligned with documents.
fn mask(b: usize, t: usize) -> Vec<f32> {
    (0..b * t)
        .map(|k| ((k * 7 + 3) % 5 < 3) as u8 as f32)
        .collect()
}

fn assert_close(got: &[f64], want: &[f32], tol: f64, what: &str) {
    let err = rel_error(want, got);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

#[test]
fn masked_syrk_equals_covariance_sums() {
    let (b, t, d) = (3, 5, 7);
    let x = randn(&[b, t, d]);
    let m = mask(b, t);
    let mt = Tensor::from_vec(m.clone(), (b, t), &Device::Cpu).unwrap();
    let kept = m.iter().filter(|&&v| v != 0.0).count();
    let mut sums = CovarianceSums::new(d, d, None, &Device::Cpu).unwrap();
    let rows = masked_rows(&x, &mt).unwrap();
    sums.add(&rows, &rows).unwrap();
    let want = flat(&sums.normalized().unwrap().a[0]);
    let got: Vec<f64> = masked_syrk(&flat(&x), &m, b * t, d)
        .into_iter()
        .map(|v| v / kept as f64)
        .collect();
    assert_close(&got, &want, 1e-6, "masked_syrk");
}

#[test]
fn eig_correction_equals_lambda_sums() {
    let (b, t, din, dout) = (4, 3, 5, 6);
    let f = random_factors("t", (5, 4, din, dout), None);
    let a = randn(&[b, t, din]);
    let d = randn(&[b, t, dout]);
    let m = mask(b, t);
    let mt = Tensor::from_vec(m.clone(), (b, t), &Device::Cpu).unwrap();
    let mut sums = LambdaSums::new(dout, din, &Device::Cpu).unwrap();
    sums.add_batch(&f.basis, &a, &d, &mt).unwrap();
    let want: Vec<f32> = flat(&sums.normalized().unwrap())
        .into_iter()
        .map(|v| v * b as f32)
        .collect();
    let ar = flat(&f.basis.q_a.right_mul(&a).unwrap());
    let dr = flat(&f.basis.q_s.right_mul(&d).unwrap());
    let got = eig_correction(&dr, &ar, &m, b, t, dout, din);
    assert_close(&got, &want, 1e-5, "eig_correction");
}

#[test]
fn score_tokens_equals_contraction_and_documents_sum_tokens() {
    let (q, b, t, din, dout) = (3, 2, 4, 5, 6);
    let u = randn(&[q, dout, din]);
    let a = randn(&[b, t, din]);
    let d = randn(&[b, t, dout]);
    let m = mask(b, t);
    let mt = Tensor::from_vec(m.clone(), (b, t), &Device::Cpu).unwrap();
    let want = flat(&token_scores(&u, &a, &d, &mt).unwrap());
    let (tok, doc) = score_tokens(&flat(&u), &flat(&a), &flat(&d), &m, q, dout, din, t);
    assert_close(&tok, &want, 1e-5, "score_tokens per token");
    for qi in 0..q {
        for bi in 0..b {
            let s: f64 = tok[qi * b * t + bi * t..qi * b * t + (bi + 1) * t]
                .iter()
                .sum();
            assert!((doc[qi * b + bi] - s).abs() <= 1e-12 * (1.0 + s.abs()));
        }
    }
    // Masked tokens score exactly zero.
    for (k, &mk) in m.iter().enumerate() {
        if mk == 0.0 {
            assert_eq!(tok[k], 0.0);
        }
    }
}

#[test]
fn score_tokens_lowrank_equals_the_projects_low_rank_contraction_and_the_dense_one() {
    let (q, b, t, din, dout) = (2, 3, 4, 6, 5);
    let u = randn(&[q, dout, din]);
    let a = randn(&[b, t, din]);
    let d = randn(&[b, t, dout]);
    let m = mask(b, t);
    let mt = Tensor::from_vec(m.clone(), (b, t), &Device::Cpu).unwrap();
    for rank in [1, 3, 5] {
        let lr = crate::linalg::low_rank(&u, rank).unwrap();
        let want = flat(&crate::linalg::low_rank_token_scores(&lr, &a, &d, &mt).unwrap());
        let shape = (q, dout, din, rank, t);
        let (tok, doc) = score_tokens_lowrank(
            &flat(&lr.p_scaled),
            &flat(&lr.r),
            &flat(&a),
            &flat(&d),
            &m,
            shape,
        );
        assert_close(
            &tok,
            &want,
            1e-5,
            &format!("score_tokens_lowrank rank {rank}"),
        );
        for qi in 0..q {
            for bi in 0..b {
                let s: f64 = tok[qi * b * t + bi * t..qi * b * t + (bi + 1) * t]
                    .iter()
                    .sum();
                assert!((doc[qi * b + bi] - s).abs() <= 1e-12 * (1.0 + s.abs()));
            }
        }
        // At full rank (min(d_out, d_in) = 5) the factors are U itself: the dense reference.
        if rank == 5 {
            let (dense, _) = score_tokens(&flat(&u), &flat(&a), &flat(&d), &m, q, dout, din, t);
            let dense32: Vec<f32> = dense.iter().map(|&v| v as f32).collect();
            assert_close(&tok, &dense32, 1e-5, "full-rank low-rank vs dense");
        }
    }
}

#[test]
fn bf16_and_tf32_rounding_are_exact_where_they_must_be() {
    // Values with ≤ 8 (bf16) or ≤ 11 (tf32) significant bits are unchanged.
    for x in [1.0f32, -2.5, 0.0, 384.0, 1.0 + 1.0 / 128.0] {
        assert_eq!(from_bf16(to_bf16(x)), x);
        assert_eq!(round_tf32(x), x);
    }
    // bf16: nearest even; tf32: ties away from zero.
    assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
    assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert_eq!(round_tf32(1.0 + 1.0 / 2048.0), 1.0 + 1.0 / 1024.0);
    assert_eq!(round_tf32(-(1.0 + 1.0 / 2048.0)), -(1.0 + 1.0 / 1024.0));
    assert_eq!(round_tf32(1.0 + 1.0 / 4096.0), 1.0);
    let x = 0.123_456_79f32;
    assert!(((round_tf32(x) - x) / x).abs() <= 2f32.powi(-11));
    assert!(((from_bf16(to_bf16(x)) - x) / x).abs() <= 2f32.powi(-8));
}
