//! Owns the Source walk over segments: `source_walk` and `SegmentCurvature`.
//! Layer: attribution — may import every floor from the ground up to curvature and, in this folder,
//! curvature.rs.
//!
//! The Source walk over segments (docs/design.md §2): the query side of Source, and of the
//! influence function as its one-segment, converged case.
//!
//! With v_L = ∇_θ f(q, θ_final), walking from the last segment to the first:
//!   u_ℓ = F_r(H̄_ℓ) v_ℓ,   v_{ℓ−1} = F_S(H̄_ℓ) v_ℓ,
//! and τ(q, m) = Σ_{ℓ : m ∈ D_ℓ} (1/N_ℓ) ⟨u_ℓ, ḡ_ℓ(m)⟩. With recorded steps the walk goes one
//! step group at a time (one step per group when checkpoints are saved at every step), with
//! each group's exact first-order weight Σ ω_k and mass Σ μ_k ([`StepGroup`]). A segment declared `converged`
//! (s → ∞) uses the damped inverse instead of F_r; it must be the first segment, since
//! F_S(∞) would erase every direction the query carries into it.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::linalg::SpectralFn;
use crate::train::LrMass;

use super::curvature::{Curvature, Damping};

/// Consecutive steps of a segment scored through one pair of gradient points (one step when
/// checkpoints are saved at every step): Σ μ_k, Σ ω_k and K ([`crate::train::StepWeight`]).
#[derive(Debug, Clone)]
pub struct StepGroup {
    /// Σ μ_k: the mass by which the group's curvature acts.
    pub mass: f64,
    /// Σ ω_k: how much of the group's gradients reaches θ_T before curvature acts.
    pub weight: f64,
    /// K: its steps.
    pub steps: u64,
    /// ĝ_k per layer (the tracked part of the global unit batch gradient) when the group is
    /// one clipped step whose batch gradient is known: the clip's derivative c (I − ĝ ĝᵀ)
    /// removes the component along ĝ from what the step injects and from how its curvature
    /// acts.
    pub clip_direction: Option<Vec<Tensor>>,
}

/// One segment's curvature and learning-rate mass, as the walk needs them.
pub struct SegmentCurvature<'a> {
    /// H̄_ℓ: EK-FAC factors of every tracked layer fitted on the segment's data (or dense).
    pub factors: &'a dyn Curvature,
    /// Effective learning-rate mass (momentum already folded in).
    pub mass: LrMass,
    /// The segment's steps in groups, in step order. Empty: one group of weight and mass
    /// `mass` (the segment-average form, u = F_r(H̄) v).
    pub groups: Vec<StepGroup>,
}

/// Walks the query gradient `v_final` (per layer [Q, d_out, d_in]) back through `segments`
/// (in training order) and returns, for every segment and every one of its step groups (one
/// for a segment without groups), u in the same order.
///
/// A group of K steps with Σ μ = M and Σ ω = W injects u = (W / M) F_r(M) v and propagates
/// v ← F_S(M) v; a one-step group with a clip direction (Π = I − ĝ ĝᵀ) injects
/// u = Π (ω / μ) F_r(μ) v and propagates v ← ĝ⟨ĝ, v⟩ + F_S(μ) Π v, to first order
/// (I − μ H Π) v, the transposed Jacobian of the clipped step (for the Adam form
/// (I − μ H P Π) v, where the step's is (I − μ H Π P) v: P and Π do not commute, a
/// difference of order μ σ).
pub fn source_walk(
    v_final: &[Tensor],
    segments: &[SegmentCurvature],
    damping: Damping,
) -> Result<Vec<Vec<Vec<Tensor>>>> {
    let mut v: Vec<Tensor> = v_final.to_vec();
    let mut out: Vec<Vec<Vec<Tensor>>> = vec![Vec::new(); segments.len()];
    for (l, seg) in segments.iter().enumerate().rev() {
        match seg.mass {
            LrMass::Converged => {
                if l != 0 {
                    return Err(Error::Pipeline(format!(
                        "segment {l} is declared converged (s → ∞), but only the first segment \
                         may be: exp(−∞·σ) would erase what earlier segments receive"
                    )));
                }
                out[l] = vec![seg.factors.inverse(&v, damping)?];
            }
            LrMass::Finite(s) => {
                let whole = [StepGroup {
                    mass: s,
                    weight: s,
                    steps: 0,
                    clip_direction: None,
                }];
                let groups = if seg.groups.is_empty() {
                    &whole[..]
                } else {
                    &seg.groups[..]
                };
                let mut us = Vec::with_capacity(groups.len());
                for (j, g) in groups.iter().enumerate().rev() {
                    us.push(inject(seg.factors, &v, g)?);
                    if l > 0 || j > 0 {
                        v = propagate(seg.factors, &v, g)?;
                    }
                }
                us.reverse();
                out[l] = us;
            }
        }
    }
    Ok(out)
}

