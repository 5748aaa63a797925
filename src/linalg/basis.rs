//! A layer's Kronecker eigenbasis Q = Q_S ⊗ Q_A and the one eigenbasis primitive
//! (docs/design.md §3.4): any function of a layer's EK-FAC curvature applied to layer
//! gradients V [Q, d_out, d_in] is Q_S (W ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ with weights W [d_out, d_in]
//! (W = F(Λ) for the influence function, F_S and F_r; W = F(Λ, p_Q) for Source's Adam form).
//! Layer: linalg — may import only the ground floor (error, util, config).
//!
//! The primitive is batched over any number of vectors (a query set, or an iterative
//! solver's search directions) and maps [.., d_out, d_in] to the same shape, so it composes
//! with per-step corrections such as [`super::RankOne`]. Every backend implements it
//! (`Backend::apply_in_basis`); [`apply_in_basis`] is the CPU form.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

use super::blocks::BlockDiag;
use super::covariance::Covariances;
use super::eigen::{eigh, Eigen};
use super::spectral::SpectralFn;

/// A layer's Kronecker eigenbasis: Q_A [d_in, d_in], Q_S [d_out, d_out] (block-diagonal,
/// f32) and their eigenvalues (f64, ascending within each block).
#[derive(Debug, Clone)]
pub struct EigenBasis {
    /// Eigenvectors of A.
    pub q_a: BlockDiag,
    /// Eigenvectors of S.
    pub q_s: BlockDiag,
    /// Eigenvalues of A, block after block.
    pub eig_a: Vec<f64>,
    /// Eigenvalues of S, block after block.
    pub eig_s: Vec<f64>,
}

impl EigenBasis {
    /// Eigendecomposes every block of A and S in f64; `what` names the layer in errors.
    pub fn from_covariances(c: &Covariances, what: &str, device: &Device) -> Result<EigenBasis> {
        Self::from_covariances_with(c, what, device, &eigh)
    }

    /// [`from_covariances`](Self::from_covariances) with the eigendecomposition `eig` (the
    /// CPU's faer one, or a backend's).
    pub fn from_covariances_with(
        c: &Covariances,
        what: &str,
        device: &Device,
        eig: &dyn Fn(&Tensor, &str) -> Result<Eigen>,
    ) -> Result<EigenBasis> {
        let decompose = |blocks: &[Tensor], which: &str| -> Result<(Vec<Tensor>, Vec<f64>)> {
            let mut qs = Vec::new();
            let mut vals = Vec::new();
            for (k, b) in blocks.iter().enumerate() {
                let name = if blocks.len() == 1 {
                    format!("{what} {which}")
                } else {
                    format!("{what} {which} block {k}")
                };
                let e = eig(b, &name)?;
                qs.push(e.vectors_tensor(device)?);
                vals.extend(e.values);
            }
            Ok((qs, vals))
        };
        let (qa, eig_a) = decompose(&c.a, "activation covariance")?;
        let (qs, eig_s) = decompose(&c.s, "gradient covariance")?;
        Ok(EigenBasis {
            q_a: BlockDiag {
                layout: c.a_layout.clone(),
                blocks: qa,
            },
            q_s: BlockDiag {
                layout: c.s_layout.clone(),
                blocks: qs,
            },
            eig_a,
            eig_s,
        })
    }

    /// Q_Sᵀ V Q_A for V [..., d_out, d_in]; the result is contiguous.
    pub fn rotate(&self, v: &Tensor) -> Result<Tensor> {
        self.q_s.left_mul_t(&self.q_a.right_mul(v)?) // Q_Sᵀ (V Q_A)
    }

    /// Q_S W Q_Aᵀ for W [..., d_out, d_in] (the inverse of [`rotate`](Self::rotate)); the
    /// result is contiguous (the scoring pass reads it as one [Q·d_out, d_in] matrix per
    /// batch).
    pub fn unrotate(&self, w: &Tensor) -> Result<Tensor> {
        self.q_s.left_mul(&self.q_a.right_mul_t(w)?) // Q_S (W Q_Aᵀ)
    }
}

/// F(Λ) elementwise, computed in f64, returned as f32 [d_out, d_in]. `lambda` is f64 or f32.
pub fn spectral_weights(lambda: &Tensor, f: SpectralFn) -> Result<Tensor> {
    let (o, i) = lambda.dims2()?;
    let v: Vec<f64> = lambda.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let w: Vec<f64> = v.into_iter().map(|x| f.eval(x)).collect();
    Ok(Tensor::from_vec(w, (o, i), lambda.device())?.to_dtype(DType::F32)?)
}

/// Q_S (W ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ for V [..., d_out, d_in] with weights W = F(Λ) [d_out, d_in]
/// (from [`spectral_weights`]).
pub fn apply_in_basis(basis: &EigenBasis, weights: &Tensor, v: &Tensor) -> Result<Tensor> {
    let rotated = basis.rotate(v)?;
    basis.unrotate(&rotated.broadcast_mul(weights)?)
}

