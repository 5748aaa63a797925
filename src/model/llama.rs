//! Owns `Llama`: the Llama-family decoder's weights and forward with tracked layers and KV cache.
//! Layer: model — may import the ground, linalg, backend and, in this folder, config.rs,
//! kv_cache.rs, linear.rs, ops.rs.
//!
//! The Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2): pre-norm decoder with
//! RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP.
//!
//! h⁰ = E[ids]; for each block: h += o(attn(rope(q(x)), rope(k(x)), v(x))) with
//! x = rms(h); h += down(silu(gate(x)) ⊙ up(x)) with x = rms(h); logits = rms(h) Wₗₘᵀ.

use candle_core::{Device, Tensor, Var};

use crate::error::Result;

use super::config::LlamaSpec;
use super::kv_cache::KvCache;
use super::linear::{ParamLoader, Recorder, TrackedLinear};
use super::ops;

/// One decoder block.
#[derive(Debug, Clone)]
pub(crate) struct LlamaBlock {
    input_norm: Var,
    post_norm: Var,
    q: TrackedLinear,
    k: TrackedLinear,
    v: TrackedLinear,
    o: TrackedLinear,
    gate: TrackedLinear,
    up: TrackedLinear,
    down: TrackedLinear,
}

/// A Llama-family model's parameters.
#[derive(Debug, Clone)]
pub(crate) struct Llama {
    spec: LlamaSpec,
    embed: Var,
    blocks: Vec<LlamaBlock>,
    norm: Var,
    lm_head: TrackedLinear,
}

impl Llama {
    /// Loads the `spec.num_layers` first blocks and the embeddings, final norm and head.
    pub fn load(spec: &LlamaSpec, p: &mut ParamLoader<'_>) -> Result<Self> {
        let (d, f, v) = (spec.hidden_size, spec.intermediate_size, spec.vocab_size);
        let (dq, dkv) = (
            spec.num_heads * spec.head_dim,
            spec.num_kv_heads * spec.head_dim,
        );
        let embed = p.var("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let pre = format!("model.layers.{i}");
            let input_norm = p.var(&format!("{pre}.input_layernorm.weight"), &[d])?;
            let at = format!("{pre}.self_attn");
            let q = lin(p, &format!("{at}.q_proj"), d, dq, spec.qkv_bias)?;
            let k = lin(p, &format!("{at}.k_proj"), d, dkv, spec.qkv_bias)?;
            let vv = lin(p, &format!("{at}.v_proj"), d, dkv, spec.qkv_bias)?;
            let o = lin(p, &format!("{at}.o_proj"), dq, d, spec.o_bias)?;
            let post_norm = p.var(&format!("{pre}.post_attention_layernorm.weight"), &[d])?;
            let mlp = format!("{pre}.mlp");
            let gate = lin(p, &format!("{mlp}.gate_proj"), d, f, spec.mlp_bias)?;
            let up = lin(p, &format!("{mlp}.up_proj"), d, f, spec.mlp_bias)?;
            let down = lin(p, &format!("{mlp}.down_proj"), f, d, spec.mlp_bias)?;
            blocks.push(LlamaBlock {
                input_norm,
                post_norm,
                q,
                k,
                v: vv,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = p.var("model.norm.weight", &[d])?;
        let lm_head = if spec.tie_word_embeddings {
            TrackedLinear {
                name: "lm_head".into(),
                weight: embed.clone(),
                bias: None,
                slot: None,
                in_block: false,
            }
        } else {
            TrackedLinear::load(p, "lm_head", d, v, false, false, false)?
        };
        Ok(Self {
            spec: spec.clone(),
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    /// Every linear layer in forward order (blocks first, lm_head last).
    pub fn linears_mut(&mut self) -> Vec<&mut TrackedLinear> {
        let mut out = Vec::new();
        for b in self.blocks.iter_mut() {
            out.extend([
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ]);
        }
        out.push(&mut self.lm_head);
        out
    }

    /// The output head (tied to the token embeddings when the checkpoint ties them).
    pub fn head(&self) -> &TrackedLinear {
        &self.lm_head
    }

    /// ids: [B, T] u32 → the final normalised hidden states [B, T, d] that the head reads
    /// (the logits are [`head`](Self::head) applied to them).
    pub fn hidden(
        &self,
        ids: &Tensor,
        mut rec: Option<&mut Recorder>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let s = &self.spec;
        let (b, t) = ids.dims2()?;
        let dev: &Device = ids.device();
        let offset = cache.as_ref().map_or(0, |c| c.offset);
        let (cos, sin) =
            ops::rope_tables(offset + t, s.head_dim, s.rope_theta, &s.rope_scaling, dev)?;
        let (cos, sin) = (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?);
        let mask = ops::causal_mask(t, offset, s.sliding_window, dev)?;
        // A capture (`rec` given) uses the fused RMSNorm, RoPE and attention softmax (same
        // values to rounding, a fraction of the graph). Training and generation keep the composed ops, whose
        // exact rounding the committed demo assets (trained by this code) reproduce.
        let fused = rec.is_some();
        // A capture needs no embedding gradient: the lookup is detached.
        let embed = if rec.is_some() {
            self.embed.as_tensor().detach()
        } else {
            self.embed.as_tensor().clone()
        };
        let mut h = embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden_size))?;
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = ops::rms_norm(&h, blk.input_norm.as_tensor(), s.rms_norm_eps, fused)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, s.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = heads(blk.q.forward(&x, rec.as_deref_mut())?, s.num_heads)?;
            let k = heads(blk.k.forward(&x, rec.as_deref_mut())?, s.num_kv_heads)?;
            let v = heads(blk.v.forward(&x, rec.as_deref_mut())?, s.num_kv_heads)?;
            let q = ops::apply_rope(&q, &cos, &sin, fused)?;
            let k = ops::apply_rope(&k, &cos, &sin, fused)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(li, k, v)?,
                None => (k, v),
            };
            let y = ops::attention(&q, &k, &v, &mask, fused)?;
            h = (h + blk.o.forward(&y, rec.as_deref_mut())?)?;
            let x = ops::rms_norm(&h, blk.post_norm.as_tensor(), s.rms_norm_eps, fused)?;
            let g = blk.gate.forward(&x, rec.as_deref_mut())?.silu()?;
            let u = blk.up.forward(&x, rec.as_deref_mut())?;
            h = (h + blk.down.forward(&(g * u)?, rec.as_deref_mut())?)?;
        }
        if let Some(c) = cache {
            c.offset += t;
        }
        ops::rms_norm(&h, self.norm.as_tensor(), s.rms_norm_eps, fused)
    }
}

fn lin(
    p: &mut ParamLoader<'_>,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<TrackedLinear> {
    TrackedLinear::load(p, name, d_in, d_out, bias, false, true)
}
