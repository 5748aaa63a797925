//! Owns the capture: `Capture`, `LayerCapture` and `Labels` (a and δ per tracked layer, losses).
//! Layer: model — may import the ground, linalg, backend and, in this folder, batch.rs,
//! head_loss.rs, linear.rs, lm.rs, loss.rs.
//!
//! One forward + backward that returns, for every tracked layer, its inputs a and the
//! gradients δ = ∂L/∂(layer output), plus per-document losses.
//!
//! The batch objective is Σ_b L(z_b): documents do not interact in the forward pass, so
//! document b's δ rows are the gradient of its own loss, and its weight gradient for a
//! layer is G_b = Σ_t δ_{b,t} a_{b,t}ᵀ over [W | b] (docs/design.md §2–3).

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

use super::batch::TokenBatch;
use super::head_loss::head_cross_entropy;
use super::linear::{DeltaSource, Recorder};
use super::lm::Model;
use super::loss;

/// Which labels the loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    /// The batch's own next tokens (training loss; on prompt/completion batches the query
    /// measurement). Gives the empirical Fisher.
    Data,
    /// Labels drawn from the model's own softmax with this seed (true-Fisher
    /// pseudo-gradients); see [`loss::sample_targets`] for the stream per document.
    Sampled {
        /// Seed.
        seed: u64,
    },
}

/// (a, δ) of one tracked layer for one batch.
#[derive(Debug, Clone)]
pub struct LayerCapture {
    /// The layer's Hugging Face module name.
    pub name: String,
    /// Inputs a: [B, T, d_in] (+1 trailing column of ones when the layer has a bias), zero
    /// on padding.
    pub a: Tensor,
    /// Output gradients δ: [B, T, d_out] (zero on padding and wherever the output does not
    /// reach a target).
    pub delta: Tensor,
    /// Whether `a` carries the bias column.
    pub has_bias: bool,
}

impl LayerCapture {
    /// Document `b`'s gradient Σ_t δ_t a_tᵀ: [d_out, d_in(+1)] (bias as the last column).
    /// Meant for checks and small layers; the attribution stages never form it per token.
    pub fn doc_gradient(&self, b: usize) -> Result<Tensor> {
        let a = self.a.get(b)?;
        let d = self.delta.get(b)?;
        Ok(d.t()?.matmul(&a)?)
    }
}

/// Result of [`Model::capture`].
#[derive(Debug, Clone)]
pub struct Capture {
    /// Per tracked layer, in [`Model::tracked_layers`] order.
    pub layers: Vec<LayerCapture>,
    /// Per-document loss L(z_b) under the chosen labels.
    pub losses: Vec<f32>,
    /// The labels used: [B, T] u32, target of position t (0 where none).
    pub targets: Tensor,
    /// 1 on real tokens: [B, T] f32.
    pub attention_mask: Tensor,
    /// 1 where position t predicts a loss target: [B, T] f32.
    pub prediction_mask: Tensor,
}

impl Capture {
    /// For each layer, the index of the first layer whose input `a` is the same tensor (its
    /// own index when no earlier layer shares it): q/k/v share one input, gate/up another,
    /// so their activation factor A is accumulated and decomposed once.
    pub fn input_groups(&self) -> Vec<usize> {
        let ids: Vec<_> = self.layers.iter().map(|l| l.a.id()).collect();
        ids.iter()
            .map(|id| ids.iter().position(|j| j == id).unwrap_or(0))
            .collect()
    }
}

