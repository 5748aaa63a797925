//! Owns Source's Adam variant: `AdamCurvature` (P = diag(p̄) in the EK-FAC basis), `adam_p_eff`.
//! Layer: attribution — may import every floor from the ground up to curvature and, in this folder,
//! curvature.rs.
//!
//! Source's Adam variant. With an Adam update (Adam's v̂ held fixed within a segment) the
//! linearised step is δθ ← (I − η P H) δθ − η P δg, P = diag(p̄), p̄ = the segment average of
//! 1/(√v̂ + ε). Over a segment of mass s that gives, on the query side,
//!
//!   propagation  v ← exp(−s H P) v,
//!   injection    u = H⁻¹ (I − exp(−s H P)) v = s P φ(s H P) v,   φ(x) = (1 − e^{−x}) / x,
//!
//! (the second form is an exact identity: I − e^{−sX} = s X φ(sX) with X = HP). P and H do
//! not share an eigenbasis, so HP is approximated in H̄'s EK-FAC eigenbasis Q by
//! Λ ⊙ p_Q with p_Q = diag(Qᵀ P Q) = (Q_S ∘ Q_S)ᵀ p̄ (Q_A ∘ Q_A), the best diagonal stand-in
//! for P in that basis. So, per eigen-direction e with eigenvalue σ_e,
//!
//!   propagation  Q exp(−s σ_e p_Q,e) Qᵀ v,
//!   injection    u = s p̄ ⊙ (Q φ(s σ_e p_Q,e) Qᵀ v).
//!
//! Both limits hold without damping: s σ ≪ 1 gives u = s P v exactly (Adam's preconditioned
//! gradient dot product: what a short fine-tune does to first order), and when P = c I
//! within a layer the formulas are exact for every s (then u = F_r(H) v at mass c s, and
//! s → ∞ gives H⁻¹ v).
//!
//! What P is. Adam's update is u = m̂ / (√v̂ + ε). With v̂ held fixed (`fixed_v`) a
//! perturbation δg of the gradients moves it by P δg, P = 1/(√v̂ + ε). Letting m̂ and v̂
//! respond as well (`full`), with δg the same at every step of the window (Source's
//! segment-stationarity assumption), δm̂ = δg and δ√v̂ = m̂ δg / √v̂ (the bias-corrected
//! moving averages' weights sum to one; v̂'s average of g δg is taken as m̂ δg), so
//!
//!   δu = P_eff δg,   P_eff = P ⊙ clamp(1 − m̂² / (√v̂ (√v̂ + ε)), 0, 1)  ([`adam_p_eff`]).
//!
//! In Adam's first steps m̂² ≈ v̂: the update is sign-like and hardly responds to the data
//! (P_eff ≈ 0); m̂ = 0 gives back P exactly. The linearised dynamics' ∂u/∂θ = (∂u/∂g) H use
//! the same P_eff, so it replaces P in both propagation and injection. AdamW's decoupled
//! weight decay does not depend on g and changes neither.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::linalg::{phi, SpectralFn};

use super::curvature::{Curvature, Damping};

/// A segment's curvature seen through Adam's (fixed, diagonal) preconditioner P = diag(p̄).
pub struct AdamCurvature<'a> {
    /// H̄ (EK-FAC or dense).
    pub inner: &'a dyn Curvature,
    /// p̄: the segment's average of 1/(√v̂ + ε) per layer, shaped like the layer's gradient
    /// [d_out, d_in].
    pub p_bar: Vec<Tensor>,
}

impl Curvature for AdamCurvature<'_> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        check_shapes(v, &self.p_bar)?;
        match f {
            SpectralFn::Propagate { s } => {
                self.inner
                    .apply_preconditioned(v, &self.p_bar, &|sig, p| (-s * sig.max(0.0) * p).exp())
            }
            SpectralFn::Inject { s } => {
                let y = self
                    .inner
                    .apply_preconditioned(v, &self.p_bar, &|sig, p| phi(s * sig * p))?;
                y.iter()
                    .zip(&self.p_bar)
                    .map(|(yl, pl)| Ok((yl.broadcast_mul(pl)? * s)?))
                    .collect()
            }
            SpectralFn::Inverse { damping } => self.inner.inverse(v, Damping::Absolute(damping)),
            SpectralFn::Identity => Ok(v.to_vec()),
        }
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        self.inner.inverse(v, damping)
    }

    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        self.inner.apply_preconditioned(v, p, f)
    }
}

fn check_shapes(v: &[Tensor], p: &[Tensor]) -> Result<()> {
    if v.len() != p.len() {
        return Err(Error::Numeric(format!(
            "Adam preconditioner covers {} layers but the gradient has {}",
            p.len(),
            v.len()
        )));
    }
    for (vl, pl) in v.iter().zip(p) {
        let d = vl.dims();
        if d.len() < 2 || &d[d.len() - 2..] != pl.dims() {
            return Err(Error::Numeric(format!(
                "Adam preconditioner {:?} and gradient {:?} differ in shape",
                pl.dims(),
                d
            )));
        }
    }
    Ok(())
}

/// Adam's preconditioner at one step, elementwise: P = 1/(√v̂ + ε) (`m_hat` None: v̂ held
/// fixed), or P_eff = P ⊙ clamp(1 − m̂²/(√v̂ (√v̂ + ε)), 0, 1) (the response of the update
/// u = m̂/(√v̂ + ε) to a gradient perturbation shared by every step). `v_hat` (v̂) and
/// `m_hat` (m̂) are bias-corrected and shaped alike; entries with v̂ = 0 (and so m̂ = 0)
/// keep P. With m̂ = 0 the result is P bit for bit.
pub fn adam_p_eff(v_hat: &Tensor, m_hat: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let v_hat = v_hat.to_dtype(DType::F32)?;
    let sqrt_v = v_hat.sqrt()?;
    let p = (&sqrt_v + eps)?.recip()?;
    let Some(m_hat) = m_hat else {
        return Ok(p);
    };
    if m_hat.dims() != v_hat.dims() {
        return Err(Error::Numeric(format!(
            "Adam's m̂ {:?} and v̂ {:?} differ in shape",
            m_hat.dims(),
            v_hat.dims()
        )));
    }
    // m̂² P / √v̂, with √v̂ floored so that v̂ = 0 (where m̂ = 0 too) gives 0, not 0/0.
    let ratio =
        ((m_hat.to_dtype(DType::F32)?.sqr()? * &p)? / sqrt_v.maximum(f32::MIN_POSITIVE)?)?;
    let factor = ratio.affine(-1.0, 1.0)?.clamp(0f32, 1f32)?;
    Ok((p * factor)?)
}

#[cfg(test)]
mod tests;
