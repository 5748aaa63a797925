//! The linear algebra of EK-FAC: symmetric eigendecompositions, block-diagonal factors, the
//! covariance and Λ sums, a layer's eigenbasis and fitted factors, the spectral functions
//! F(σ), the one eigenbasis primitive (also on token-factored gradients), query forms, the token contraction, the
//! Kronecker sketch of gradients and preconditioned conjugate gradients.
//! Layer: linalg — may import only the ground floor (error, util, config, output).

pub mod basis;
pub mod blocks;
pub mod cg;
pub mod contract;
pub mod covariance;
pub mod eigen;
pub mod factored;
pub mod factors;
pub mod lambda;
pub mod query;
pub mod rank_one;
pub mod sketch;
pub mod spectral;
#[cfg(test)]
pub(crate) mod test_support;

pub use basis::{
    apply_in_basis, eigenbasis_diagonal, parameter_diagonal, preconditioned_weights,
    spectral_weights, EigenBasis,
};
pub use blocks::{BlockDiag, BlockLayout};
pub use cg::{pcg, pcg_from, CgOptions, CgOutcome};
pub use contract::{doc_scores, token_scores};
pub use covariance::{masked_rows, CovarianceSums, Covariances, FactorSum};
pub use eigen::{eigh, eigh_f64, eigh_f64_with, eigh_with, Eigen};
pub use factored::{apply_in_basis_factored, TokenFactors};
pub use factors::{ekfac_diagonal, LayerFactors};
pub use lambda::LambdaSums;
pub use query::{low_rank, low_rank_token_scores, LayerQuery, LowRankQuery};
pub use rank_one::RankOne;
pub use spectral::{inject, phi, SpectralFn};