impl Model {
    /// Forward + backward on `batch` with the loss under `labels`; returns (a, δ) for every
    /// tracked layer. The model's numerics are unchanged: each tracked output gets a zero
    /// `Var` added, whose gradient is δ.
    pub fn capture(&self, batch: &TokenBatch, labels: Labels) -> Result<Capture> {
        let mut rec = Recorder::new(self.n_tracked());
        let (losses, targets) = match (labels, self.fusable_head()) {
            // Data labels: the head and the loss as one op, without [B, T, V] logits.
            (Labels::Data, Some(w)) => {
                let x = self.hidden_rec(&batch.input_ids, Some(&mut rec))?;
                let (b, t, d) = x.dims3()?;
                let tv: Vec<u32> = batch.target_ids.flatten_all()?.to_vec1()?;
                let mv: Vec<f32> = batch
                    .prediction_mask
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let rows = head_cross_entropy(&x.reshape((b * t, d))?, &w, &tv, &mv)?;
                (rows.reshape((b, t))?.sum(1)?, batch.target_ids.clone())
            }
            _ => {
                let logits = self.forward_rec(&batch.input_ids, Some(&mut rec))?;
                let targets = match labels {
                    Labels::Data => batch.target_ids.clone(),
                    Labels::Sampled { seed } => loss::sample_targets(&logits, batch, seed)?,
                };
                let losses = loss::doc_losses(&logits, &targets, &batch.prediction_mask)?;
                (losses, targets)
            }
        };
        let grads = losses.sum_all()?.backward()?;
        // δ is exactly zero on padding already (right padding: no target depends on it);
        // a is zeroed there only when the batch has padding, to avoid a copy per layer.
        let padded = batch.lengths.iter().any(|&n| n != batch.padded_len());
        let mask = batch.attention_mask.unsqueeze(D::Minus1)?;
        let mut layers = Vec::with_capacity(rec.slots.len());
        // Layers fed the same tensor (q/k/v, gate/up) share one prepared `a` (same id).
        let mut prepared: Vec<(candle_core::TensorId, bool, Tensor)> = Vec::new();
        for (info, slot) in self.tracked_layers().iter().zip(rec.slots) {
            let (a, source) = slot.ok_or_else(|| {
                Error::Model(format!("tracked layer `{}` was not run", info.name))
            })?;
            let delta = take_delta(source, &grads, &a)?;
            let key = (a.id(), info.has_bias);
            let a = match prepared.iter().find(|(id, b, _)| (*id, *b) == key) {
                Some((_, _, t)) => t.clone(),
                None => {
                    let with_bias = if info.has_bias {
                        let (b, t, _) = a.dims3()?;
                        let ones = Tensor::ones((b, t, 1), a.dtype(), a.device())?;
                        Tensor::cat(&[&a, &ones], D::Minus1)?
                    } else {
                        a
                    };
                    let t = if padded {
                        with_bias.broadcast_mul(&mask)?
                    } else {
                        with_bias
                    };
                    prepared.push((key.0, key.1, t.clone()));
                    t
                }
            };
            layers.push(LayerCapture {
                name: info.name.clone(),
                a,
                delta,
                has_bias: info.has_bias,
            });
        }
        Ok(Capture {
            layers,
            losses: losses.detach().to_vec1::<f32>()?,
            targets,
            attention_mask: batch.attention_mask.clone(),
            prediction_mask: batch.prediction_mask.clone(),
        })
    }
}

/// δ of a tracked layer after the backward that produced `grads`: from the custom op's
/// slot or the gradient of the zero perturbation (zeros where the output reached no loss,
/// shaped like the output; `a` gives the dtype and device).
pub(crate) fn take_delta(
    source: DeltaSource,
    grads: &candle_core::backprop::GradStore,
    a: &Tensor,
) -> Result<Tensor> {
    Ok(match source {
        DeltaSource::Slot(slot, shape) => {
            let got = slot
                .lock()
                .map_err(|_| Error::Model("capture: δ slot lock poisoned".into()))?
                .take();
            match got {
                Some(g) => g,
                None => Tensor::zeros(shape, a.dtype(), a.device())?,
            }
        }
        DeltaSource::Perturbation(eps) => match grads.get(eps.as_tensor()) {
            Some(g) => g.clone(),
            None => eps.as_tensor().zeros_like()?,
        },
    })
}
