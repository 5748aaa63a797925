//! EK-FAC curvature per layer (docs/design.md §3): Kronecker factors A = E[a aᵀ] and
//! S = E[δ δᵀ] normalised per token, their f64 eigendecomposition (optionally per diagonal
//! block), and the eigenvalue correction Λ normalised per document. The attribution stage
//! applies matrix functions of H̄ through this basis ([`crate::attribution`]).

pub mod blocks;
pub mod cache;
pub mod covariance;
pub mod eigen;
pub mod fit;
pub mod lambda;
pub mod spill;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;

pub use blocks::{BlockDiag, BlockLayout};
pub use cache::{checkpoint_hash, docs_hash, factor_key, FactorCache, Lookup};
pub use covariance::{masked_rows, CovarianceSums, Covariances, FactorSum};
pub use eigen::{eigh, eigh_f64, eigh_f64_with, eigh_with, Eigen, EigenPrecision};
pub use fit::{
    fit_factors, fit_factors_on, fit_factors_with_covariances, Fisher, FitOptions, LayerFactors,
};
pub use lambda::{EigenBasis, LambdaSums};
pub use spill::CaptureSpill;
pub use store::{load_factors, save_factors, FactorFile};
