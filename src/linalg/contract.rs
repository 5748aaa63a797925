//! Owns the scoring contraction: `token_scores` and `doc_scores` (δ_tᵀ U a_t per position).
//! Layer: linalg — may import the ground (error, util, config, output); no sibling.
//!
//! The scoring contraction (docs/design.md §2, token level): a document's score against a
//! preconditioned query gradient U [d_out, d_in] splits exactly into per-position terms
//! δ_tᵀ U a_t; their sum is ⟨U, G_m⟩ with G_m = Σ_t δ_t a_tᵀ. Per-token gradients are never
//! formed: for each layer, U a is computed once per batch for all queries and dotted with δ.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::util::tensors::with_f32;

/// Per-token scores s[q, b, t] = δ_{b,t}ᵀ U_q a_{b,t} for `u` [Q, d_out, d_in], `a` [B, T, d_in],
/// `delta` [B, T, d_out], zeroed where `mask` [B, T] is 0. Returns [Q, B, T] (f32). All
/// queries in one product, Y = a [U_1; …; U_Q]ᵀ [B·T, Q·d_out] (U read in place as a
/// [Q·d_out, d_in] matrix: one large GEMM instead of Q narrow ones), then each row's Q
/// slices are dotted with δ.
pub fn token_scores(u: &Tensor, a: &Tensor, delta: &Tensor, mask: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (q, d_out, d_in) = u.dims3()?;
    let (b, t, _) = a.dims3()?;
    let n = b * t;
    if q == 0 || n == 0 {
        return Ok(Tensor::zeros((q, b, t), DType::F32, a.device())?);
    }
    let y = a
        .reshape((n, d_in))?
        .matmul(&u.reshape((q * d_out, d_in))?.t()?)?; // [n, Q·d_out]
    let m: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; n * q]; // [n, Q], transposed below
    with_f32(&y, |y| {
        with_f32(&delta.reshape((n, d_out))?, |d| {
            out.par_chunks_mut(q)
                .zip(y.par_chunks(q * d_out))
                .zip(d.par_chunks(d_out))
                .zip(&m)
                .for_each(|(((o, y), d), &m)| {
                    if m == 0.0 {
                        return;
                    }
                    for (o, yq) in o.iter_mut().zip(y.chunks(d_out)) {
                        *o = m * yq.iter().zip(d).map(|(a, b)| a * b).sum::<f32>();
                    }
                });
            Ok::<(), crate::error::Error>(())
        })?
    })??;
    Ok(Tensor::from_vec(out, (n, q), a.device())?
        .t()?
        .contiguous()?
        .reshape((q, b, t))?)
}

/// Per-document scores s[q, b] = ⟨U_q, G_b⟩ with G_b = Σ_t m_{b,t} δ_{b,t} a_{b,t}ᵀ, for `u`
/// [Q, d_out, d_in], `a` [B, T, d_in], `delta` [B, T, d_out], `mask` [B, T]. Returns [Q, B]
/// (f32). The sum over a document's tokens of [`token_scores`], at (T + Q)·d_out·d_in
/// multiply-adds per document instead of T·Q·d_out·d_in: when no per-token score is
/// wanted, each document's gradient is formed (a batch's [B, d_out, d_in] at a time) and
/// dotted with every query in one product.
pub fn doc_scores(u: &Tensor, a: &Tensor, delta: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (q, d_out, d_in) = u.dims3()?;
    let (b, _, _) = a.dims3()?;
    let m = mask.to_dtype(a.dtype())?.unsqueeze(2)?;
    let d = delta.broadcast_mul(&m)?;
    let g = d.transpose(1, 2)?.contiguous()?.matmul(&a.contiguous()?)?; // [B, d_out, d_in]
    Ok(u.reshape((q, d_out * d_in))?
        .matmul(&g.reshape((b, d_out * d_in))?.t()?)?)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // brute-force references index like the math
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn doc_scores_are_the_token_scores_summed_per_document() {
        let dev = Device::Cpu;
        for (din, dout) in [(5, 3), (3, 5)] {
            let (q, b, t) = (3, 4, 6);
            let u = Tensor::randn(0f32, 1.0, (q, dout, din), &dev).unwrap();
            let a = Tensor::randn(0f32, 1.0, (b, t, din), &dev).unwrap();
            let d = Tensor::randn(0f32, 1.0, (b, t, dout), &dev).unwrap();
            // Padding at the ends of rows, where a and δ are not zero: the mask must count.
            let mv: Vec<u8> = (0..b * t).map(|i| (i % t < 2 + i / t) as u8).collect();
            let mask = Tensor::from_vec(mv, (b, t), &dev).unwrap();
            let want: Vec<Vec<f32>> = token_scores(&u, &a, &d, &mask)
                .unwrap()
                .sum(candle_core::D::Minus1)
                .unwrap()
                .to_vec2()
                .unwrap();
            let got: Vec<Vec<f32>> = doc_scores(&u, &a, &d, &mask).unwrap().to_vec2().unwrap();
            for qi in 0..q {
                for bi in 0..b {
                    let (x, y) = (got[qi][bi], want[qi][bi]);
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{qi} {bi}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn token_scores_sum_to_the_gradient_inner_product_in_both_orders() {
        let dev = Device::Cpu;
        for (din, dout) in [(5, 3), (3, 5)] {
            let (q, b, t) = (2, 3, 4);
            let u = Tensor::randn(0f32, 1.0, (q, dout, din), &dev).unwrap();
            let a = Tensor::randn(0f32, 1.0, (b, t, din), &dev).unwrap();
            let d = Tensor::randn(0f32, 1.0, (b, t, dout), &dev).unwrap();
            let mv: Vec<u8> = (0..b * t).map(|i| (i % 3 != 0) as u8).collect();
            let mask = Tensor::from_vec(mv.clone(), (b, t), &dev).unwrap();
            let s: Vec<Vec<Vec<f32>>> = token_scores(&u, &a, &d, &mask).unwrap().to_vec3().unwrap();
            for qi in 0..q {
                for bi in 0..b {
                    // ⟨U, G_m⟩ with G_m = Σ_t (masked) δ_t a_tᵀ.
                    let mrow = mask
                        .get(bi)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .unsqueeze(1)
                        .unwrap();
                    let g = d
                        .get(bi)
                        .unwrap()
                        .broadcast_mul(&mrow)
                        .unwrap()
                        .t()
                        .unwrap()
                        .matmul(&a.get(bi).unwrap())
                        .unwrap();
                    let want: f32 = (g * u.get(qi).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    let got: f32 = s[qi][bi].iter().sum();
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{got} {want}"
                    );
                    for ti in 0..t {
                        if mv[bi * t + ti] == 0 {
                            assert_eq!(s[qi][bi][ti], 0.0);
                        }
                    }
                }
            }
        }
    }
}
