//! Owns `LambdaSums`: the sums of one layer's EK-FAC eigenvalue correction Λ.
//! Layer: linalg — may import the ground (error, util, config, output) and, in this folder,
//! basis.rs.
//!
//! The EK-FAC eigenvalue correction of one layer (docs/design.md §3.3): in the layer's eigenbasis,
//! Λ\[i,j\] = E_documents[((Q_Sᵀ G_m Q_A)\[i,j\])²] with G_m = Σ_t δ_t a_tᵀ, normalised per
//! document.

use candle_core::{DType, Device, Tensor, D};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::util::tensors::with_f32;

use super::basis::EigenBasis;

/// Running sum of squared rotated per-document gradients, Σ_m (Q_Sᵀ G_m Q_A)² (row-major
/// [d_out, d_in]), in f32 as kronfluence's default Λ dtype: every term is non-negative, so
/// the relative rounding error of the sum stays below (documents)·2⁻²⁴ at worst, and the
/// sums of a whole model take half the memory of f64 ones during the correction pass.
#[derive(Debug, Clone)]
pub struct LambdaSums {
    sum: Vec<f32>,
    d_out: usize,
    d_in: usize,
    device: Device,
    /// Documents added.
    pub docs: u64,
}

/// Rows of Λ handled by one task: 64 rows of f64 stay in cache while every document of a
/// batch is added to them.
const LAMBDA_ROWS_PER_TASK: usize = 64;

impl LambdaSums {
    /// Zeros [d_out, d_in]; [`normalized`](Self::normalized) puts Λ on `device`.
    pub fn new(d_out: usize, d_in: usize, device: &Device) -> Result<LambdaSums> {
        Ok(LambdaSums {
            sum: vec![0.0; d_out * d_in],
            d_out,
            d_in,
            device: device.clone(),
            docs: 0,
        })
    }

