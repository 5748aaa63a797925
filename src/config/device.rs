//! Owns `[run] device` and `[run] precision`: `DeviceKind` and `PrecisionKind`.
//! Layer: ground — may import error and util; no sibling.
//!
//! `[run] device` and `[run] precision`: where the `fit` and `score` stages run, and the input
//! precision of the CUDA kernels (docs/gpu.md). The CPU is the reference; the CUDA path is
//! checked against it by the GPU parity tests.

use serde::{Deserialize, Serialize};

/// `[run] device`: where `fit` and `score` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// candle on the CPU, faer for the eigendecompositions: the reference path.
    #[default]
    Cpu,
    /// The first NVIDIA GPU: the project's CUDA kernels for covariances, eigendecompositions
    /// (cuSOLVER, f64), the eigenvalue correction, the eigenbasis function application and the
    /// token contraction; the model on candle's CUDA device in a `--features cuda` build.
    Cuda,
}

impl DeviceKind {
    /// Whether this is the default (`cpu`), so the key is left out of the resolved config
    /// and config hashes of CPU runs do not change.
    pub fn is_default(&self) -> bool {
        *self == DeviceKind::Cpu
    }

    /// The name as written in configs.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// `[run] precision`: the input precision of the CUDA kernels (accumulation is always f32,
/// eigendecompositions f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrecisionKind {
    /// f32 inputs, exact f32 products (the reference).
    #[default]
    F32,
    /// f32 inputs rounded to TF32 (10-bit mantissa) before each product.
    Tf32,
    /// Activations and output gradients as bf16 (7-bit mantissa).
    Bf16,
}

impl PrecisionKind {
    /// Whether this is the default (`f32`).
    pub fn is_default(&self) -> bool {
        *self == PrecisionKind::F32
    }

    /// The name as written in configs.
    pub fn name(&self) -> &'static str {
        match self {
            PrecisionKind::F32 => "f32",
            PrecisionKind::Tf32 => "tf32",
            PrecisionKind::Bf16 => "bf16",
        }
    }
}