/// u of one group given the v that reaches its end: (W / M) F_r(M) v, which at M σ → 0 is
/// W v (W P v for the Adam form) and for one step differs from the exact ω v by O(μ σ). A
/// clipped one-step group projects the result, u = Π (ω / μ) F_r(μ) v: the clip acts on the
/// gradient before the optimizer does, so δθ = −ω P Π δg and u = Π P v (to O(μ σ)), which
/// for the Adam form differs from P Π v at first order. A group of zero mass but non-zero
/// weight (η = 0 while momentum still carries earlier gradients) takes the M → 0 limit.
fn inject(f: &dyn Curvature, v: &[Tensor], g: &StepGroup) -> Result<Vec<Tensor>> {
    if g.weight == 0.0 {
        return scale(v, 0.0);
    }
    if g.clip_direction.is_some() && g.steps != 1 {
        return Err(Error::Numeric(format!(
            "a clip direction belongs to one step, not to a group of {}",
            g.steps
        )));
    }
    let m = if g.mass > 0.0 {
        g.mass
    } else {
        1e-6 * g.weight.abs()
    };
    let y = scale(&f.apply(v, SpectralFn::Inject { s: m })?, g.weight / m)?;
    match &g.clip_direction {
        Some(dir) => Ok(split_along(&y, dir)?.1),
        None => Ok(y),
    }
}

/// v carried back over one group.
fn propagate(f: &dyn Curvature, v: &[Tensor], g: &StepGroup) -> Result<Vec<Tensor>> {
    match &g.clip_direction {
        None => f.apply(v, SpectralFn::Propagate { s: g.mass }),
        Some(dir) => {
            let (along, perp) = split_along(v, dir)?;
            let p = f.apply(&perp, SpectralFn::Propagate { s: g.mass })?;
            along.iter().zip(&p).map(|(a, b)| Ok((a + b)?)).collect()
        }
    }
}

fn scale(v: &[Tensor], a: f64) -> Result<Vec<Tensor>> {
    v.iter().map(|t| Ok((t * a)?)).collect()
}

/// (ĝ⟨ĝ, v⟩, v − ĝ⟨ĝ, v⟩) per query, ⟨·,·⟩ summed over every layer: `v` per layer
/// [Q, d_out, d_in], `dir` (ĝ) per layer [d_out, d_in].
fn split_along(v: &[Tensor], dir: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    if v.len() != dir.len() {
        return Err(Error::Numeric(format!(
            "clip direction covers {} layers but the query has {}",
            dir.len(),
            v.len()
        )));
    }
    let mut dots: Option<Tensor> = None;
    for (vl, gl) in v.iter().zip(dir) {
        let d = vl.dims();
        if d.len() < 2 || &d[d.len() - 2..] != gl.dims() {
            return Err(Error::Numeric(format!(
                "clip direction {:?} and query {:?} differ in shape",
                gl.dims(),
                d
            )));
        }
        let per = gl.elem_count();
        let q = vl.elem_count() / per;
        let gl = gl.to_dtype(vl.dtype())?;
        let dl = vl.reshape((q, per))?.matmul(&gl.reshape((per, 1))?)?;
        dots = Some(match dots {
            None => dl,
            Some(a) => (a + dl)?,
        });
    }
    let Some(dots) = dots else {
        return Ok((Vec::new(), Vec::new()));
    };
    let (mut along, mut perp) = (Vec::new(), Vec::new());
    for (vl, gl) in v.iter().zip(dir) {
        let per = gl.elem_count();
        let gl = gl.to_dtype(vl.dtype())?;
        let a = dots.matmul(&gl.reshape((1, per))?)?.reshape(vl.dims())?;
        perp.push((vl - &a)?);
        along.push(a);
    }
    Ok((along, perp))
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
            groups: Vec::new(),
        }];
        let u = source_walk(&v, &seg, Damping::Absolute(1e-3)).unwrap();
        let want = precondition_inverse(&f, &v, Damping::Absolute(1e-3)).unwrap();
        assert_eq!(max_diff(&u[0][0][0], &want[0]), 0.0);
        // A very long finite segment tends to the undamped inverse: F_r(σ) → 1/σ.
        let seg = [SegmentCurvature {
            factors: &f,
            mass: LrMass::Finite(1e9),
            groups: Vec::new(),
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
        assert!(max_diff(&u[0][0][0], &want[0]) <= 1e-3 * scale);
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
            groups: Vec::new(),
        }];
        let u = source_walk(&v, &seg, Damping::Absolute(0.0)).unwrap();
        let want = (&v[0] * s).unwrap();
        assert!(max_diff(&u[0][0][0], &want) <= 1e-6 * 1e-7 * 10.0);
        // Two segments: u_1 = F_r(H_1) F_S(H_2) v, u_2 = F_r(H_2) v.
        let segs = [
            SegmentCurvature {
                factors: &f1,
                mass: LrMass::Finite(0.5),
                groups: Vec::new(),
            },
            SegmentCurvature {
                factors: &f2,
                mass: LrMass::Finite(2.0),
                groups: Vec::new(),
            },
        ];
        let u = source_walk(&v, &segs, Damping::Absolute(0.0)).unwrap();
        let u2 = f2.apply(&v, SpectralFn::Inject { s: 2.0 }).unwrap();
        let v1 = f2.apply(&v, SpectralFn::Propagate { s: 2.0 }).unwrap();
        let u1 = f1.apply(&v1, SpectralFn::Inject { s: 0.5 }).unwrap();
        assert_eq!(max_diff(&u[1][0][0], &u2[0]), 0.0);
        assert_eq!(max_diff(&u[0][0][0], &u1[0]), 0.0);
        // A converged segment after the first is refused.
        let bad = [
            SegmentCurvature {
                factors: &f1,
                mass: LrMass::Finite(0.5),
                groups: Vec::new(),
            },
            SegmentCurvature {
                factors: &f2,
                mass: LrMass::Converged,
                groups: Vec::new(),
            },
        ];
        assert!(source_walk(&v, &bad, Damping::Absolute(0.1)).is_err());
    }
}
