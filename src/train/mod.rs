//! Training: the trajectory format Source attributes through (and, with the fine-tuning
//! issue, the fine-tuning loop, optimizers, schedules and trajectory import).

pub mod trajectory;

pub use trajectory::{
    CheckpointRef, LossNormalization, LrMass, OptimizerInfo, Segment, Trajectory,
    TRAJECTORY_VERSION,
};
