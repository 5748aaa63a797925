//! Attribution math (docs/design.md §2): the segment functions F_S and F_r applied through a
//! segment's curvature, the influence function's damped inverse (and its refinement with
//! exact Gauss–Newton products, §9), Source's Adam form, and the
//! query and scoring passes that turn them into scores.
//! Layer: attribution — may import every layer below it (ground … passes, curvature).

pub mod acting;
pub mod adam;
pub mod clip;
pub mod curvature;
pub mod dense;
pub mod gen_tokens;
pub mod index;
pub mod method;
pub mod plan;
pub mod refine;
pub mod score;
pub mod source;

pub use adam::{adam_p_eff, AdamCurvature};
pub use clip::{clip_direction, has_clip_directions, step_groups};
pub use curvature::{
    precondition_inverse, precondition_inverse_factored, Curvature, Damping, OnBackend,
};
pub use dense::DenseCurvature;
pub use gen_tokens::{gen_token_docs, gen_token_gradients, GenToken, GenTokenGradients};
pub use refine::{layer_dampings, refine_inverse, GaussNewtonSample};
pub use score::{
    query_gradients, score_pass, score_pass_on, score_pass_parts, score_pass_queries,
    QueryGradients, ScoreParts, TrainScores,
};
pub use source::{source_walk, SegmentCurvature, StepGroup};
