//! The CPU backend: the project's reference code (src/curvature, src/attribution) on candle's
//! CPU device and faer, unchanged.

use candle_core::{Device, Tensor};

use crate::attribution::{apply_in_basis, spectral_weights, LayerQuery, SpectralFn};
use crate::curvature::{eigh, masked_rows, CovarianceSums, Eigen, EigenBasis, LambdaSums};
use crate::error::{Error, Result};
use crate::model::Capture;

use super::Backend;

/// The reference backend (candle CPU + faer).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    device: Device,
}

impl CpuBackend {
    /// The CPU backend.
    pub fn new() -> CpuBackend {
        CpuBackend {
            device: Device::Cpu,
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn add_covariances(
        &self,
        sums: &mut [CovarianceSums],
        cap: &Capture,
        batch_no: usize,
    ) -> Result<()> {
        for (layer, sum) in cap.layers.iter().zip(sums.iter_mut()) {
            let a = masked_rows(&layer.a, &cap.attention_mask)?;
            let d = masked_rows(&layer.delta, &cap.attention_mask)?;
            check_finite(&a, &layer.name, "activations", batch_no)?;
            check_finite(&d, &layer.name, "output gradients", batch_no)?;
            sum.add(&a, &d)?;
        }
        Ok(())
    }

    fn eigh(&self, m: &Tensor, what: &str) -> Result<Eigen> {
        eigh(m, what)
    }

    fn add_lambdas(
        &self,
        sums: &mut [LambdaSums],
        bases: &[EigenBasis],
        cap: &Capture,
    ) -> Result<()> {
        for ((layer, sum), basis) in cap.layers.iter().zip(sums.iter_mut()).zip(bases) {
            sum.add_batch(basis, &layer.a, &layer.delta, &cap.attention_mask)?;
        }
        Ok(())
    }

    fn apply_in_basis(
        &self,
        basis: &EigenBasis,
        lambda: &Tensor,
        f: SpectralFn,
        v: &Tensor,
    ) -> Result<Tensor> {
        let w = spectral_weights(lambda, f)?;
        apply_in_basis(basis, &w, v)
    }

    fn token_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        u.token_scores(a, delta, mask)
    }
}

/// Rejects a batch whose `x` has NaN or Inf, naming the layer, what `x` is and the batch.
pub(crate) fn check_finite(x: &Tensor, layer: &str, what: &str, batch: usize) -> Result<()> {
    let s: f32 = x.abs()?.sum_all()?.to_scalar()?;
    if !s.is_finite() {
        return Err(Error::Numeric(format!(
            "layer `{layer}`: non-finite {what} in batch {batch}; the model produces NaN/Inf on \
             this data (check the checkpoint and the learning rate that produced it)"
        )));
    }
    Ok(())
}
