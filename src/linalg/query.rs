//! Owns the query forms: `LayerQuery` (exact or low rank), `LowRankQuery` and `low_rank`.
//! Layer: linalg — may import the ground (error, util, config, output) and, in this folder,
//! contract.rs.
//!
//! The low-rank form of a preconditioned query (docs/design.md §2, token level): each
//! query's per-layer U [d_out, d_in] is replaced by its truncated SVD
//! U ≈ Σ_{k<r} σ_k p_k r_kᵀ (computed in f64), and the token contraction δ_tᵀ U a_t becomes
//! Σ_k σ_k (p_kᵀ δ_t)(r_kᵀ a_t): two thin projections of width Q·r instead of a
//! d_out × d_in product. With r = min(d_out, d_in) the form is exact (up to f32 rounding).

use candle_core::{DType, Tensor, D};
use faer::Mat;

use crate::error::{Error, Result};

use super::contract::{doc_scores, token_scores};

/// Rank-r factors of one layer's preconditioned queries: U_q ≈ P_q diag(σ_q) R_qᵀ.
#[derive(Debug, Clone)]
pub struct LowRankQuery {
    /// Left singular vectors scaled by their singular values, σ_k p_k: [Q, d_out, r] (f32).
    pub p_scaled: Tensor,
    /// Right singular vectors r_k: [Q, d_in, r] (f32).
    pub r: Tensor,
    /// The singular values σ_k of every query, descending, all min(d_out, d_in) of them (the
    /// dropped ones say how much the truncation leaves out).
    pub singular_values: Vec<Vec<f64>>,
}

impl LowRankQuery {
    /// The rank r kept.
    pub fn rank(&self) -> Result<usize> {
        Ok(self.r.dim(2)?)
    }

    /// The dense U_q ≈ Σ_k σ_k p_k r_kᵀ, [Q, d_out, d_in] (for checks).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(self
            .p_scaled
            .matmul(&self.r.transpose(1, 2)?.contiguous()?)?)
    }
}

/// Truncated SVD of every query's U (`u` [Q, d_out, d_in], any float dtype) to rank
/// min(`rank`, d_out, d_in), in f64.
pub fn low_rank(u: &Tensor, rank: usize) -> Result<LowRankQuery> {
    if rank == 0 {
        return Err(Error::Numeric(
            "the low-rank query form needs a rank of 1 or more".into(),
        ));
    }
    let (q, d_out, d_in) = u.dims3()?;
    let r = rank.min(d_out).min(d_in);
    let data: Vec<f64> = u.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (mut p_all, mut r_all) = (Vec::with_capacity(q * d_out * r), Vec::new());
    r_all.reserve(q * d_in * r);
    let mut sv = Vec::with_capacity(q);
    for qi in 0..q {
        let base = qi * d_out * d_in;
        let m = Mat::<f64>::from_fn(d_out, d_in, |i, j| data[base + i * d_in + j]);
        let svd = m
            .thin_svd()
            .map_err(|e| Error::Numeric(format!("SVD of query {qi} failed: {e:?}")))?;
        let (uu, s, vv) = (svd.U(), svd.S().column_vector(), svd.V());
        let n = d_out.min(d_in);
        // faer returns σ in non-increasing order; sort anyway so truncation keeps the largest.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
        sv.push(order.iter().map(|&k| s[k]).collect());
        for i in 0..d_out {
            for &k in &order[..r] {
                p_all.push((uu[(i, k)] * s[k]) as f32);
            }
        }
        for j in 0..d_in {
            for &k in &order[..r] {
                r_all.push(vv[(j, k)] as f32);
            }
        }
    }
    let dev = u.device();
    Ok(LowRankQuery {
        p_scaled: Tensor::from_vec(p_all, (q, d_out, r), dev)?,
        r: Tensor::from_vec(r_all, (q, d_in, r), dev)?,
        singular_values: sv,
    })
}

/// Per-token scores s[q, b, t] = Σ_k σ_k (p_kᵀ δ_{b,t})(r_kᵀ a_{b,t}) for the factored query,
/// `a` [B, T, d_in], `delta` [B, T, d_out], zeroed where `mask` [B, T] is 0. Returns [Q, B, T]
/// (f32), like [`token_scores`] for the dense U.
pub fn low_rank_token_scores(
    lr: &LowRankQuery,
    a: &Tensor,
    delta: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (q, d_out, r) = lr.p_scaled.dims3()?;
    let d_in = lr.r.dim(1)?;
    let (b, t, _) = a.dims3()?;
    let n = b * t;
    // δ [n, d_out] × [d_out, Q·r] and a [n, d_in] × [d_in, Q·r]: two thin projections.
    let pf = lr.p_scaled.permute((1, 0, 2))?.reshape((d_out, q * r))?;
    let rf = lr.r.permute((1, 0, 2))?.reshape((d_in, q * r))?;
    let dp = delta.reshape((n, d_out))?.matmul(&pf)?;
    let ar = a.reshape((n, d_in))?.matmul(&rf)?;
    let per = (dp * ar)?.reshape((n, q, r))?.sum(D::Minus1)?; // [n, q]
    let m = mask.to_dtype(DType::F32)?.reshape((n, 1))?;
    Ok(per.broadcast_mul(&m)?.t()?.reshape((q, b, t))?)
}

/// A layer's preconditioned query in the form the scoring pass contracts with.
#[derive(Debug, Clone)]
pub enum LayerQuery {
    /// U [Q, d_out, d_in] as is (exact).
    Dense(Tensor),
    /// The truncated SVD of U.
    LowRank(LowRankQuery),
}