    /// Adds the documents of a batch: `a` [B, T, d_in], `delta` [B, T, d_out], `mask` [B, T]
    /// (1 on positions that belong to the document). Each document's gradient is
    /// G_m = Σ_t δ_t a_tᵀ; it is rotated without forming G_m in the original basis:
    /// Q_Sᵀ G_m Q_A = (δ Q_S)ᵀ (a Q_A).
    pub fn add_batch(
        &mut self,
        basis: &EigenBasis,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<()> {
        let (b, t, _) = a.dims3()?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let a_rot = basis.q_a.right_mul(&a.broadcast_mul(&m)?)?;
        let d_rot = basis.q_s.right_mul(&delta.broadcast_mul(&m)?)?;
        self.add_rotated(&a_rot, &d_rot, &vec![t; b])
    }

    /// Adds the documents of a batch already in the eigenbasis: `a_rot` = a Q_A [B, T, d_in]
    /// and `d_rot` = δ Q_S [B, T, d_out], document b's tokens in rows `0..lengths[b]` (rows
    /// past it are ignored). Per document, (d_rot_bᵀ a_rot_b)² is added row block by row
    /// block, in parallel over blocks; nothing of size B·d_out·d_in is formed.
    pub fn add_rotated(&mut self, a_rot: &Tensor, d_rot: &Tensor, lengths: &[usize]) -> Result<()> {
        let (b, t, d_in) = a_rot.dims3()?;
        let (b2, t2, d_out) = d_rot.dims3()?;
        if (b2, t2, d_in, d_out) != (b, t, self.d_in, self.d_out) || lengths.len() != b {
            return Err(Error::Numeric(format!(
                "eigenvalue correction: rotated a {:?} and δ {:?} do not fit Λ [{}, {}] and {} \
                 document lengths",
                a_rot.dims(),
                d_rot.dims(),
                self.d_out,
                self.d_in,
                lengths.len()
            )));
        }
        let (d_in, d_out) = (self.d_in, self.d_out);
        with_f32(a_rot, |a| {
            with_f32(d_rot, |d| {
                self.sum
                    .par_chunks_mut(LAMBDA_ROWS_PER_TASK * d_in)
                    .enumerate()
                    .for_each(|(task, lam)| {
                        let r0 = task * LAMBDA_ROWS_PER_TASK;
                        let rows = lam.len() / d_in;
                        let mut g = vec![0f32; rows * d_in];
                        for (doc, &len) in lengths.iter().enumerate() {
                            let len = len.min(t);
                            if len == 0 {
                                continue;
                            }
                            let ab = MatRef::from_row_major_slice(
                                &a[doc * t * d_in..][..len * d_in],
                                len,
                                d_in,
                            );
                            let db = MatRef::from_row_major_slice(
                                &d[doc * t * d_out..][..len * d_out],
                                len,
                                d_out,
                            )
                            .subcols(r0, rows);
                            matmul(
                                MatMut::from_row_major_slice_mut(&mut g, rows, d_in),
                                Accum::Replace,
                                db.transpose(),
                                ab,
                                1.0f32,
                                Par::Seq,
                            );
                            for (l, &x) in lam.iter_mut().zip(&g) {
                                *l += x * x;
                            }
                        }
                    })
            })
        })??;
        self.docs += b as u64;
        Ok(())
    }

    /// Adds squared rotated document gradients summed elsewhere (a GPU backend): `squares`
    /// [d_out, d_in] = Σ_m ((Q_Sᵀ G_m Q_A)\[i,j\])² over `docs` documents (any float dtype and
    /// device).
    pub fn add_squares(&mut self, squares: &Tensor, docs: u64) -> Result<()> {
        if squares.dims() != [self.d_out, self.d_in] {
            return Err(Error::Numeric(format!(
                "eigenvalue correction: squares of shape {:?} for Λ of [{}, {}]",
                squares.dims(),
                self.d_out,
                self.d_in
            )));
        }
        let add: Vec<f32> = squares
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for (s, a) in self.sum.iter_mut().zip(add) {
            *s += a;
        }
        self.docs += docs;
        Ok(())
    }

    /// The running sum Σ_m (Q_Sᵀ G_m Q_A)², row-major [d_out, d_in]: what a shard of the
    /// pass stores (docs/design.md §11).
    pub fn sums(&self) -> &[f32] {
        &self.sum
    }

    /// Λ = sum / documents, f64 [d_out, d_in] (the division in f64).
    pub fn normalized(&self) -> Result<Tensor> {
        if self.docs == 0 {
            return Err(Error::Numeric(
                "eigenvalue correction saw no documents".into(),
            ));
        }
        let n = self.docs as f64;
        let v: Vec<f64> = self.sum.iter().map(|&x| x as f64 / n).collect();
        Ok(Tensor::from_vec(v, (self.d_out, self.d_in), &self.device)?)
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // brute-force references index like the math
mod tests {
    use super::*;
    use crate::linalg::covariance::{masked_rows, CovarianceSums};

    #[test]
    fn lambda_matches_explicit_per_document_gradients() {
        let dev = Device::Cpu;
        let (b, t, din, dout) = (4, 6, 5, 3);
        let a = Tensor::randn(0f32, 1.0, (b, t, din), &dev).unwrap();
        let d = Tensor::randn(0f32, 1.0, (b, t, dout), &dev).unwrap();
        let mask_v: Vec<f32> = (0..b * t)
            .map(|i| (i % t < 4 + i / t % 2) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(mask_v.clone(), (b, t), &dev).unwrap();
        for block in [None, Some(2)] {
            let mut cov = CovarianceSums::new(din, dout, block, &dev).unwrap();
            cov.add(
                &masked_rows(&a, &mask).unwrap(),
                &masked_rows(&d, &mask).unwrap(),
            )
            .unwrap();
            let basis =
                EigenBasis::from_covariances(&cov.normalized().unwrap(), "test", &dev).unwrap();
            let mut lam = LambdaSums::new(dout, din, &dev).unwrap();
            lam.add_batch(&basis, &a, &d, &mask).unwrap();
            let got: Vec<Vec<f64>> = lam.normalized().unwrap().to_vec2().unwrap();

            // Brute force: G_m explicitly, rotated with the dense Q matrices.
            let qa = basis.q_a.to_dense().unwrap();
            let qs = basis.q_s.to_dense().unwrap();
            let mut want = vec![vec![0.0f64; din]; dout];
            for m in 0..b {
                let am = a
                    .get(m)
                    .unwrap()
                    .broadcast_mul(&mask.get(m).unwrap().unsqueeze(1).unwrap())
                    .unwrap();
                let gm = d.get(m).unwrap().t().unwrap().matmul(&am).unwrap();
                let r = qs.t().unwrap().matmul(&gm).unwrap().matmul(&qa).unwrap();
                let r: Vec<Vec<f32>> = r.to_vec2().unwrap();
                for i in 0..dout {
                    for j in 0..din {
                        want[i][j] += (r[i][j] as f64).powi(2) / b as f64;
                    }
                }
            }
            for i in 0..dout {
                for j in 0..din {
                    let tol = 1e-4 * (1.0 + want[i][j].abs());
                    assert!((got[i][j] - want[i][j]).abs() < tol, "{block:?} {i} {j}");
                }
            }
            // rotate / unrotate are inverse.
            let v = Tensor::randn(0f32, 1.0, (2, dout, din), &dev).unwrap();
            let back = basis.unrotate(&basis.rotate(&v).unwrap()).unwrap();
            let e: f32 = (back - v)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(e < 1e-5);
        }
    }
}
