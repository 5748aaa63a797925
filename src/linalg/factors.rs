//! A layer's fitted EK-FAC factors: covariances A and S, their eigenbasis Q, and the
//! eigenvalue correction Λ (docs/design.md §3). Layer: linalg — may import only the ground.

use candle_core::{DType, Tensor};

use crate::error::Result;

use super::basis::{parameter_diagonal, EigenBasis};
use super::covariance::Covariances;

/// EK-FAC factors of one layer.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    /// Module name.
    pub name: String,
    /// Averaged, normalised covariances.
    pub covariances: Covariances,
    /// Their eigenbasis.
    pub basis: EigenBasis,
    /// Λ [d_out, d_in] (f64), averaged over checkpoints, normalised per document.
    pub lambda: Tensor,
}

/// diag(H̄) of one layer's EK-FAC factors, shaped [d_out, d_in]:
/// d = (Q_S ∘ Q_S) Λ (Q_A ∘ Q_A)ᵀ, i.e. the eigenbasis back-rotation with squared blocks.
pub fn ekfac_diagonal(f: &LayerFactors) -> Result<Tensor> {
    parameter_diagonal(&f.basis, &f.lambda.to_dtype(DType::F32)?)
}
