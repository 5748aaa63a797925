//! A segment's curvature H̄ as the attribution math sees it: the [`Curvature`] contract, the
//! influence function's [`Damping`], and its EK-FAC implementation [`OnBackend`], which
//! applies every function of H̄ through the one eigenbasis primitive of a [`Backend`].
//! Layer: attribution — may import every layer below it (linalg, backend, …, curvature).

use candle_core::Tensor;

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::linalg::{
    preconditioned_weights, spectral_weights, LayerFactors, SpectralFn, TokenFactors,
};

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

    /// [`inverse`](Self::inverse) of per-layer gradients given as token factors
    /// (V = Δᵀ A). The default forms V; EK-FAC rotates the factors where that is cheaper.
    fn inverse_factored(&self, v: &[TokenFactors], damping: Damping) -> Result<Vec<Tensor>> {
        let dense = v
            .iter()
            .map(TokenFactors::dense)
            .collect::<Result<Vec<_>>>()?;
        self.inverse(&dense, damping)
    }

    /// Q diag(F(σ_e, p_e)) Qᵀ v: a function of each eigenvalue σ_e of H̄ (eigenvector q_e)
    /// and of p_e = q_eᵀ diag(p) q_e, the diagonal of a diagonal preconditioner `p` (per
    /// layer, shaped like the layer's gradient [d_out, d_in]) in H̄'s eigenbasis. Source's
    /// Adam form ([`super::adam`]) is built on it.
    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>>;
}

/// EK-FAC factors of every tracked layer with the backend that applies functions of them:
/// F(H̄) v = Q_S (W ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ per layer, W = F(Λ) or F(Λ, p_Q)
/// (docs/design.md §3.4), computed by [`Backend::apply_in_basis`].
pub struct OnBackend<'a> {
    /// The factors, one per tracked layer.
    pub factors: &'a [LayerFactors],
    /// Where the eigenbasis primitive runs.
    pub backend: &'a dyn Backend,
}

impl OnBackend<'_> {
    /// Applies per-layer weights `w(layer factors)` through each layer's eigenbasis.
    fn apply_weights(
        &self,
        v: &[Tensor],
        mut w: impl FnMut(&LayerFactors) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        self.factors
            .iter()
            .zip(v)
            .map(|(lf, g)| self.backend.apply_in_basis(&lf.basis, &w(lf)?, g))
            .collect()
    }
}

impl Curvature for OnBackend<'_> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        self.apply_weights(v, |lf| spectral_weights(&lf.lambda, f))
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        self.apply_weights(v, |lf| {
            let damping = damping.for_layer(&lf.lambda)?;
            spectral_weights(&lf.lambda, SpectralFn::Inverse { damping })
        })
    }

    fn inverse_factored(&self, v: &[TokenFactors], damping: Damping) -> Result<Vec<Tensor>> {
        self.factors
            .iter()
            .zip(v)
            .map(|(lf, g)| {
                let w = spectral_weights(
                    &lf.lambda,
                    SpectralFn::Inverse {
                        damping: damping.for_layer(&lf.lambda)?,
                    },
                )?;
                self.backend.apply_in_basis_factored(&lf.basis, &w, g)
            })
            .collect()
    }

    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        let mut p = p.iter();
        self.apply_weights(v, |lf| {
            let pl = p.next().ok_or_else(|| {
                Error::Numeric("the preconditioner has fewer layers than the factors".into())
            })?;
            preconditioned_weights(&lf.basis, &lf.lambda, pl, f)
        })
    }
}

/// EK-FAC factors on the CPU backend.
impl Curvature for Vec<LayerFactors> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        on_cpu(self).apply(v, f)
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        on_cpu(self).inverse(v, damping)
    }

    fn inverse_factored(&self, v: &[TokenFactors], damping: Damping) -> Result<Vec<Tensor>> {
        on_cpu(self).inverse_factored(v, damping)
    }

    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        on_cpu(self).apply_preconditioned(v, p, f)
    }
}

static CPU: std::sync::LazyLock<CpuBackend> = std::sync::LazyLock::new(CpuBackend::new);

fn on_cpu(factors: &[LayerFactors]) -> OnBackend<'_> {
    OnBackend {
        factors,
        backend: &*CPU,
    }
}

/// The damped EK-FAC inverse (H̄ + λ)⁻¹ applied to `v` (per layer [Q, d_out, d_in]) on the
/// CPU: the influence function's preconditioned query.
pub fn precondition_inverse(
    factors: &[LayerFactors],
    v: &[Tensor],
    damping: Damping,
) -> Result<Vec<Tensor>> {
    on_cpu(factors).inverse(v, damping)
}

/// [`precondition_inverse`] of query gradients given as token factors (V = Δᵀ A per layer):
/// the same value up to f32 rounding, with the rotation into the eigenbasis taken from the
/// factors where that is cheaper.
pub fn precondition_inverse_factored(
    factors: &[LayerFactors],
    v: &[TokenFactors],
    damping: Damping,
) -> Result<Vec<Tensor>> {
    on_cpu(factors).inverse_factored(v, damping)
}
