//! The integration tests, linked as one test binary (`it`): each `tests/it/NAME.rs` is the
//! module `NAME` declared below, and `tests/it/common/` holds the helpers they share. Run them
//! all with `cargo test --release --test it`, one module with
//! `cargo test --release --test it NAME::` (e.g. `config_errors::`). Cargo finds this binary
//! by the standard layout (`tests/it/main.rs`); a new test module is a new file here plus its
//! `mod NAME;` line. The CUDA modules (`cuda_ptx`, `cuda_parity`) are empty unless a CUDA
//! feature is on: `cargo test --release --features cuda-kernels --test it cuda_` runs them.
//!
//! Why one binary: the 29 separate ones took 332 s to rebuild on 2 cores, most of it six of
//! them instantiating parquet's generic reader and writer again; with one binary and Parquet
//! read and written through the library's non-generic `output::parquet::{read_batches,
//! write_batches}`, 42 s.

// Shared helpers (tests/it/common/).
mod common;

// One module per test file.
mod attribution_engine;
mod attribution_options;
mod candidates;
mod cli_logs;
mod cli_scripting;
mod config_errors;
mod config_train;
mod cuda_parity;
mod cuda_ptx;
mod data_codecs;
mod demo;
mod eval;
mod eval_spans;
mod fetch;
mod fetch_real_cache;
mod finetune;
mod finetune_checkpoint_compat;
mod finetune_cli;
mod finetune_stages;
mod gen_tokens;
mod generated_queries;
mod hf_data;
mod hub_token;
mod import_trainer;
mod integrity;
mod layers;
mod loader_fuzz;
mod lora;
mod lora_checkpoints;
mod lora_gpt2;
mod lora_hub;
mod model_capture;
mod model_families_reference;
mod model_finite_diff;
mod model_generate;
mod model_ggn;
mod model_gpt2_reference;
mod model_llama_reference;
mod model_loading;
mod plan;
mod prepare;
mod pretrain_from_model;
mod query_sets;
mod real_smollm2;
mod reference_kronfluence;
mod refine;
mod report;
mod resume;
mod score_output;
mod score_shards;
mod shards;
mod source_exact;
mod source_steps;
mod stages_attribution;
mod token_text;
mod train_optim;
