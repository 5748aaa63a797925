//! Train: the fine-tuning loop, optimizers, schedules, run plan, checkpoints, trajectories.
//! Layer: train — may import ground, linalg, backend, model, data and hub.
//!
//! The fine-tuning loop, optimizers, learning-rate schedules, the run plan (segments,
//! checkpoints, visit order), checkpoints, the trajectory format Source attributes through,
//! and importing a trajectory from a Hugging Face Trainer folder.

pub mod checkpoint;
pub mod finetune;
pub mod import;
mod import_adapter;
pub mod log;
pub mod optim;
pub mod plan;
pub mod schedule;
pub mod steps;
pub mod trajectory;

pub use finetune::{
    optimizer_info, train, train_in_memory, train_stages_in_memory, StageRun, TrainJob,
    TrainOutcome,
};
pub use import_adapter::adapter_over_base;
pub use optim::Optimizer;
pub use schedule::Schedule;
pub use steps::StepWeight;
pub use trajectory::{
    CheckpointRef, LrMass, OptimizerInfo, Segment, Trajectory, TRAJECTORY_VERSION,
};
