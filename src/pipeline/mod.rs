//! Owns declared pipelines: stage contract and registry, run dir, manifest, runner, status,
//! named query sets, verification of recorded files.
//! Layer: pipeline — may import ground (error, util, config, output) only; never
//! stages, report or main (the runner is given its stages as a `Registry`).
//!
//! Declared pipelines: the stage contract, run directories, the manifest, and the runner that
//! skips what is complete and reruns what changed.

mod manifest;
mod query_set;
mod rundir;
mod runner;
mod stage;
mod status;
mod verify;

/// Re-exported for the layers above that order stages by name (e.g. the report's timings).
pub use manifest::{Manifest, OutputFile, StageRecord, StageStatus};
pub use query_set::{
    check_set_name, complete_sets, record_name, scores_root, scores_root_in_stage, set_dir,
    QuerySet, DEFAULT_SET, QUERY_SET_STAGES,
};
pub use rundir::{RunDir, RunLock};
pub use runner::{
    run_stages, run_stages_for, stage_key, stage_key_for, staleness, Outcome, RunOptions, StageKey,
};
pub use stage::{Registry, Stage, StageContext, Workers};
pub use status::{status_rows, StatusRow};
pub use verify::{output_mismatch, verify_run, Mismatch, Verification};
