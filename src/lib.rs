//! # source-tda
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
//! The library does the work; `src/main.rs` is a thin command line over it.
//!
//! * [`config`]: typed, validated parameter sets (`configs/*.toml`) and pipelines
//!   (`pipelines/*.toml`).
//! * [`pipeline`]: the stage contract, run directories, the manifest and resume logic.
//! * [`hub`]: model and dataset resolution through the `hf-hub` crate (online, offline
//!   cache, or local paths).
//! * [`data`]: dataset readers (Parquet, JSONL, CSV), tokenisation into documents with
//!   loss masks, and deterministic token-budget batching.
//! * [`model`]: transformer families (Llama, GPT-2) on candle with tracked linear layers:
//!   the layer inputs `a` and output gradients `δ` that all attribution is computed from. GGUF files
//!   convert to Hugging Face checkpoints ([`model::gguf`]).
//! * [`stages`]: the stage implementations the runner knows.
//! * [`curvature`]: EK-FAC factors per layer (covariances, eigenbasis, eigenvalue correction).
//! * [`attribution`]: F_S, F_r, the eigenbasis primitive and the token-level contraction.
//! * [`report`]: the HTML report, terminal summary and summary.json of a run.
//! * [`backend`]: where `fit` and `score` run (CPU reference or CUDA kernels), behind one
//!   trait.
//! * [`cuda`]: the project's CUDA kernels (features `cuda` / `cuda-kernels`) and their CPU
//!   references.
//! * [`util`]: hashing, atomic writes, memory measurement, progress bars.

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

/// The git commit the binary was built from, when the build could read it.
pub const GIT_COMMIT: Option<&str> = option_env!("SOURCE_TDA_GIT_COMMIT");
