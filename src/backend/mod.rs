//! Where the heavy operations of `fit` and `score` run (DESIGN.md §4 `backend`): the CPU
//! (candle + faer, the reference) or an NVIDIA GPU (the project's kernels of [`crate::cuda`]).
//! Every device-specific choice of the fit and score passes goes through the [`Backend`]
//! trait, in candle's style (backends behind a trait): the passes themselves
//! ([`crate::curvature::fit`], [`crate::attribution::score`]) are written once.
//!
//! | operation | math | CPU ([`CpuBackend`]) | CUDA |
//! |---|---|---|---|
//! | [`Backend::add_covariances`] | Σ_t m_t a_t a_tᵀ, Σ_t m_t δ_t δ_tᵀ (§3.1) | faer, one triangle, in place | `masked_syrk`, all layers and blocks in one launch |
//! | [`Backend::eigh_many`] | A = Q diag(λ) Qᵀ in f64 or f32 (§3.2) | faer, side by side | cuSOLVER `syevd` (f64) |
//! | [`Backend::add_lambdas`] | Σ_m ((Q_Sᵀ G_m Q_A)[i,j])² (§3.3) | candle rotation + faer per document | `rotate_rows` + `eig_correction` |
//! | [`Backend::apply_in_basis`] | Q_S (F(Λ) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ (§3.4) | candle | `gemm_spectral` ×4 |
//! | [`Backend::token_scores`] | m_t δ_tᵀ U_q a_t (§2, token level) | candle | `score_tokens` / `score_tokens_lowrank` |

mod cpu;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
mod cuda;
mod curvature;

pub use cpu::CpuBackend;
#[cfg(any(feature = "cuda", feature = "cuda-kernels"))]
pub use cuda::CudaBackend;
pub use curvature::OnBackend;

use candle_core::{Device, Tensor};

use crate::attribution::{LayerQuery, SpectralFn};
use crate::config::{DeviceKind, PrecisionKind};
use crate::curvature::{Eigen, EigenBasis, EigenPrecision, FactorSum, LambdaSums};
use crate::error::{Error, Result};
use crate::model::Capture;

/// The device-specific operations of the fit and score passes. Tensors in and out are candle
/// tensors on [`Backend::device`] (or the CPU); the results are the same math on every backend
/// within the tolerances of the GPU parity tests (tests/cuda_parity.rs).
pub trait Backend {
    /// `cpu` or `cuda` (for logs and stage summaries).
    fn name(&self) -> &'static str;

    /// The candle device the model runs on (forward and backward of every pass).
    fn device(&self) -> &Device;

    /// Adds one batch's covariance terms: for each (sum, x) of `terms`, x [B, T, d] a
    /// captured input a or output gradient δ, Σ_{b,t} m_{b,t} x_{b,t} x_{b,t}ᵀ into every
    /// diagonal block of `sum` (m = `mask` [B, T], the attention mask; a capture's a and δ
    /// are zero where m is 0 already). Layers that share an input share one term.
    fn add_covariances(&self, terms: &mut [(&mut FactorSum, &Tensor)], mask: &Tensor)
        -> Result<()>;

    /// The symmetric eigendecompositions of `mats` (each (row-major data, n, what): λ
    /// ascending, `what` naming the layer and factor in errors; non-finite entries are
    /// rejected first) in the arithmetic `precision` where the backend offers it (else
    /// f64). Backends may run them side by side.
    fn eigh_many(
        &self,
        mats: &[(Vec<f64>, usize, String)],
        precision: EigenPrecision,
    ) -> Result<Vec<Eigen>>;

    /// Adds one batch's squared rotated per-document gradients of every tracked layer into
    /// `sums[l]`, in the fixed bases `bases[l]`; document b's tokens are the first
    /// `lengths[b]` positions.
    fn add_lambdas(
        &self,
        sums: &mut [LambdaSums],
        bases: &[EigenBasis],
        cap: &Capture,
        lengths: &[usize],
    ) -> Result<()>;

    /// Q_S (F(Λ) ⊙ (Q_Sᵀ V_q Q_A)) Q_Aᵀ for every query V_q of `v` [Q, d_out, d_in] (f32),
    /// with F evaluated in f64 on Λ = `lambda` [d_out, d_in]. Returns an f32 CPU tensor.
    fn apply_in_basis(
        &self,
        basis: &EigenBasis,
        lambda: &Tensor,
        f: SpectralFn,
        v: &Tensor,
    ) -> Result<Tensor>;

    /// Per-token scores s[q, b, t] = m_{b,t} δ_{b,t}ᵀ U_q a_{b,t} for a layer's query `u`
    /// (dense or low-rank), `a` [B, T, d_in], `delta` [B, T, d_out], `mask` [B, T]. Returns
    /// [Q, B, T] f32. The default contracts on the tensors' own device with candle ops
    /// ([`LayerQuery::token_scores`], the CPU reference); a GPU backend overrides it.
    fn token_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        u.token_scores(a, delta, mask)
    }

    /// Per-document scores s[q, b] = Σ_t m_{b,t} δ_{b,t}ᵀ U_q a_{b,t} = ⟨U_q, G_b⟩, for a
    /// pass that keeps no per-token scores. Returns [Q, B] f32. The default contracts on the
    /// tensors' own device with candle ops ([`LayerQuery::doc_scores`]).
    fn doc_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        u.doc_scores(a, delta, mask)
    }

    /// Frees what the backend keeps between calls of one pass (queries uploaded to the GPU).
    fn release(&self) {}
}

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
