//! The integration tests, linked as one test binary: each `tests/NAME.rs` is the module `NAME`
//! here (`cargo test --release --test integration NAME::` runs one file's tests). One binary
//! instead of 29: each separate one compiled and linked its own copy of the shared helpers and
//! of the generic code it used from the dependencies (arrow, parquet, serde, candle), which took
//! ~5.5 minutes of a release build on 2 cores. The CUDA tests (`tests/cuda_*.rs`) stay separate
//! binaries: they build only with a CUDA feature.

// Shared helpers.
mod common;
#[path = "common/model_fixtures.rs"]
mod fixtures;
#[path = "common/real_assets.rs"]
mod real_assets;
mod real_smollm2_support;

// One module per test file.
mod attribution_engine;
mod attribution_options;
mod config_errors;
mod config_train;
mod demo;
mod eval;
mod fetch;
mod fetch_real_cache;
mod finetune;
mod finetune_checkpoint_compat;
mod finetune_cli;
mod finetune_stages;
mod generated_queries;
mod import_trainer;
mod model_capture;
mod model_finite_diff;
mod model_generate;
mod model_gpt2_reference;
mod model_llama_reference;
mod model_loading;
mod prepare;
mod pretrain_from_model;
mod real_smollm2;
mod reference_kronfluence;
mod report;
mod resume;
mod source_exact;
mod stages_attribution;
mod train_optim;
