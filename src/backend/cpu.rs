//! The CPU backend: the linalg reference code on candle's CPU device and faer.
//! Layer: backend — may import only the ground floor and linalg.

use candle_core::{Device, Tensor, TensorId};
use rayon::prelude::*;

use crate::config::EigenPrecision;
use crate::error::Result;
use crate::linalg::{
    apply_in_basis_factored, eigh_with, Eigen, EigenBasis, FactorSum, LambdaSums, TokenFactors,
};
use crate::util::phase;
use crate::util::tensors::with_f32;

use super::contract::Backend;

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
        terms: &mut [(&mut FactorSum, &Tensor)],
        _mask: &Tensor,
    ) -> Result<()> {
        for (sum, x) in terms.iter_mut() {
            with_f32(x, |rows| sum.add_rows(rows))??;
        }
        Ok(())
    }

    fn apply_in_basis_factored(
        &self,
        basis: &EigenBasis,
        weights: &Tensor,
        v: &TokenFactors,
    ) -> Result<Tensor> {
        apply_in_basis_factored(basis, weights, v)
    }

    fn eigh_many(
        &self,
        mats: &[(Vec<f64>, usize, String)],
        precision: EigenPrecision,
    ) -> Result<Vec<Eigen>> {
        // Side by side, each also splitting its own work over the pool (idle threads steal
        // either kind of work).
        let par = faer::get_global_parallelism();
        mats.par_iter()
            .map(|(m, n, what)| eigh_with(m, *n, what, par, precision))
            .collect()
    }

    fn add_lambdas(
        &self,
        sums: &mut [LambdaSums],
        bases: &[EigenBasis],
        layers: &[(&Tensor, &Tensor)],
        _mask: &Tensor,
        lengths: &[usize],
    ) -> Result<()> {
        // a Q_A once per shared input (q/k/v, gate/up share a and hence Q_A).
        let mut rotated: Vec<(TensorId, Tensor)> = Vec::new();
        for ((&(a, delta), sum), basis) in layers.iter().zip(sums.iter_mut()).zip(bases) {
            let a_rot = {
                let _t = phase::timer("fit: rotate");
                match rotated.iter().find(|(id, _)| *id == a.id()) {
                    Some((_, r)) => r.clone(),
                    None => {
                        let r = basis.q_a.right_mul(a)?;
                        rotated.push((a.id(), r.clone()));
                        r
                    }
                }
            };
            let d_rot = {
                let _t = phase::timer("fit: rotate");
                basis.q_s.right_mul(delta)?
            };
            let _t = phase::timer("fit: eigenvalue correction");
            sum.add_rotated(&a_rot, &d_rot, lengths)?;
        }
        Ok(())
    }
}
