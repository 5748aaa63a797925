//! Owns `DenseCurvature`: the exact dense H̄ of one layer, F(H̄) by f64 eigendecomposition.
//! Layer: attribution — may import every floor from the ground up to curvature and, in this folder,
//! curvature.rs.
//!
//! Exact curvature for tiny problems and tests: a dense symmetric H̄ over the flattened
//! parameters of one layer, F(H̄) applied through its f64 eigendecomposition. It follows the
//! same [`Curvature`] contract as EK-FAC, so the Source walk runs unchanged on it.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::linalg::{eigh, Eigen, SpectralFn};

use super::curvature::{Curvature, Damping};

/// A dense curvature matrix H̄ [P, P] for a single "layer" whose gradients are [Q, d_out,
/// d_in] with d_out · d_in = P (row-major flattening).
#[derive(Debug, Clone)]
pub struct DenseCurvature {
    eig: Eigen,
}

impl DenseCurvature {
    /// Decomposes `h` [P, P] (symmetric).
    pub fn new(h: &Tensor) -> Result<DenseCurvature> {
        Ok(DenseCurvature {
            eig: eigh(h, "dense curvature")?,
        })
    }

    fn apply_scalar(&self, v: &[Tensor], f: &dyn Fn(f64) -> f64) -> Result<Vec<Tensor>> {
        let fv: Vec<f64> = self.eig.values.iter().map(|&s| f(s)).collect();
        self.apply_weights(v, &fv)
    }

    /// Q diag(w) Qᵀ v with one weight per eigenvector.
    fn apply_weights(&self, v: &[Tensor], fv: &[f64]) -> Result<Vec<Tensor>> {
        let v = self.single(v)?;
        let shape = v.dims().to_vec();
        let q = shape[0];
        let n = self.eig.n;
        let x: Vec<f64> = v.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let qm = &self.eig.vectors; // row-major, column e = eigenvector e
        let mut y = vec![0f64; q * n];
        for qi in 0..q {
            let xq = &x[qi * n..(qi + 1) * n];
            for e in 0..n {
                let proj: f64 = (0..n).map(|r| qm[r * n + e] * xq[r]).sum::<f64>() * fv[e];
                for r in 0..n {
                    y[qi * n + r] += qm[r * n + e] * proj;
                }
            }
        }
        Ok(vec![
            Tensor::from_vec(y, shape, v.device())?.to_dtype(v.dtype())?
        ])
    }

    /// The one layer's gradient [Q, …] with P entries per query.
    fn single<'t>(&self, v: &'t [Tensor]) -> Result<&'t Tensor> {
        let [v] = v else {
            return Err(Error::Numeric(
                "dense curvature covers exactly one layer".into(),
            ));
        };
        let p: usize = v.dims()[1..].iter().product();
        if p != self.eig.n {
            return Err(Error::Numeric(format!(
                "dense curvature is {0}×{0} but the gradient has {p} entries",
                self.eig.n
            )));
        }
        Ok(v)
    }
}

impl Curvature for DenseCurvature {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        self.apply_scalar(v, &|s| f.eval(s))
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        let d = match damping {
            Damping::Absolute(d) => d,
            Damping::MeanLambda(f) => {
                f * self.eig.values.iter().sum::<f64>() / self.eig.n.max(1) as f64
            }
        };
        self.apply_scalar(v, &|s| 1.0 / (s + d))
    }

    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        let [p] = p else {
            return Err(Error::Numeric(
                "dense curvature covers exactly one layer".into(),
            ));
        };
        let n = self.eig.n;
        let pv: Vec<f64> = p.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if pv.len() != n {
            return Err(Error::Numeric(format!(
                "dense curvature is {n}×{n} but the preconditioner has {} entries",
                pv.len()
            )));
        }
        let qm = &self.eig.vectors;
        // p_e = Σ_r Q[r, e]² p_r.
        let fv: Vec<f64> = (0..n)
            .map(|e| {
                let pe: f64 = (0..n).map(|r| qm[r * n + e].powi(2) * pv[r]).sum();
                f(self.eig.values[e], pe)
            })
            .collect();
        self.apply_weights(v, &fv)
    }
}
