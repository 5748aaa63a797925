//! Source's Adam variant (DESIGN.md §2): with an Adam update the step Jacobian is
//! I − η P H, P = diag(1/(√v̂ + ε)). With p̄ the segment average of 1/(√v̂ + ε) and d = diag(H̄),
//! σ_p = p̄ ⊙ d; propagation is elementwise exp(−s σ_p), injection is elementwise
//! (1 − exp(−s σ_p)) followed by H̄⁻¹ (tiny damping). It wraps any [`Curvature`], so the
//! Source walk runs unchanged.

use candle_core::Tensor;

use crate::curvature::{BlockDiag, EigenBasis, LayerFactors};
use crate::error::{Error, Result};

use super::functions::SpectralFn;
use super::source::{Curvature, Damping};

/// A segment's curvature seen through Adam's preconditioner.
pub struct AdamCurvature<'a> {
    /// H̄ (EK-FAC or dense).
    pub inner: &'a dyn Curvature,
    /// σ_p = p̄ ⊙ diag(H̄) per layer, shaped like the layer's gradient [d_out, d_in].
    pub sigma: Vec<Tensor>,
    /// Damping of the H̄⁻¹ that follows the injection.
    pub damping: Damping,
}

impl Curvature for AdamCurvature<'_> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        let elementwise = |g: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Vec<Tensor>> {
            v.iter()
                .zip(&self.sigma)
                .map(|(vl, sl)| Ok(vl.broadcast_mul(&g(sl)?)?))
                .collect()
        };
        match f {
            SpectralFn::Propagate { s } => elementwise(&|sig| Ok((sig * -s)?.exp()?)),
            SpectralFn::Inject { s } => {
                let w = elementwise(&|sig| Ok(((sig * -s)?.exp()?.neg()? + 1.0)?))?;
                self.inner.inverse(&w, self.damping)
            }
            SpectralFn::Inverse { damping } => self.inner.inverse(v, Damping::Absolute(damping)),
            SpectralFn::Identity => Ok(v.to_vec()),
        }
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        self.inner.inverse(v, damping)
    }
}

/// diag(H̄) of one layer's EK-FAC factors, shaped [d_out, d_in]:
/// d = (Q_S ∘ Q_S) Λ (Q_A ∘ Q_A)ᵀ, i.e. the eigenbasis back-rotation with squared blocks.
pub fn ekfac_diagonal(f: &LayerFactors) -> Result<Tensor> {
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
    let squared = EigenBasis {
        q_a: sq(&f.basis.q_a)?,
        q_s: sq(&f.basis.q_s)?,
        eig_a: Vec::new(),
        eig_s: Vec::new(),
    };
    let lambda = f.lambda.to_dtype(candle_core::DType::F32)?;
    squared.unrotate(&lambda)
}

/// σ_p = p̄ ⊙ d for every layer, checking shapes.
pub fn adam_sigma(p_bar: &[Tensor], diag: &[Tensor]) -> Result<Vec<Tensor>> {
    p_bar
        .iter()
        .zip(diag)
        .map(|(p, d)| {
            if p.dims() != d.dims() {
                return Err(Error::Numeric(format!(
                    "Adam preconditioner {:?} and curvature diagonal {:?} differ in shape",
                    p.dims(),
                    d.dims()
                )));
            }
            Ok((p * d)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::test_support::{max_abs_diff, random_factors};

    #[test]
    fn ekfac_diagonal_is_the_diagonal_of_the_kronecker_curvature() {
        let f = random_factors("l", (6, 5, 4, 3), Some(3));
        let d: Vec<Vec<f32>> = ekfac_diagonal(&f).unwrap().to_vec2().unwrap();
        let qs: Vec<Vec<f32>> = f.basis.q_s.to_dense().unwrap().to_vec2().unwrap();
        let qa: Vec<Vec<f32>> = f.basis.q_a.to_dense().unwrap().to_vec2().unwrap();
        let lam: Vec<Vec<f64>> = f.lambda.to_vec2().unwrap();
        for o in 0..3 {
            for i in 0..4 {
                // H[(o,i),(o,i)] = Σ_{p,j} Q_S[o,p]² Q_A[i,j]² Λ[p,j]
                let mut want = 0f64;
                for (p, row) in lam.iter().enumerate() {
                    for (j, l) in row.iter().enumerate() {
                        want += (qs[o][p] as f64).powi(2) * (qa[i][j] as f64).powi(2) * l;
                    }
                }
                assert!((d[o][i] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-6));
            }
        }
    }

    #[test]
    fn zero_sigma_propagates_unchanged() {
        let f = vec![random_factors("l", (6, 5, 4, 3), None)];
        let v = vec![Tensor::randn(0f32, 1.0, (2, 3, 4), &candle_core::Device::Cpu).unwrap()];
        let a = AdamCurvature {
            inner: &f,
            sigma: vec![
                Tensor::zeros((3, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            ],
            damping: Damping::Absolute(1e-3),
        };
        let out = a.apply(&v, SpectralFn::Propagate { s: 5.0 }).unwrap();
        assert_eq!(max_abs_diff(&out[0], &v[0]), 0.0);
    }
}
