//! Where the heavy operations of `fit` and `score` run: the CPU (candle + faer, the
//! reference) or an NVIDIA GPU (the project's kernels, [`cuda`]), behind the [`Backend`] trait.
//! Layer: backend — may import only the ground floor (error, util, config, output) and linalg.
//!
//! The trait speaks tensors and linalg types, not models (docs/design.md §4): the passes that
//! call it (`curvature::fit`, `attribution::score`) are written once.
//!
//! | operation | math | CPU ([`CpuBackend`]) | CUDA |
//! |---|---|---|---|
//! | [`Backend::add_covariances`] | Σ_t m_t a_t a_tᵀ, Σ_t m_t δ_t δ_tᵀ (§3.1) | faer, one triangle, in place | `masked_syrk`, all layers and blocks in one launch |
//! | [`Backend::eigh_many`] | A = Q diag(λ) Qᵀ in f64 or f32 (§3.2) | faer, side by side | cuSOLVER `syevd` (f64) |
//! | [`Backend::add_lambdas`] | Σ_m ((Q_Sᵀ G_m Q_A)\[i,j\])² (§3.3) | candle rotation + faer per document | `rotate_rows` + `eig_correction` |
//! | [`Backend::apply_in_basis`] | Q_S (W ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ (§3.4) | candle | `gemm_weighted` ×4 |
//! | [`Backend::token_scores`] | m_t δ_tᵀ U_q a_t (§2, token level) | candle | `score_tokens` / `score_tokens_lowrank` |

mod contract;
mod cpu;
pub mod cuda;

pub use contract::Backend;
pub use cpu::CpuBackend;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub use cuda::CudaBackend;

use crate::config::{DeviceKind, PrecisionKind};
use crate::error::{Error, Result};

/// What a user is told when `device = "cuda"` meets a binary built without CUDA support.
pub const NO_CUDA_BUILD: &str = "`[run] device = \"cuda\"`: this binary was built without \
    CUDA support; build it with `scripts/gpu/build-cuda.sh` (cargo feature `cuda`, or \
    `cuda-kernels` for the kernels alone) or set `device = \"cpu\"`";

/// Opens the backend a config asks for. `cpu` always works. `cuda` needs a binary built with
/// the `cuda` or `cuda-kernels` feature and a visible NVIDIA GPU (with the CUDA driver and
/// NVRTC libraries); otherwise the error says which is missing and how to fix it.
pub fn open(device: DeviceKind, precision: PrecisionKind) -> Result<Box<dyn Backend>> {
    match device {
        DeviceKind::Cpu => {
            if !precision.is_default() {
                return Err(Error::Cuda(format!(
                    "`[run] precision = \"{}\"` needs `device = \"cuda\"`",
                    precision.name()
                )));
            }
            Ok(Box::new(CpuBackend::new()))
        }
        DeviceKind::Cuda => open_cuda(precision),
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
fn open_cuda(precision: PrecisionKind) -> Result<Box<dyn Backend>> {
    Ok(Box::new(CudaBackend::open(0, precision)?))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-kernels")))]
fn open_cuda(_precision: PrecisionKind) -> Result<Box<dyn Backend>> {
    Err(Error::Cuda(NO_CUDA_BUILD.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_cuda_says_what_is_missing() {
        let cpu = open(DeviceKind::Cpu, PrecisionKind::F32).unwrap();
        assert_eq!(cpu.name(), "cpu");
        assert!(cpu.device().is_cpu());
        let e = open(DeviceKind::Cpu, PrecisionKind::Bf16)
            .err()
            .expect("bf16 on the CPU is refused")
            .to_string();
        assert!(
            e.contains("precision = \"bf16\"") && e.contains("device = \"cuda\""),
            "{e}"
        );

        match open(DeviceKind::Cuda, PrecisionKind::F32) {
            Ok(b) => assert_eq!(b.name(), "cuda"), // a GPU machine
            Err(e) => {
                let e = e.to_string();
                if cfg!(any(feature = "cuda", feature = "cuda-kernels")) {
                    // No GPU here: the error names what is missing.
                    assert!(e.contains("no CUDA GPU") || e.contains("NVRTC"), "{e}");
                    if e.contains("no CUDA GPU") {
                        assert!(e.contains("device = \"cpu\""), "{e}");
                    }
                } else {
                    assert_eq!(e, format!("cuda: {NO_CUDA_BUILD}"));
                    assert!(e.contains("built without CUDA support"), "{e}");
                    assert!(e.contains("scripts/gpu/build-cuda.sh"), "{e}");
                }
            }
        }
    }
}
