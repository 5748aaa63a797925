//! The scoring contraction (DESIGN.md §2, token level): a document's score against a
//! preconditioned query gradient U [d_out, d_in] splits exactly into per-position terms
//! δ_tᵀ U a_t; their sum is ⟨U, G_m⟩ with G_m = Σ_t δ_t a_tᵀ. Per-token gradients are never
//! formed: for each layer, δ U (or U a) is computed once per batch and dotted with a (or δ).

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Per-token scores s[q, b, t] = δ_{b,t}ᵀ U_q a_{b,t} for `u` [Q, d_out, d_in], `a` [B, T, d_in],
/// `delta` [B, T, d_out], zeroed where `mask` [B, T] is 0. Returns [Q, B, T] (f32). One
/// product per query, in the order whose intermediate has width min(d_in, d_out): δ U_q
/// [n, d_in] dotted with a, or U_q a [n, d_out] dotted with δ. U is read in place (no
/// per-batch copy of the queries).
pub fn token_scores(u: &Tensor, a: &Tensor, delta: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (q, d_out, d_in) = u.dims3()?;
    let (b, t, _) = a.dims3()?;
    let n = b * t;
    let a2 = a.reshape((n, d_in))?;
    let d2 = delta.reshape((n, d_out))?;
    let per: Vec<Tensor> = (0..q)
        .map(|qi| -> Result<Tensor> {
            let uq = u.get(qi)?; // [d_out, d_in]
            Ok(if d_in <= d_out {
                d2.matmul(&uq)?.mul(&a2)?.sum(D::Minus1)? // (δ U_q) · a
            } else {
                a2.matmul(&uq.t()?)?.mul(&d2)?.sum(D::Minus1)? // (U_q a) · δ
            })
        })
        .collect::<Result<_>>()?;
    let per = Tensor::stack(&per, 0)?; // [q, n]
    let m = mask.to_dtype(DType::F32)?.reshape((1, n))?;
    Ok(per.broadcast_mul(&m)?.reshape((q, b, t))?)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // brute-force references index like the math
mod tests {
    use super::*;
    use candle_core::Device;

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
