//! The Source walk over segments (docs/design.md §2) and the two baselines that share its
//! machinery.
//!
//! With v_L = ∇_θ f(q, θ_final), walking from the last segment to the first:
//!   u_ℓ = F_r(H̄_ℓ) v_ℓ,   v_{ℓ−1} = F_S(H̄_ℓ) v_ℓ,
//! and τ(q, m) = Σ_{ℓ : m ∈ D_ℓ} (1/N_ℓ) ⟨u_ℓ, ḡ_ℓ(m)⟩. A segment declared `converged`
//! (s → ∞) uses the damped inverse instead of F_r; it must be the first segment, since
//! F_S(∞) would erase every direction the query carries into it.

use candle_core::Tensor;

use crate::curvature::LayerFactors;
use crate::error::{Error, Result};
use crate::train::LrMass;

use super::functions::SpectralFn;
use super::precondition::{apply_in_basis, spectral_weights};

/// Damping of the influence-function inverse (H + λ)⁻¹.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Damping {
    /// The same λ for every layer.
    Absolute(f64),
    /// λ = factor × mean(Λ) per layer (kronfluence's heuristic uses 0.1).
    MeanLambda(f64),
}

impl Damping {
    /// λ for a layer with eigenvalue correction `lambda`.
    pub fn for_layer(&self, lambda: &Tensor) -> Result<f64> {
        Ok(match *self {
            Damping::Absolute(d) => d,
            Damping::MeanLambda(f) => {
                let mean: f64 = lambda
                    .to_dtype(candle_core::DType::F64)?
                    .mean_all()?
                    .to_scalar()?;
                f * mean
            }
        })
    }
}

/// A segment's curvature H̄_ℓ: anything that applies F(H̄) to a per-layer gradient
/// (EK-FAC factors, or a dense Hessian for tiny problems and tests).
pub trait Curvature {
    /// F(H̄) v for v per layer [Q, d_out, d_in].
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>>;

    /// The damped inverse (H̄ + λ)⁻¹ v.
    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>>;

    /// Q diag(F(σ_e, p_e)) Qᵀ v: a function of each eigenvalue σ_e of H̄ (eigenvector q_e)
    /// and of p_e = q_eᵀ diag(p) q_e, the diagonal of a diagonal preconditioner `p` (per
    /// layer, shaped like the layer's gradient [d_out, d_in]) in H̄'s eigenbasis. Source's
    /// Adam variant ([`super::adam`]) is built on it.
    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>>;
}

impl Curvature for Vec<LayerFactors> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        apply(self, v, f)
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        precondition_inverse(self, v, damping)
    }

    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        self.iter()
            .zip(v)
            .zip(p)
            .map(|((lf, g), pl)| super::adam::ekfac_apply_preconditioned(lf, g, pl, f))
            .collect()
    }
}

/// One segment's curvature and learning-rate mass, as the walk needs them.
pub struct SegmentCurvature<'a> {
    /// H̄_ℓ: EK-FAC factors of every tracked layer fitted on the segment's data (or dense).
    pub factors: &'a dyn Curvature,
    /// Effective learning-rate mass (momentum already folded in).
    pub mass: LrMass,
}

/// The damped EK-FAC inverse applied to `v` (per layer [Q, d_out, d_in]): the influence
/// function's preconditioned query.
pub fn precondition_inverse(
    factors: &[LayerFactors],
    v: &[Tensor],
    damping: Damping,
) -> Result<Vec<Tensor>> {
    factors
        .iter()
        .zip(v)
        .map(|(f, g)| {
            let damping = damping.for_layer(&f.lambda)?;
            let w = spectral_weights(&f.lambda, SpectralFn::Inverse { damping })?;
            apply_in_basis(&f.basis, &w, g)
        })
        .collect()
}

fn apply(factors: &[LayerFactors], v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
    factors
        .iter()
        .zip(v)
        .map(|(lf, g)| {
            let w = spectral_weights(&lf.lambda, f)?;
            apply_in_basis(&lf.basis, &w, g)
        })
        .collect()
}

