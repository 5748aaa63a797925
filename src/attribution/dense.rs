//! Exact curvature for tiny problems and tests: a dense symmetric H̄ over the flattened
//! parameters of one layer, F(H̄) applied through its f64 eigendecomposition. It follows the
//! same [`Curvature`] contract as EK-FAC, so the Source walk runs unchanged on it.

use candle_core::{DType, Tensor};

use crate::curvature::{eigh, Eigen};
use crate::error::{Error, Result};

use super::functions::SpectralFn;
use super::source::{Curvature, Damping};

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
        let [v] = v else {
            return Err(Error::Numeric(
                "dense curvature covers exactly one layer".into(),
            ));
        };
        let shape = v.dims().to_vec();
        let (q, p) = (shape[0], shape[1..].iter().product::<usize>());
        if p != self.eig.n {
            return Err(Error::Numeric(format!(
                "dense curvature is {0}×{0} but the gradient has {p} entries",
                self.eig.n
            )));
        }
        let n = self.eig.n;
        let x: Vec<f64> = v.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let fv: Vec<f64> = self.eig.values.iter().map(|&s| f(s)).collect();
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
}