impl LayerQuery {
    /// `u` as is (`rank` None) or its rank-`rank` form.
    pub fn new(u: Tensor, rank: Option<usize>) -> Result<LayerQuery> {
        Ok(match rank {
            None => LayerQuery::Dense(u),
            Some(r) => LayerQuery::LowRank(low_rank(&u, r)?),
        })
    }

    /// The same query with a dense U laid out contiguously: the token contraction reads U as
    /// one [Q·d_out, d_in] matrix on every batch, which a strided U would copy each time.
    pub fn contiguous(&self) -> Result<LayerQuery> {
        Ok(match self {
            LayerQuery::Dense(u) => LayerQuery::Dense(u.contiguous()?),
            LayerQuery::LowRank(l) => LayerQuery::LowRank(l.clone()),
        })
    }

    /// Q, the number of queries.
    pub fn queries(&self) -> Result<usize> {
        Ok(match self {
            LayerQuery::Dense(u) => u.dim(0)?,
            LayerQuery::LowRank(l) => l.r.dim(0)?,
        })
    }

    /// Per-document scores [Q, B] (see [`doc_scores`]; the low-rank form sums its per-token
    /// scores).
    pub fn doc_scores(&self, a: &Tensor, delta: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            LayerQuery::Dense(u) => doc_scores(u, a, delta, mask),
            LayerQuery::LowRank(l) => Ok(low_rank_token_scores(l, a, delta, mask)?.sum(D::Minus1)?),
        }
    }

    /// Per-token scores [Q, B, T] (see [`token_scores`], [`low_rank_token_scores`]).
    pub fn token_scores(&self, a: &Tensor, delta: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            LayerQuery::Dense(u) => token_scores(u, a, delta, mask),
            LayerQuery::LowRank(l) => low_rank_token_scores(l, a, delta, mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Fixed pseudo-random values in [−1, 1) (candle's CPU `randn` cannot be seeded, and the
    /// rank-by-rank error below is a property of the data, so the data must not change
    /// between runs).
    fn fixed(shape: (usize, usize, usize), salt: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let mut x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
                x ^= x >> 31;
                x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                x ^= x >> 29;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn data(q: usize, d_out: usize, d_in: usize) -> (Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let (b, t) = (3, 5);
        let u = fixed((q, d_out, d_in), 1);
        let a = fixed((b, t, d_in), 2);
        let d = fixed((b, t, d_out), 3);
        let mv: Vec<u8> = (0..b * t).map(|i| (i % 4 != 0) as u8).collect();
        let mask = Tensor::from_vec(mv, (b, t), &dev).unwrap();
        (u, a, d, mask)
    }

    fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
        let diff: f32 = (got - want)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let norm: f32 = want.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        (diff as f64 / norm as f64).sqrt()
    }

    #[test]
    fn full_rank_equals_the_exact_contraction_per_token_and_per_document() {
        for (d_out, d_in) in [(7, 4), (4, 7), (6, 6)] {
            let (u, a, d, mask) = data(3, d_out, d_in);
            let exact = token_scores(&u, &a, &d, &mask).unwrap();
            let lr = low_rank(&u, 100).unwrap();
            assert_eq!(lr.rank().unwrap(), d_out.min(d_in));
            let got = low_rank_token_scores(&lr, &a, &d, &mask).unwrap();
            let e3: Vec<Vec<Vec<f32>>> = exact.to_vec3().unwrap();
            let g3: Vec<Vec<Vec<f32>>> = got.to_vec3().unwrap();
            let scale = e3
                .iter()
                .flatten()
                .flatten()
                .fold(0f32, |m, v| m.max(v.abs()));
            for (eq, gq) in e3.iter().zip(&g3) {
                for (eb, gb) in eq.iter().zip(gq) {
                    let (se, sg): (f32, f32) = (eb.iter().sum(), gb.iter().sum());
                    assert!((se - sg).abs() <= 1e-5 * scale.max(se.abs()), "{se} {sg}");
                    for (x, y) in eb.iter().zip(gb) {
                        assert!((x - y).abs() <= 1e-5 * scale, "{x} {y}");
                    }
                }
            }
            // The factors reproduce U itself.
            assert!(rel_err(&lr.to_dense().unwrap(), &u) < 1e-6);
        }
    }

    #[test]
    fn the_error_falls_as_the_rank_grows_and_matches_the_dropped_singular_values() {
        let (u, a, d, mask) = data(2, 9, 6);
        let exact = token_scores(&u, &a, &d, &mask).unwrap();
        let mut last = f64::INFINITY;
        for r in 1..=6 {
            let lr = low_rank(&u, r).unwrap();
            let err = rel_err(&low_rank_token_scores(&lr, &a, &d, &mask).unwrap(), &exact);
            assert!(err < last, "rank {r}: {err} ≥ {last}");
            last = err;
            // Eckart–Young: ‖U − U_r‖_F² = Σ_{k ≥ r} σ_k².
            for (qi, sv) in lr.singular_values.iter().enumerate() {
                let want: f64 = sv[r..].iter().map(|s| s * s).sum::<f64>().sqrt();
                let diff = (lr.to_dense().unwrap().get(qi).unwrap() - u.get(qi).unwrap())
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
                assert!(
                    (diff.sqrt() - want).abs() <= 1e-4 * (1.0 + want),
                    "{} {want}",
                    diff.sqrt()
                );
            }
        }
        assert!(last < 1e-5, "full rank: {last}");
        assert!(low_rank(&u, 0).is_err());
    }
}
