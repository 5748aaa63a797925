//! Owns the project's CUDA kernels: their source `KERNELS_CU`, `KERNEL_NAMES` and cuda/'s files.
//! Layer: backend — may import the ground and linalg; declares and re-exports the files of cuda/.
//!
//! The project's CUDA kernels (docs/design.md §2–§3 on the GPU): masked covariance accumulation,
//! the eigenvalue correction, the fused token-level scoring contraction and the eigenbasis
//! function application, written in CUDA C ([`KERNELS_CU`]) and compiled at run time by
//! NVRTC for the GPU found.
//!
//! Features: `cuda-kernels` builds the GPU code with the CUDA libraries loaded at run time
//! (no toolkit needed to build: CI checks it); `cuda` adds candle's CUDA backend (needs the
//! toolkit from `scripts/gpu/build-cuda.sh`). Without either, only the CPU references
//! ([`reference`](mod@reference)) and the kernel source are compiled.

pub mod precision;
pub mod reference;

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
mod device;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod eigh;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod gpu;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub mod nvrtc;

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub use device::CudaBackend;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub use gpu::{Gpu, GpuBuffer};
pub use precision::Precision;

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
    "gemm_weighted",
];

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
}
