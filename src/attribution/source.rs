//! Owns the Source walk over segments: `source_walk` and `SegmentCurvature`.
//! Layer: attribution — may import every floor from the ground up to curvature and, in this folder,
//! curvature.rs.
//!
//! The Source walk over segments (docs/design.md §2): the query side of Source, and of the
//! influence function as its one-segment, converged case.
//!
//! With v_L = ∇_θ f(q, θ_final), walking from the last segment to the first:
//!   u_ℓ = F_r(H̄_ℓ) v_ℓ,   v_{ℓ−1} = F_S(H̄_ℓ) v_ℓ,
//! and τ(q, m) = Σ_{ℓ : m ∈ D_ℓ} (1/N_ℓ) ⟨u_ℓ, ḡ_ℓ(m)⟩. A segment declared `converged`
//! (s → ∞) uses the damped inverse instead of F_r; it must be the first segment, since
//! F_S(∞) would erase every direction the query carries into it.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::linalg::SpectralFn;
use crate::train::LrMass;

use super::curvature::{Curvature, Damping};

/// One segment's curvature and learning-rate mass, as the walk needs them.
pub struct SegmentCurvature<'a> {
    /// H̄_ℓ: EK-FAC factors of every tracked layer fitted on the segment's data (or dense).
    pub factors: &'a dyn Curvature,
    /// Effective learning-rate mass (momentum already folded in).
    pub mass: LrMass,
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
    use crate::attribution::curvature::precondition_inverse;
    use crate::linalg::LayerFactors;
    use candle_core::Device;

    fn factors() -> Vec<LayerFactors> {
        vec![crate::linalg::test_support::random_factors(
            "l",
            (5, 4, 3, 2),
            None,
        )]
    }

    use crate::linalg::test_support::max_abs_diff as max_diff;

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
        let u2 = f2.apply(&v, SpectralFn::Inject { s: 2.0 }).unwrap();
        let v1 = f2.apply(&v, SpectralFn::Propagate { s: 2.0 }).unwrap();
        let u1 = f1.apply(&v1, SpectralFn::Inject { s: 0.5 }).unwrap();
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
