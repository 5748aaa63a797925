//! Owns `Optimizer` (SGD, momentum, AdamW), `global_norm` and `clip_global_norm`.
//! Layer: train — may import the ground, linalg, backend, model, data, hub and, in this folder,
//! trajectory.rs.
//!
//! Optimizers on candle tensors, with the state Source needs from them.
//!
//! * SGD: θ ← θ − η g.
//! * Heavy-ball momentum (PyTorch form, no dampening): b ← β b + g (b = g at the first
//!   step), θ ← θ − η b. Its effective learning-rate mass is s / (1 − β).
//! * AdamW (PyTorch semantics): m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g²,
//!   m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ), θ ← θ − η m̂ / (√v̂ + ε).
//!
//! Every variant first applies decoupled weight decay θ ← (1 − ηλ) θ. Arithmetic is f32 on
//! the parameters' device, in a fixed order, so a run is bitwise reproducible.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::Param;

use super::trajectory::OptimizerInfo;

/// An optimizer with its per-parameter state.
#[derive(Debug, Clone)]
pub struct Optimizer {
    info: OptimizerInfo,
    /// t: steps taken.
    step: u64,
    /// First moment m (AdamW) or momentum buffer b, per parameter.
    first: Vec<Option<Tensor>>,
    /// Second moment v (AdamW), not bias-corrected.
    second: Vec<Option<Tensor>>,
}

impl Optimizer {
    /// A fresh optimizer (t = 0, zero state) for `n_params` parameters.
    pub fn new(info: OptimizerInfo, n_params: usize) -> Result<Self> {
        if info == OptimizerInfo::Unknown {
            return Err(Error::Pipeline(
                "cannot train with an `unknown` optimizer; choose sgd, momentum or adamw".into(),
            ));
        }
        Ok(Self {
            info,
            step: 0,
            first: vec![None; n_params],
            second: vec![None; n_params],
        })
    }

    /// The optimizer and its hyper-parameters.
    pub fn info(&self) -> &OptimizerInfo {
        &self.info
    }

