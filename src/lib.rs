//! # source-tda
//!
//! Owns the library's root: every floor's module (table below), `VERSION`, `GIT_COMMIT` and
//! `FORMAT_VERSION`.
//! Layer: the root, over every floor — may import any module; imports only error (re-exports
//! `Error`, `Result`).
//!
//! Training data attribution for fine-tuned language models: *which fine-tuning documents,
//! and which tokens in them, made my model generate this?* The method is Source
//! (approximate unrolled differentiation, Bae et al. 2024) with EK-FAC curvature, run as a
//! declared, resumable pipeline of stages:
//!
//! ```text
//! fetch ─► prepare ─► finetune ─► fit ─► query ─► score ─► report
//! ```
//!
//! The library does the work; `src/main.rs` is a thin command line over it. Its modules
//! stand on floors, and each imports only from its own floor and those below
//! (`tests/it/layers.rs` checks it on the sources; docs/design.md §4):
//!
//! | floor | modules | what they own |
//! |---|---|---|
//! | ground | [`error`], [`util`], [`config`], [`output`] | errors, hashing and atomic writes, typed configs and pipelines, Parquet |
//! | linalg | [`linalg`] | eigenbases, block-diagonal factors, covariance and Λ sums, F(σ), the one eigenbasis primitive, query forms |
//! | backend | [`backend`] | where the heavy operations run: CPU, or the project's CUDA kernels ([`backend::cuda`]) |
//! | model | [`model`] | transformer families on candle with tracked linear layers (a, δ); GGUF conversion |
//! | data | [`data`] | dataset readers, tokenisation with loss masks, token-budget batching |
//! | hub | [`hub`] | model and dataset resolution through `hf-hub` (online, offline cache, local paths) |
//! | train | [`train`] | fine-tuning with a recorded trajectory, checkpoints, optimizers |
//! | passes | [`passes`] | the one batch loop every pass over data runs on |
//! | math | [`curvature`], then [`attribution`] above it | EK-FAC fits and factor files; F_S, F_r, Source, the influence function, scoring |
//! | eval | [`eval`] | attribution-quality statistics (recall, LDS) |
//! | pipeline | [`pipeline`] | run directories, the manifest, the runner given a stage registry |
//! | report | [`report`] | the HTML report, terminal summary and summary.json |
//! | stages | [`stages`] | the stage implementations: I/O and orchestration |

pub mod attribution;
pub mod backend;
pub mod config;
pub mod curvature;
pub mod data;
pub mod error;
pub mod eval;
pub mod hub;
pub mod linalg;
pub mod model;
pub mod output;
pub mod passes;
pub mod pipeline;
pub mod report;
pub mod stages;
pub mod train;
pub mod util;

pub use error::{Error, Result};

/// The tool's version, as recorded in every manifest and Parquet file.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The format of what a run writes: the run directory's layout (`manifest.json` and every
/// stage's files) and the schemas of the tool's Parquet tables. Recorded in each manifest
/// (`format_version`) and each Parquet file (`source_tda.format_version`); a run directory or
/// table of another format is refused, never misread. Bump it with any change to a layout or
/// schema that an earlier or later build would misread. (The factor cache has its own,
/// `curvature::FACTOR_CACHE_FORMAT`.)
pub const FORMAT_VERSION: u32 = 2;

/// The git commit the binary was built from, when the build could read it.
pub const GIT_COMMIT: Option<&str> = option_env!("SOURCE_TDA_GIT_COMMIT");
