//! A segment's EK-FAC factors seen through a [`Backend`]: the [`Curvature`] the Source walk
//! and the influence function use, with every eigenbasis function application
//! (docs/design.md §3.4) done by the backend.

use candle_core::Tensor;

use crate::attribution::{Curvature, Damping, SpectralFn};
use crate::curvature::LayerFactors;
use crate::error::Result;

use super::Backend;

/// EK-FAC factors of every tracked layer with the backend that applies functions of them.
pub struct OnBackend<'a> {
    /// The factors, one per tracked layer.
    pub factors: &'a [LayerFactors],
    /// Where Q_S (F(Λ) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ is computed.
    pub backend: &'a dyn Backend,
}

impl Curvature for OnBackend<'_> {
    fn apply(&self, v: &[Tensor], f: SpectralFn) -> Result<Vec<Tensor>> {
        self.factors
            .iter()
            .zip(v)
            .map(|(lf, g)| self.backend.apply_in_basis(&lf.basis, &lf.lambda, f, g))
            .collect()
    }

    fn inverse(&self, v: &[Tensor], damping: Damping) -> Result<Vec<Tensor>> {
        self.factors
            .iter()
            .zip(v)
            .map(|(lf, g)| {
                let damping = damping.for_layer(&lf.lambda)?;
                self.backend.apply_in_basis(
                    &lf.basis,
                    &lf.lambda,
                    SpectralFn::Inverse { damping },
                    g,
                )
            })
            .collect()
    }

    /// On the host for every backend: the preconditioned function is evaluated per
    /// eigenvector pair from p's diagonal in the eigenbasis, which no kernel does yet.
    fn apply_preconditioned(
        &self,
        v: &[Tensor],
        p: &[Tensor],
        f: &dyn Fn(f64, f64) -> f64,
    ) -> Result<Vec<Tensor>> {
        self.factors
            .iter()
            .zip(v)
            .zip(p)
            .map(|((lf, g), pl)| crate::attribution::adam::ekfac_apply_preconditioned(lf, g, pl, f))
            .collect()
    }
}
