//! Owns `Gpt2`: the GPT-2 decoder's weights and forward with tracked layers and a KV cache.
//! Layer: model — may import the ground, linalg, backend and, in this folder, config.rs,
//! kv_cache.rs, linear.rs, ops.rs.
//!
//! GPT-2: pre-LayerNorm decoder with learned positions, biased Conv1D projections (stored
//! [d_in, d_out] in Hugging Face checkpoints and transposed on load) and a GELU MLP; the
//! head is tied to the token embeddings.
//!
//! h⁰ = E[ids] + P[0..T]; per block: h += c_proj(attn(split(c_attn(ln_1(h)))));
//! h += mlp.c_proj(gelu(c_fc(ln_2(h)))); logits = ln_f(h) Eᵀ.

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

use super::config::{Gpt2Activation, Gpt2Spec};
use super::kv_cache::KvCache;
use super::linear::{ParamLoader, Recorder, TrackedLinear};
use super::ops;

mod tangent;

#[derive(Debug, Clone)]
struct Norm {
    w: Var,
    b: Var,
}

impl Norm {
    fn load(p: &mut ParamLoader<'_>, name: &str, d: usize) -> Result<Self> {
        Ok(Self {
            w: p.var(&format!("{name}.weight"), &[d])?,
            b: p.var(&format!("{name}.bias"), &[d])?,
        })
    }

    /// LayerNorm; `frozen`: with detached weights (no gradient for them).
    fn forward(&self, x: &Tensor, eps: f64, frozen: bool) -> Result<Tensor> {
        match frozen {
            true => ops::layer_norm(
                x,
                &self.w.as_tensor().detach(),
                &self.b.as_tensor().detach(),
                eps,
            ),
            false => ops::layer_norm(x, self.w.as_tensor(), self.b.as_tensor(), eps),
        }
    }
}

#[derive(Debug, Clone)]
struct Gpt2Block {
    ln_1: Norm,
    c_attn: TrackedLinear,
    attn_proj: TrackedLinear,
    ln_2: Norm,
    c_fc: TrackedLinear,
    mlp_proj: TrackedLinear,
}

/// A GPT-2 model's parameters.
#[derive(Debug, Clone)]
pub(crate) struct Gpt2 {
    spec: Gpt2Spec,
    wte: Var,
    wpe: Var,
    blocks: Vec<Gpt2Block>,
    ln_f: Norm,
    lm_head: TrackedLinear,
    /// The base weights are frozen (a LoRA model): the embeddings, and outside a capture the
    /// LayerNorm weights, enter the forward detached, so that no backward computes their
    /// gradients.
    pub(crate) frozen: bool,
}

impl Gpt2 {
    /// Loads the first `spec.n_layer` blocks. Tensor names may carry the `transformer.`
    /// prefix (GPT2LMHeadModel) or not (GPT2Model, the hub's `gpt2` checkpoint).
    pub fn load(spec: &Gpt2Spec, p: &mut ParamLoader<'_>) -> Result<Self> {
        let pre = if p.source.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (d, f, v) = (spec.n_embd, spec.n_inner, spec.vocab_size);
        let wte = p.var(&format!("{pre}wte.weight"), &[v, d])?;
        let wpe = p.var(&format!("{pre}wpe.weight"), &[spec.n_positions, d])?;
        let mut blocks = Vec::with_capacity(spec.n_layer);
        for i in 0..spec.n_layer {
            let b = format!("{pre}h.{i}");
            let conv = |p: &mut ParamLoader<'_>, n: &str, i: usize, o: usize| {
                TrackedLinear::load(p, &format!("{b}.{n}"), i, o, true, true, true)
            };
            let ln_1 = Norm::load(p, &format!("{b}.ln_1"), d)?;
            let c_attn = conv(p, "attn.c_attn", d, 3 * d)?;
            let attn_proj = conv(p, "attn.c_proj", d, d)?;
            let ln_2 = Norm::load(p, &format!("{b}.ln_2"), d)?;
            let c_fc = conv(p, "mlp.c_fc", d, f)?;
            let mlp_proj = conv(p, "mlp.c_proj", f, d)?;
            blocks.push(Gpt2Block {
                ln_1,
                c_attn,
                attn_proj,
                ln_2,
                c_fc,
                mlp_proj,
            });
        }
        let ln_f = Norm::load(p, &format!("{pre}ln_f"), d)?;
        let lm_head = TrackedLinear::from_weight("lm_head", wte.clone(), false);
        Ok(Self {
            spec: spec.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            frozen: false,
        })
    }

    /// Every linear layer in forward order (blocks first, lm_head last).
    pub fn linears_mut(&mut self) -> Vec<&mut TrackedLinear> {
        let mut out = Vec::new();
        for b in self.blocks.iter_mut() {
            out.extend([
                &mut b.c_attn,
                &mut b.attn_proj,
                &mut b.c_fc,
                &mut b.mlp_proj,
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
        let offset = cache.as_ref().map_or(0, |c| c.offset);
        if offset + t > s.n_positions {
            return Err(Error::Model(format!(
                "sequence length {} exceeds GPT-2's n_positions = {}",
                offset + t,
                s.n_positions
            )));
        }
        let (d, nh) = (s.n_embd, s.n_head);
        let hd = d / nh;
        let mask = ops::causal_mask(t, offset, None, ids.device())?;
        // A LoRA model's LayerNorm weights are detached in training; a capture keeps them, as
        // its δ hand-over needs the first tracked layer's input to be on the autograd graph.
        let detach_norms = self.frozen && rec.is_none();
        // A capture (`rec` given), and a LoRA model, need no embedding gradients: the lookups
        // are detached.
        let (wte, wpe) = if rec.is_some() || self.frozen {
            (self.wte.as_tensor().detach(), self.wpe.as_tensor().detach())
        } else {
            (self.wte.as_tensor().clone(), self.wpe.as_tensor().clone())
        };
        let tok = wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos = wpe.narrow(0, offset, t)?;
        let mut h = tok.broadcast_add(&pos)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = blk.ln_1.forward(&h, s.layer_norm_epsilon, detach_norms)?;
            let qkv = blk.c_attn.forward(&x, rec.as_deref_mut())?;
            let heads = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, i * d, d)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(li, heads(1)?, heads(2)?)?,
                None => (heads(1)?, heads(2)?),
            };
            let y = ops::attention(
                &heads(0)?,
                &k,
                &v,
                &mask,
                ops::Scores::standard(hd),
                rec.is_some(),
            )?;
            h = (h + blk.attn_proj.forward(&y, rec.as_deref_mut())?)?;
            let x = blk.ln_2.forward(&h, s.layer_norm_epsilon, detach_norms)?;
            let z = blk.c_fc.forward(&x, rec.as_deref_mut())?;
            let z = match s.activation {
                Gpt2Activation::GeluTanh => z.gelu()?,
                Gpt2Activation::GeluErf => z.gelu_erf()?,
            };
            h = (h + blk.mlp_proj.forward(&z, rec.as_deref_mut())?)?;
        }
        if let Some(c) = cache {
            c.offset += t;
        }
        self.ln_f.forward(&h, s.layer_norm_epsilon, detach_norms)
    }
}
