//! EK-FAC curvature per layer over a data set (docs/design.md §3): the fit passes
//! (covariances, eigendecomposition, eigenvalue correction), the factor files and their cache.
//! Layer: curvature — may import the ground, linalg, backend, model, data, hub, train, passes.

pub mod cache;
pub mod fit;
pub mod shard;
pub mod spill;
pub mod store;

pub use cache::{checkpoint_hash, docs_hash, factor_key, FactorCache, Lookup, FACTOR_CACHE_FORMAT};
pub use fit::{fit_factors, fit_factors_on, fit_factors_with_covariances};
pub use shard::{
    bases_from_tensors, basis_tensors, covariance_shard, factors_from_shards, lambda_shard,
    LayerShape, PartialCovariances, PartialLambda, SumsInfo,
};
pub use spill::CaptureSpill;
pub use store::{load_factors, save_factors, FactorFile};
