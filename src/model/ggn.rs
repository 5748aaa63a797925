//! Owns the model's exact Gauss–Newton products: `Model::logits_tangent` (J v) and
//! `Model::gauss_newton` (G v = Jᵀ H J v over a batch).
//! Layer: model — may import the ground, linalg, backend and, in this folder, batch.rs,
//! capture.rs, dual.rs, linear.rs, lm.rs, ops.rs.
//!
//! For a document z with logits z_t at its loss positions t, the Gauss–Newton matrix of its
//! summed cross-entropy in the tracked parameters is
//!
//! ```text
//! G(z) = Σ_t m_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t,    p_t = softmax(z_t),
//! ```
//!
//! J_t = ∂z_t/∂θ (docs/design.md §9). It is the expectation of g gᵀ over labels drawn from
//! the model (the true Fisher that EK-FAC estimates, §3), computed exactly: J v by the
//! forward mode of [`super::dual`], H_out by the formula, Jᵀ u by one reverse pass. K
//! directions share one call: the batch is copied K times and copy k carries direction k.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

use super::batch::TokenBatch;
use super::capture::take_delta;
use super::dual::{self, Directions, Dual};
use super::linear::Recorder;
use super::lm::Model;
use super::ops;

impl Model {
    /// Logits and their tangents J v: ids [N, T] with N = K·B (K copies of the documents,
    /// direction k on rows k·B..(k+1)·B) → z, ż: [N, T, V]. `v`: per tracked layer
    /// [K, d_out, d_in(+1)].
    pub fn logits_tangent(&self, ids: &Tensor, v: &[Tensor]) -> Result<Dual> {
        let k = self.direction_count(v)?;
        let dirs = Directions { v, k };
        let h = self.hidden_tangent(ids, dirs)?;
        let z = dual::linear(self.head(), &h, dirs)?;
        match self.spec().final_softcap() {
            Some(c) => z.softcap(c),
            None => Ok(z),
        }
    }

    /// G v = Σ_b G(z_b) v over the batch's documents (a sum, not a mean), for K directions
    /// at once: `v` and the result per tracked layer [K, d_out, d_in(+1)] (bias last).
    pub fn gauss_newton(&self, batch: &TokenBatch, v: &[Tensor]) -> Result<Vec<Tensor>> {
        let k = self.direction_count(v)?;
        let ids = batch.input_ids.repeat((k, 1))?;
        let z = self.logits_tangent(&ids, v)?;
        // H_out ż = p ⊙ ż − p ⟨p, ż⟩ at loss positions.
        let p = ops::softmax_last(&z.x)?;
        let pz = (&p * &z.dx)?;
        let hz = (&pz - p.broadcast_mul(&pz.sum_keepdim(D::Minus1)?)?)?;
        let mask = batch
            .prediction_mask
            .to_dtype(hz.dtype())?
            .repeat((k, 1))?
            .unsqueeze(D::Minus1)?;
        let u = hz.broadcast_mul(&mask)?;
        self.vjp(&ids, &u, k)
    }

    /// Jᵀ u per copy: the tracked layers' gradients of Σ ⟨z, u⟩, summed over the rows of each
    /// copy k. ids [N, T], u [N, T, V] → per layer [K, d_out, d_in(+1)].
    fn vjp(&self, ids: &Tensor, u: &Tensor, k: usize) -> Result<Vec<Tensor>> {
        let mut rec = Recorder::new(self.n_tracked());
        let logits = self.forward_rec(ids, Some(&mut rec))?;
        let grads = (logits * u.detach())?.sum_all()?.backward()?;
        let (n, t) = ids.dims2()?;
        let rows = n / k * t;
        let mut out = Vec::with_capacity(rec.slots.len());
        for (info, slot) in self.tracked_layers().iter().zip(rec.slots) {
            let (a, source) = slot.ok_or_else(|| {
                Error::Model(format!("tracked layer `{}` was not run", info.name))
            })?;
            let delta = take_delta(source, &grads, &a)?;
            let a = if info.has_bias {
                let ones = Tensor::ones((n, t, 1), a.dtype(), a.device())?;
                Tensor::cat(&[&a, &ones], D::Minus1)?
            } else {
                a
            };
            // [K, d_out, rows] × [K, rows, d_in(+1)]
            let d = delta
                .reshape((k, rows, info.d_out))?
                .transpose(1, 2)?
                .contiguous()?;
            out.push(d.matmul(&a.reshape((k, rows, a.dim(D::Minus1)?))?)?);
        }
        Ok(out)
    }

    /// K of `v` (one tensor per tracked layer, [K, …]), checked.
    fn direction_count(&self, v: &[Tensor]) -> Result<usize> {
        if v.len() != self.n_tracked() {
            return Err(Error::Model(format!(
                "Gauss–Newton product: {} direction tensors for {} tracked layers",
                v.len(),
                self.n_tracked()
            )));
        }
        match v.first() {
            Some(t) => Ok(t.dim(0)?),
            None => Err(Error::Model(
                "Gauss–Newton product: the model tracks no layer".into(),
            )),
        }
    }
}
