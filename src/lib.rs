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
//! * [`model`]: model weights (GGUF conversion to a Hugging Face checkpoint).
//! * [`stages`]: the stage implementations the runner knows.
//! * [`util`]: hashing, atomic writes, memory measurement, progress bars.

pub mod config;
pub mod data;
pub mod error;
pub mod hub;
pub mod model;
pub mod pipeline;
pub mod stages;
pub mod util;

pub use error::{Error, Result};

/// The tool's version, as recorded in every manifest and Parquet file.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from, when the build could read it.
pub const GIT_COMMIT: Option<&str> = option_env!("SOURCE_TDA_GIT_COMMIT");
