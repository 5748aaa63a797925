//! The one eigenbasis primitive (docs/design.md §3.4): any matrix function of a layer's EK-FAC
//! curvature applied to a layer gradient V [d_out, d_in] is
//! Q_S ( F(Λ) ⊙ (Q_Sᵀ V Q_A) ) Q_Aᵀ.
//! Influence functions, F_S and F_r all go through here with a different scalar F.

use candle_core::{DType, Tensor};

use crate::curvature::EigenBasis;
use crate::error::Result;

use super::functions::SpectralFn;

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
        let f = crate::curvature::test_support::random_factors("t", (6, 5, din, dout), None);
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
        let eig = crate::curvature::eigh(&h_t, "dense H").unwrap();
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