    /// t: optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter with gradients `grads` (same order) and rate `lr`.
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != grads.len() || params.len() != self.first.len() {
            return Err(Error::Model(format!(
                "optimizer step: {} parameters, {} gradients, state for {}",
                params.len(),
                grads.len(),
                self.first.len()
            )));
        }
        self.step += 1;
        let t = self.step as i32;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let theta = p.var.as_tensor();
            let wd = match self.info {
                OptimizerInfo::Sgd { weight_decay }
                | OptimizerInfo::Momentum { weight_decay, .. }
                | OptimizerInfo::AdamW { weight_decay, .. } => weight_decay,
                OptimizerInfo::Unknown => 0.0,
            };
            let theta = if wd > 0.0 {
                theta.affine(1.0 - lr * wd, 0.0)?
            } else {
                theta.clone()
            };
            let new = match self.info {
                OptimizerInfo::Sgd { .. } | OptimizerInfo::Unknown => {
                    (theta - g.affine(lr, 0.0)?)?
                }
                OptimizerInfo::Momentum { beta, .. } => {
                    let b = match &self.first[i] {
                        None => g.clone(),
                        Some(b) => (b.affine(beta, 0.0)? + g)?,
                    };
                    let new = (theta - b.affine(lr, 0.0)?)?;
                    self.first[i] = Some(b);
                    new
                }
                OptimizerInfo::AdamW {
                    beta1, beta2, eps, ..
                } => {
                    let m = match &self.first[i] {
                        None => g.affine(1.0 - beta1, 0.0)?,
                        Some(m) => (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?,
                    };
                    let g2 = g.sqr()?;
                    let v = match &self.second[i] {
                        None => g2.affine(1.0 - beta2, 0.0)?,
                        Some(v) => (v.affine(beta2, 0.0)? + g2.affine(1.0 - beta2, 0.0)?)?,
                    };
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
                    let upd = (m.affine(lr / bc1, 0.0)? / denom)?;
                    let new = (theta - upd)?;
                    self.first[i] = Some(m);
                    self.second[i] = Some(v);
                    new
                }
            };
            p.var.set(&new)?;
        }
        Ok(())
    }

    /// The state the attribution reads, named by parameter: `exp_avg_sq.NAME` = Adam's
    /// bias-corrected v̂ = v / (1 − β₂ᵗ) and `exp_avg.NAME` = m̂ = m / (1 − β₁ᵗ) (both after
    /// step t, the moments step t used), or `momentum.NAME` = b. Empty for SGD or before the
    /// first step.
    pub fn attribution_state(&self, params: &[Param]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, p) in params.iter().enumerate() {
            match self.info {
                OptimizerInfo::AdamW { beta1, beta2, .. } => {
                    let t = self.step as i32;
                    if let Some(v) = &self.second[i] {
                        let bc2 = 1.0 - beta2.powi(t);
                        out.push((format!("exp_avg_sq.{}", p.name), v.affine(1.0 / bc2, 0.0)?));
                    }
                    if let Some(m) = &self.first[i] {
                        let bc1 = 1.0 - beta1.powi(t);
                        out.push((format!("exp_avg.{}", p.name), m.affine(1.0 / bc1, 0.0)?));
                    }
                }
                OptimizerInfo::Momentum { .. } => {
                    if let Some(b) = &self.first[i] {
                        out.push((format!("momentum.{}", p.name), b.clone()));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Everything needed to continue bit for bit: `exp_avg.NAME` and `exp_avg_sq.NAME` (raw,
    /// not bias-corrected) for AdamW, `momentum.NAME` for momentum SGD. t is kept by the
    /// caller (the checkpoint's step).
    pub fn resume_state(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let (a, b) = match self.info {
                OptimizerInfo::AdamW { .. } => ("exp_avg", Some("exp_avg_sq")),
                OptimizerInfo::Momentum { .. } => ("momentum", None),
                _ => continue,
            };
            if let Some(m) = &self.first[i] {
                out.push((format!("{a}.{}", p.name), m.clone()));
            }
            if let (Some(b), Some(v)) = (b, &self.second[i]) {
                out.push((format!("{b}.{}", p.name), v.clone()));
            }
        }
        out
    }

    /// Restores [`Optimizer::resume_state`] after `step` steps. Every parameter must have
    /// its tensors once t > 0 (for the optimizers that keep state).
    pub fn restore(
        &mut self,
        params: &[Param],
        step: u64,
        mut state: HashMap<String, Tensor>,
    ) -> Result<()> {
        self.step = step;
        let names: (&str, Option<&str>) = match self.info {
            OptimizerInfo::AdamW { .. } => ("exp_avg", Some("exp_avg_sq")),
            OptimizerInfo::Momentum { .. } => ("momentum", None),
            _ => return Ok(()),
        };
        if step == 0 {
            return Ok(());
        }
        let mut take = |key: String, p: &Param| -> Result<Tensor> {
            let t = state.remove(&key).ok_or_else(|| {
                Error::Pipeline(format!(
                    "resume state lacks `{key}`; the checkpoint is incomplete, delete it to \
                     restart from the one before"
                ))
            })?;
            if t.dims() != p.var.dims() {
                return Err(Error::Pipeline(format!(
                    "resume state `{key}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    p.var.dims()
                )));
            }
            Ok(t.to_device(p.var.device())?)
        };
        for (i, p) in params.iter().enumerate() {
            self.first[i] = Some(take(format!("{}.{}", names.0, p.name), p)?);
            if let Some(b) = names.1 {
                self.second[i] = Some(take(format!("{b}.{}", p.name), p)?);
            }
        }
        Ok(())
    }
}

/// ‖g‖ = sqrt(Σ_p ‖g_p‖²), summed in f64 in parameter order.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales `grads` to global norm `max_norm` when larger (PyTorch's `clip_grad_norm_`:
/// factor max_norm / (‖g‖ + 1e-6)). Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(factor, 0.0)?;
        }
    }
    Ok(norm)
}
