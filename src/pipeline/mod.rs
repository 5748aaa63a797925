//! Declared pipelines: the stage contract, run directories, the manifest, and the runner that
//! skips what is complete and reruns what changed.

mod manifest;
mod rundir;
mod runner;
mod stage;
mod status;

pub use manifest::{Manifest, OutputFile, StageRecord, StageStatus};
pub use rundir::{RunDir, RunLock};
pub use runner::{
    find_stage, registry, run_stages, stage_key, staleness, Outcome, RunOptions, StageKey,
};
pub use stage::{stage_order, Stage, StageContext, STAGE_ORDER};
pub use status::{status_rows, StatusRow};