/// W = F(σ_e, p_e) per eigen-direction e, in f64, returned as f32 [d_out, d_in]: a function of
/// each eigenvalue σ_e = Λ\[e\] and of p_e = q_eᵀ diag(p) q_e, the diagonal of a diagonal
/// preconditioner `p` [d_out, d_in] in the basis ([`eigenbasis_diagonal`]).
pub fn preconditioned_weights(
    basis: &EigenBasis,
    lambda: &Tensor,
    p: &Tensor,
    f: &dyn Fn(f64, f64) -> f64,
) -> Result<Tensor> {
    let (o, i) = lambda.dims2()?;
    let pq: Vec<f64> = eigenbasis_diagonal(basis, p)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let lam: Vec<f64> = lambda.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if lam.len() != pq.len() {
        return Err(Error::Numeric(format!(
            "preconditioner {:?} does not match Λ [{o}, {i}]",
            p.dims()
        )));
    }
    let w: Vec<f64> = lam.iter().zip(&pq).map(|(&l, &p)| f(l, p)).collect();
    Ok(Tensor::from_vec(w, (o, i), lambda.device())?.to_dtype(DType::F32)?)
}

/// The basis with every entry squared: rotating with it gives diagonals in the eigenbasis,
/// unrotating gives diagonals in the parameter basis.
fn squared(basis: &EigenBasis) -> Result<EigenBasis> {
    let sq = |b: &BlockDiag| -> Result<BlockDiag> {
        Ok(BlockDiag {
            layout: b.layout.clone(),
            blocks: b
                .blocks
                .iter()
                .map(|q| q.sqr())
                .collect::<candle_core::Result<_>>()?,
        })
    };
    Ok(EigenBasis {
        q_a: sq(&basis.q_a)?,
        q_s: sq(&basis.q_s)?,
        eig_a: Vec::new(),
        eig_s: Vec::new(),
    })
}

/// p_Q = diag(Qᵀ diag(p) Q) for Q = Q_S ⊗ Q_A: (Q_S ∘ Q_S)ᵀ p (Q_A ∘ Q_A), shaped [d_out, d_in].
pub fn eigenbasis_diagonal(basis: &EigenBasis, p: &Tensor) -> Result<Tensor> {
    squared(basis)?.rotate(&p.to_dtype(DType::F32)?)
}

/// diag(Q diag(vec W) Qᵀ) in the parameter basis, shaped [d_out, d_in]:
/// (Q_S ∘ Q_S) W (Q_A ∘ Q_A)ᵀ, the back-rotation with squared blocks.
pub fn parameter_diagonal(basis: &EigenBasis, w: &Tensor) -> Result<Tensor> {
    squared(basis)?.unrotate(&w.to_dtype(DType::F32)?)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // brute-force references index like the math
mod tests {
    use super::*;
    use candle_core::Device;

    /// Builds EK-FAC factors from random data and the dense curvature they stand for,
    /// H = (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ acting on row-major vec(V), then checks the
    /// primitive against F(H) v from a dense f64 eigendecomposition of H.
    #[test]
    fn primitive_equals_dense_matrix_function() {
        let dev = Device::Cpu;
        let (din, dout) = (4, 3);
        let f = crate::linalg::test_support::random_factors("t", (6, 5, din, dout), None);
        let (basis, lambda) = (f.basis, f.lambda);

        // Dense H in f64: columns of K = Q_S ⊗ Q_A are the Kronecker eigenvectors.
        let qs: Vec<Vec<f32>> = basis.q_s.to_dense().unwrap().to_vec2().unwrap();
        let qa: Vec<Vec<f32>> = basis.q_a.to_dense().unwrap().to_vec2().unwrap();
        let lv: Vec<Vec<f64>> = lambda.to_vec2().unwrap();
        let n = dout * din;
        let k = |row: usize, col: usize| -> f64 {
            let (o, i) = (row / din, row % din);
            let (p, j) = (col / din, col % din);
            qs[o][p] as f64 * qa[i][j] as f64
        };
        let mut h = vec![0.0f64; n * n];
        for r in 0..n {
            for c in 0..n {
                let mut acc = 0.0;
                for e in 0..n {
                    acc += k(r, e) * lv[e / din][e % din] * k(c, e);
                }
                h[r * n + c] = acc;
            }
        }
        let h_t = Tensor::from_vec(h, (n, n), &dev).unwrap();
        let eig = crate::linalg::eigh(&h_t, "dense H").unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, dout, din), &dev).unwrap();
        for f in [
            SpectralFn::Inverse { damping: 0.1 },
            SpectralFn::Inject { s: 3.0 },
            SpectralFn::Propagate { s: 3.0 },
            SpectralFn::Identity,
        ] {
            let w = spectral_weights(&lambda, f).unwrap();
            let got: Vec<Vec<Vec<f32>>> =
                apply_in_basis(&basis, &w, &v).unwrap().to_vec3().unwrap();
            // Dense: Q diag(F(λ)) Qᵀ vec(v).
            let vv: Vec<Vec<Vec<f32>>> = v.to_vec3().unwrap();
            for q in 0..2 {
                let x: Vec<f64> = (0..n).map(|r| vv[q][r / din][r % din] as f64).collect();
                let mut y = vec![0.0f64; n];
                for e in 0..n {
                    let proj: f64 = (0..n).map(|r| eig.vectors[r * n + e] * x[r]).sum();
                    let fe = f.eval(eig.values[e]);
                    for r in 0..n {
                        y[r] += eig.vectors[r * n + e] * fe * proj;
                    }
                }
                let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for r in 0..n {
                    let g = got[q][r / din][r % din] as f64;
                    assert!(
                        (g - y[r]).abs() <= 1e-4 * scale,
                        "{f:?} q{q} r{r}: {g} vs {}",
                        y[r]
                    );
                }
            }
        }
    }
}
