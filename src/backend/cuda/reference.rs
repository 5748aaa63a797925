//! CPU references of the CUDA kernels (kernels.cu), on plain row-major slices, accumulated
//! in f64. Each is tested here against the project's CPU code (linalg) or brute force, and
//! the GPU parity tests (tests/it/cuda_parity.rs) compare the kernels against these; the
//! eigenbasis kernel is compared with linalg's primitive itself.
//! Layer: backend — may import only the ground floor and linalg.
#![allow(clippy::needless_range_loop)] // brute-force references index like the math

/// Σ_t m_t x_t x_tᵀ (the unnormalised covariance A or S of docs/design.md §3.1) for `x` [n, d]
/// and token weights `mask` \[n\]; returns the full symmetric [d, d].
pub fn masked_syrk(x: &[f32], mask: &[f32], n: usize, d: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * d, "masked_syrk: x is not [n, d]");
    assert_eq!(mask.len(), n, "masked_syrk: mask is not [n]");
    let mut out = vec![0.0f64; d * d];
    for t in 0..n {
        let m = mask[t] as f64;
        if m == 0.0 {
            continue;
        }
        let row = &x[t * d..(t + 1) * d];
        for i in 0..d {
            let xi = m * row[i] as f64;
            for j in 0..d {
                out[i * d + j] += xi * row[j] as f64;
            }
        }
    }
    out
}

/// Σ_b ((Σ_{t ∈ b} m_t dr_t ar_tᵀ)[i, j])²: the eigenvalue-correction sum (docs/design.md §3.3)
/// for rotated gradients `dr` = δ Q_S [docs·seq, d_out] and activations `ar` = a Q_A
/// [docs·seq, d_in]; returns [d_out, d_in].
pub fn eig_correction(
    dr: &[f32],
    ar: &[f32],
    mask: &[f32],
    docs: usize,
    seq: usize,
    d_out: usize,
    d_in: usize,
) -> Vec<f64> {
    let n = docs * seq;
    assert_eq!(
        dr.len(),
        n * d_out,
        "eig_correction: dr is not [docs·seq, d_out]"
    );
    assert_eq!(
        ar.len(),
        n * d_in,
        "eig_correction: ar is not [docs·seq, d_in]"
    );
    let mut out = vec![0.0f64; d_out * d_in];
    let mut g = vec![0.0f64; d_out * d_in];
    for b in 0..docs {
        g.iter_mut().for_each(|v| *v = 0.0);
        for t in b * seq..(b + 1) * seq {
            let m = mask[t] as f64;
            if m == 0.0 {
                continue;
            }
            for i in 0..d_out {
                let di = m * dr[t * d_out + i] as f64;
                for j in 0..d_in {
                    g[i * d_in + j] += di * ar[t * d_in + j] as f64;
                }
            }
        }
        for (o, v) in out.iter_mut().zip(&g) {
            *o += v * v;
        }
    }
    out
}

/// Per-token scores tok[q, t] = m_t δ_tᵀ U_q a_t and per-document sums doc[q, b] (documents
/// of `seq` consecutive tokens) for `u` [queries, d_out, d_in], `a` [n, d_in], `delta`
/// [n, d_out] (docs/design.md §2, token level).
#[allow(clippy::too_many_arguments)]
pub fn score_tokens(
    u: &[f32],
    a: &[f32],
    delta: &[f32],
    mask: &[f32],
    queries: usize,
    d_out: usize,
    d_in: usize,
    seq: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = mask.len();
    assert_eq!(
        u.len(),
        queries * d_out * d_in,
        "score_tokens: u is not [Q, d_out, d_in]"
    );
    assert_eq!(a.len(), n * d_in, "score_tokens: a is not [n, d_in]");
    assert_eq!(
        delta.len(),
        n * d_out,
        "score_tokens: delta is not [n, d_out]"
    );
    let docs = n.div_ceil(seq);
    let mut tok = vec![0.0f64; queries * n];
    let mut doc = vec![0.0f64; queries * docs];
    for q in 0..queries {
        let uq = &u[q * d_out * d_in..(q + 1) * d_out * d_in];
        for t in 0..n {
            let mut s = 0.0f64;
            for o in 0..d_out {
                let mut ua = 0.0f64;
                for i in 0..d_in {
                    ua += uq[o * d_in + i] as f64 * a[t * d_in + i] as f64;
                }
                s += delta[t * d_out + o] as f64 * ua;
            }
            let s = s * mask[t] as f64;
            tok[q * n + t] = s;
            doc[q * docs + t / seq] += s;
        }
    }
    (tok, doc)
}

/// Per-token scores tok[q, t] = m_t Σ_k (δ_tᵀ P_q)\[k\] (a_tᵀ R_q)\[k\] and per-document sums
/// doc[q, b] for a low-rank query U_q = P_q R_qᵀ, `p` [queries, d_out, rank] (σ-scaled left
/// singular vectors), `r` [queries, d_in, rank]: the `score_tokens_lowrank` kernel's math
/// (the low-rank form of the token contraction, docs/design.md §2).
#[allow(clippy::too_many_arguments)]
pub fn score_tokens_lowrank(
    p: &[f32],
    r: &[f32],
    a: &[f32],
    delta: &[f32],
    mask: &[f32],
    (queries, d_out, d_in, rank, seq): (usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let n = mask.len();
    assert_eq!(
        p.len(),
        queries * d_out * rank,
        "score_tokens_lowrank: p is not [Q, d_out, r]"
    );
    assert_eq!(
        r.len(),
        queries * d_in * rank,
        "score_tokens_lowrank: r is not [Q, d_in, r]"
    );
    assert_eq!(
        a.len(),
        n * d_in,
        "score_tokens_lowrank: a is not [n, d_in]"
    );
    assert_eq!(
        delta.len(),
        n * d_out,
        "score_tokens_lowrank: delta is not [n, d_out]"
    );
    let docs = n.div_ceil(seq);
    let mut tok = vec![0.0f64; queries * n];
    let mut doc = vec![0.0f64; queries * docs];
    for q in 0..queries {
        let pq = &p[q * d_out * rank..(q + 1) * d_out * rank];
        let rq = &r[q * d_in * rank..(q + 1) * d_in * rank];
        for t in 0..n {
            let mut s = 0.0f64;
            for k in 0..rank {
                let dp: f64 = (0..d_out)
                    .map(|o| delta[t * d_out + o] as f64 * pq[o * rank + k] as f64)
                    .sum();
                let ar: f64 = (0..d_in)
                    .map(|i| a[t * d_in + i] as f64 * rq[i * rank + k] as f64)
                    .sum();
                s += dp * ar;
            }
            let s = s * mask[t] as f64;
            tok[q * n + t] = s;
            doc[q * docs + t / seq] += s;
        }
    }
    (tok, doc)
}

/// f32 → bf16 bits, round to nearest even (what the bf16 kernels read as input).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 rounded to TF32 (10 explicit mantissa bits), to nearest with ties away from zero,
/// as PTX `cvt.rna.tf32.f32` does in the kernels' TF32 mode.
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits(x.to_bits().wrapping_add(0x1000) & 0xffff_e000)
}

/// Largest |got − want| divided by the largest |want| (the parity tests' relative error).
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_error: lengths differ");
    let scale = want
        .iter()
        .fold(0.0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    err / scale
}

#[cfg(test)]
mod tests;