/// Walks the query gradient `v_final` (per layer [Q, d_out, d_in]) back through `segments`
/// (in training order) and returns u_ℓ for every segment, in the same order.
pub fn source_walk(
    v_final: &[Tensor],
    segments: &[SegmentCurvature],
    damping: Damping,
) -> Result<Vec<Vec<Tensor>>> {
    let mut v: Vec<Tensor> = v_final.to_vec();
    let mut out: Vec<Vec<Tensor>> = vec![Vec::new(); segments.len()];
    for (l, seg) in segments.iter().enumerate().rev() {
        match seg.mass {
            LrMass::Converged => {
                if l != 0 {
                    return Err(Error::Pipeline(format!(
                        "segment {l} is declared converged (s → ∞), but only the first segment \
                         may be: exp(−∞·σ) would erase what earlier segments receive"
                    )));
                }
                out[l] = seg.factors.inverse(&v, damping)?;
            }
            LrMass::Finite(s) => {
                out[l] = seg.factors.apply(&v, SpectralFn::Inject { s })?;
                if l > 0 {
                    v = seg.factors.apply(&v, SpectralFn::Propagate { s })?;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn factors() -> Vec<LayerFactors> {
        vec![crate::curvature::test_support::random_factors(
            "l",
            (5, 4, 3, 2),
            None,
        )]
    }

    use crate::curvature::test_support::max_abs_diff as max_diff;

    #[test]
    fn one_converged_segment_is_the_influence_function() {
        let f = factors();
        let v = vec![Tensor::randn(0f32, 1.0, (2, 2, 3), &Device::Cpu).unwrap()];
        let seg = [SegmentCurvature {
            factors: &f,
            mass: LrMass::Converged,
        }];
        let u = source_walk(&v, &seg, Damping::Absolute(1e-3)).unwrap();
        let want = precondition_inverse(&f, &v, Damping::Absolute(1e-3)).unwrap();
        assert_eq!(max_diff(&u[0][0], &want[0]), 0.0);
        // A very long finite segment tends to the undamped inverse: F_r(σ) → 1/σ.
        let seg = [SegmentCurvature {
            factors: &f,
            mass: LrMass::Finite(1e9),
        }];
        let u = source_walk(&v, &seg, Damping::Absolute(0.0)).unwrap();
        let want = precondition_inverse(&f, &v, Damping::Absolute(0.0)).unwrap();
        let scale: f32 = want[0]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(max_diff(&u[0][0], &want[0]) <= 1e-3 * scale);
    }

    #[test]
    fn a_short_segment_is_the_scaled_gradient_and_segments_chain() {
        let f1 = factors();
        let f2 = factors();
        let v = vec![Tensor::randn(0f32, 1.0, (2, 2, 3), &Device::Cpu).unwrap()];
        // s σ ≪ 1: u = s v.
        let s = 1e-7;
        let seg = [SegmentCurvature {
            factors: &f1,
            mass: LrMass::Finite(s),
        }];
        let u = source_walk(&v, &seg, Damping::Absolute(0.0)).unwrap();
        let want = (&v[0] * s).unwrap();
        assert!(max_diff(&u[0][0], &want) <= 1e-6 * 1e-7 * 10.0);
        // Two segments: u_1 = F_r(H_1) F_S(H_2) v, u_2 = F_r(H_2) v.
        let segs = [
            SegmentCurvature {
                factors: &f1,
                mass: LrMass::Finite(0.5),
            },
            SegmentCurvature {
                factors: &f2,
                mass: LrMass::Finite(2.0),
            },
        ];
        let u = source_walk(&v, &segs, Damping::Absolute(0.0)).unwrap();
        let u2 = apply(&f2, &v, SpectralFn::Inject { s: 2.0 }).unwrap();
        let v1 = apply(&f2, &v, SpectralFn::Propagate { s: 2.0 }).unwrap();
        let u1 = apply(&f1, &v1, SpectralFn::Inject { s: 0.5 }).unwrap();
        assert_eq!(max_diff(&u[1][0], &u2[0]), 0.0);
        assert_eq!(max_diff(&u[0][0], &u1[0]), 0.0);
        // A converged segment after the first is refused.
        let bad = [
            SegmentCurvature {
                factors: &f1,
                mass: LrMass::Finite(0.5),
            },
            SegmentCurvature {
                factors: &f2,
                mass: LrMass::Converged,
            },
        ];
        assert!(source_walk(&v, &bad, Damping::Absolute(0.1)).is_err());
    }
}
