//! Owns `Llama::hidden_tangent`: the Llama-family forward along tangent directions.
//! Layer: model — may import the ground, linalg, backend and, in this folder, dual.rs, ops.rs
//! and its parent llama.rs.
//!
//! The forward of [`super::Llama::hidden`] (no KV cache, composed ops) on [`Dual`] values:
//! the final normalised hidden states and their tangent (∂h/∂θ) v along K directions of the
//! tracked layers. Embeddings and norm weights are not tracked, so h⁰ has no tangent.

use candle_core::Tensor;

use crate::error::{Error, Result};

use super::super::config::MlpActivation;
use super::super::dual::{self, Directions, Dual};
use super::super::ops;
use super::{AttnTables, Llama, Projections};

impl Projections {
    /// Every output along the directions, in order (see [`Projections::forward`]).
    fn tangent(&self, x: &Dual, dirs: Directions) -> Result<Vec<Dual>> {
        match self {
            Projections::Separate(ls) => ls.iter().map(|l| dual::linear(l, x, dirs)).collect(),
            Projections::Fused(l, widths) => {
                let y = dual::linear(l, x, dirs)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.map(|t| Ok(t.narrow(2, start, w)?))?;
                        start += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }
}

impl Llama {
    /// ids: [N, T] u32, N = K·B (K copies of B documents, direction k on rows k·B..) → the
    /// final normalised hidden states [N, T, d] and their tangents.
    pub fn hidden_tangent(&self, ids: &Tensor, dirs: Directions) -> Result<Dual> {
        let s = &self.spec;
        let (n, t) = ids.dims2()?;
        let dev = ids.device();
        let tables = AttnTables::new(s, t, 0, dev)?;
        let scores = ops::Scores {
            scale: s.attn_scale,
            softcap: s.attn_softcap,
        };
        let nw = |w: &candle_core::Var| -> Result<Tensor> {
            let w = w.as_tensor().detach();
            Ok(if s.gemma { w.affine(1.0, 1.0)? } else { w })
        };
        let norm = |x: &Dual, w: &candle_core::Var| x.rms_norm(&nw(w)?, s.rms_norm_eps);
        let embed = self.embed.as_tensor().detach();
        let mut h = embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((n, t, s.hidden_size))?;
        if s.gemma {
            h = h.affine((s.hidden_size as f64).sqrt(), 0.0)?;
        }
        let mut h = Dual::constant(h)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = norm(&h, &blk.input_norm)?;
            let heads = |y: &Dual, nh: usize| -> Result<Dual> {
                y.map(|y| {
                    Ok(y.reshape((n, t, nh, s.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()?)
                })
            };
            let [q, k, v]: [Dual; 3] = blk
                .qkv
                .tangent(&x, dirs)?
                .try_into()
                .map_err(|_| Error::Model("q, k, v: expected 3 outputs".into()))?;
            let (mut q, mut k, v) = (
                heads(&q, s.num_heads)?,
                heads(&k, s.num_kv_heads)?,
                heads(&v, s.num_kv_heads)?,
            );
            if let Some((nq, nk)) = &blk.qk_norm {
                q = norm(&q, nq)?;
                k = norm(&k, nk)?;
            }
            let (cos, sin, layer_mask) = tables.layer(s, li);
            let (q, k) = (q.rope(cos, sin)?, k.rope(cos, sin)?);
            let y = dual::attention(&q, &k, &v, layer_mask, scores)?;
            let y = dual::linear(&blk.o, &y, dirs)?;
            let x = match &blk.ff_norms {
                None => {
                    h = h.add(&y)?;
                    norm(&h, &blk.post_norm)?
                }
                Some((pre_ff, _)) => {
                    h = h.add(&norm(&y, &blk.post_norm)?)?;
                    norm(&h, pre_ff)?
                }
            };
            let [g, u]: [Dual; 2] = blk
                .gate_up
                .tangent(&x, dirs)?
                .try_into()
                .map_err(|_| Error::Model("gate, up: expected 2 outputs".into()))?;
            let g = match s.mlp_activation {
                MlpActivation::Silu => g.silu()?,
                MlpActivation::GeluTanh => g.gelu_tanh()?,
            };
            let y = dual::linear(&blk.down, &g.mul(&u)?, dirs)?;
            let y = match &blk.ff_norms {
                Some((_, post_ff)) => norm(&y, post_ff)?,
                None => y,
            };
            h = h.add(&y)?;
        }
        norm(&h, &self.norm)
    }
}
