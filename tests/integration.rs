//! The integration tests, linked as one test binary: each `tests/NAME.rs` is the module `NAME`
//! here (`cargo test --release --test integration NAME::` runs one file's tests). Cargo's
//! automatic test discovery is off (`autotests = false`), so a new test file must be added
//! below; `every_test_file_is_a_module_here` fails otherwise. The CUDA tests
//! (`tests/cuda_*.rs`) stay separate binaries: they build only with a CUDA feature.
//!
//! Why one binary: the 29 separate ones took 332 s to rebuild on 2 cores, most of it six of
//! them instantiating parquet's generic reader and writer again; with one binary and Parquet
//! read and written through the library's non-generic `output::parquet::{read_batches,
//! write_batches}`, 42 s.

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

/// Every `tests/*.rs` other than this file and the CUDA tests is declared above: with
/// `autotests = false` an undeclared file would silently never compile or run.
#[test]
fn every_test_file_is_a_module_here() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let root = std::fs::read_to_string(dir.join("integration.rs")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(module) = name.strip_suffix(".rs") else {
            continue;
        };
        if module == "integration" || module.starts_with("cuda_") {
            continue;
        }
        if !root.contains(&format!("\nmod {module};\n")) {
            missing.push(format!("tests/{module}.rs"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} never compile or run: declare each as `mod NAME;` in tests/integration.rs \
         (Cargo.toml sets autotests = false)",
        missing.join(", ")
    );
}
