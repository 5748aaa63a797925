//! Attribution math (DESIGN.md §2): the segment functions F_S and F_r, the damped inverse of
//! the influence function, the eigenbasis primitive they share, and the token-level scoring
//! contraction (dense, or through a low-rank form of the query).

pub mod adam;
pub mod contract;
pub mod dense;
pub mod functions;
pub mod lowrank;
pub mod method;
pub mod plan;
pub mod precondition;
pub mod score;
pub mod source;

pub use adam::{adam_p_eff, eigenbasis_diagonal, ekfac_diagonal, phi, AdamCurvature};
pub use contract::{doc_scores, token_scores};
pub use dense::DenseCurvature;
pub use functions::{inject, SpectralFn};
pub use lowrank::{low_rank, low_rank_token_scores, LayerQuery, LowRankQuery};
pub use precondition::{apply_in_basis, spectral_weights};
pub use score::{
    query_gradients, score_pass, score_pass_on, score_pass_queries, QueryGradients, TrainScores,
};
pub use source::{precondition_inverse, source_walk, Curvature, Damping, SegmentCurvature};
