//! The project's CUDA kernels (DESIGN.md §3–§2 on the GPU): masked covariance accumulation,
//! the eigenvalue correction, the fused token-level scoring contraction and the eigenbasis
//! function application, written in CUDA C ([`KERNELS_CU`]) and compiled at run time by
//! NVRTC for the GPU found.
//!
//! Features: `cuda-kernels` builds the GPU code with the CUDA libraries loaded at run time
//! (no toolkit needed to build: CI checks it); `cuda` adds candle's CUDA backend (needs the
//! toolkit from `scripts/gpu/build-cuda.sh`). Without either, only the CPU references
//! ([`reference`]) and the kernel source are compiled.

pub mod reference;

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod eigh;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod gpu;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod nvrtc;

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub use gpu::{Gpu, GpuBuffer};

use crate::error::{Error, Result};

/// The CUDA C source of every kernel.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Every `extern "C"` entry point of [`KERNELS_CU`].
pub const KERNEL_NAMES: &[&str] = &[
    "masked_syrk_f32",
    "masked_syrk_bf16",
    "eig_correction_f32",
    "eig_correction_bf16",
    "score_tokens_f32",
    "score_tokens_bf16",
    "score_tokens_lowrank_f32",
    "score_tokens_lowrank_bf16",
    "f32_to_bf16",
    "gemm_spectral",
];

/// Input precision of a kernel; accumulation is always f32 (and the eigendecomposition f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs, exact f32 products: the reference mode (parity ≤ 1e-5 relative).
    F32,
    /// f32 inputs rounded to TF32 (10-bit mantissa) before every product, the numerics of a
    /// TF32 tensor-core GEMM (parity ≤ 1e-2 relative: k-term sums of products with
    /// relative error ≤ 2⁻¹⁰ each).
    Tf32,
    /// bf16 inputs (a, δ; 7-bit mantissa) with f32 accumulation (parity ≤ 3e-2 relative,
    /// against the f32 reference on the unrounded inputs).
    Bf16,
}

impl Precision {
    /// Parses `"f32"`, `"tf32"` or `"bf16"`; `what` names the config key or flag in errors.
    pub fn parse(s: &str, what: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Cuda(format!(
                "{what} = {other:?}: the precision must be \"f32\", \"tf32\" or \"bf16\""
            ))),
        }
    }

    /// The relative-error tolerance the parity tests hold this precision to, against the
    /// f64 CPU reference on the original f32 inputs.
    pub fn tolerance(self) -> f64 {
        match self {
            Precision::F32 => 1e-5,
            Precision::Tf32 => 1e-2,
            Precision::Bf16 => 3e-2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_in_the_source_once() {
        for name in KERNEL_NAMES {
            let decl = format!(" {name}(");
            assert_eq!(
                KERNELS_CU.matches(&decl).count(),
                1,
                "kernel {name} declared {} times in kernels.cu",
                KERNELS_CU.matches(&decl).count()
            );
        }
        assert_eq!(
            KERNELS_CU.matches("extern \"C\" __global__").count(),
            KERNEL_NAMES.len(),
            "kernels.cu has entry points KERNEL_NAMES does not list"
        );
    }

    #[test]
    fn precision_parses_and_names_the_key() {
        assert_eq!(Precision::parse("tf32", "k").unwrap(), Precision::Tf32);
        let e = Precision::parse("fp16", "[run] precision")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[run] precision") && e.contains("\"fp16\"") && e.contains("bf16"));
    }
}
