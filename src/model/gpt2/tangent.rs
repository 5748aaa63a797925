//! Owns `Gpt2::hidden_tangent`: the GPT-2 forward along tangent directions.
//! Layer: model — may import the ground, linalg, backend and, in this folder, dual.rs, ops.rs
//! and its parent gpt2.rs.
//!
//! The forward of [`super::Gpt2::hidden`] (no KV cache) on [`Dual`] values: the final
//! normalised hidden states and their tangent (∂h/∂θ) v along K directions of the tracked
//! layers. Embeddings and LayerNorm parameters are not tracked, so h⁰ has no tangent.

use candle_core::Tensor;

use crate::error::{Error, Result};

use super::super::config::Gpt2Activation;
use super::super::dual::{self, Directions, Dual};
use super::super::ops;
use super::{Gpt2, Norm};

impl Norm {
    fn tangent(&self, x: &Dual, eps: f64) -> Result<Dual> {
        x.layer_norm(
            &self.w.as_tensor().detach(),
            &self.b.as_tensor().detach(),
            eps,
        )
    }
}

impl Gpt2 {
    /// ids: [N, T] u32, N = K·B (K copies of B documents, direction k on rows k·B..) → the
    /// final normalised hidden states [N, T, d] and their tangents.
    pub fn hidden_tangent(&self, ids: &Tensor, dirs: Directions) -> Result<Dual> {
        let s = &self.spec;
        let (n, t) = ids.dims2()?;
        if t > s.n_positions {
            return Err(Error::Model(format!(
                "sequence length {t} exceeds GPT-2's n_positions = {}",
                s.n_positions
            )));
        }
        let (d, nh) = (s.n_embd, s.n_head);
        let hd = d / nh;
        let mask = ops::causal_mask(t, 0, None, ids.device())?;
        let tok = self
            .wte
            .as_tensor()
            .detach()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((n, t, d))?;
        let pos = self.wpe.as_tensor().detach().narrow(0, 0, t)?;
        let mut h = Dual::constant(tok.broadcast_add(&pos)?)?;
        for blk in &self.blocks {
            let x = blk.ln_1.tangent(&h, s.layer_norm_epsilon)?;
            let qkv = dual::linear(&blk.c_attn, &x, dirs)?;
            let heads = |i: usize| -> Result<Dual> {
                qkv.map(|y| {
                    Ok(y.narrow(2, i * d, d)?
                        .reshape((n, t, nh, hd))?
                        .transpose(1, 2)?
                        .contiguous()?)
                })
            };
            let y = dual::attention(
                &heads(0)?,
                &heads(1)?,
                &heads(2)?,
                &mask,
                ops::Scores::standard(hd),
            )?;
            h = h.add(&dual::linear(&blk.attn_proj, &y, dirs)?)?;
            let x = blk.ln_2.tangent(&h, s.layer_norm_epsilon)?;
            let z = dual::linear(&blk.c_fc, &x, dirs)?;
            let z = match s.activation {
                Gpt2Activation::GeluTanh => z.gelu_tanh()?,
                Gpt2Activation::GeluErf => z.gelu_erf()?,
            };
            h = h.add(&dual::linear(&blk.mlp_proj, &z, dirs)?)?;
        }
        self.ln_f.tangent(&h, s.layer_norm_epsilon)
    }
}
