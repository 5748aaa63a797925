//! Owns `Llama`: the Llama-family decoder's weights and forward with tracked layers and KV cache.
//! Layer: model — may import the ground, linalg, backend and, in this folder, config.rs,
//! kv_cache.rs, linear.rs, ops.rs.
//!
//! The Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3, Phi-3): pre-norm
//! decoder with RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP.
//!
//! h⁰ = E[ids]; for each block: h += o(attn(rope(n_q(q(x))), rope(n_k(k(x))), v(x))) with
//! x = rms(h); h += down(silu(gate(x)) ⊙ up(x)) with x = rms(h); logits = rms(h) Wₗₘᵀ.
//! n_q, n_k: Qwen3's RMSNorm over each head (identity elsewhere). Phi-3 computes q, k, v
//! with one layer `qkv_proj` ([q; k; v] rows) and gate, up with one `gate_up_proj`
//! ([gate; up] rows); each is one tracked layer. Gemma 2: h⁰ = √d E[ids], RMSNorm weights
//! 1 + w, the attention and MLP outputs normalised before they are added
//! (`post_attention_layernorm`, `post_feedforward_layernorm`; the MLP reads
//! `pre_feedforward_layernorm`), GeGLU, soft-capped scores and logits, and the sliding window
//! on even layers only. Gemma 3 (`gemma3_text`): Gemma 2's block with Qwen3's q/k norms
//! (weights 1 + w), no soft caps by default, the window on all but every n-th layer, and the
//! sliding layers' RoPE at their own base (`rope_local_base_freq`) without scaling.

use candle_core::{Device, Tensor, Var};

use crate::error::Result;

use super::config::{LlamaSpec, MlpActivation, RopeScaling};
use super::kv_cache::KvCache;
use super::linear::{ParamLoader, Recorder, TrackedLinear};
use super::ops;

mod tangent;

/// What a layer's attention reads besides q, k, v: the RoPE tables cos, sin [T, D] and the
/// additive mask [T, offset + T], for global layers and (when the model has a window) for
/// sliding ones.
struct AttnTables {
    global: (Tensor, Tensor, Tensor),
    sliding: Option<(Tensor, Tensor, Tensor)>,
}

impl AttnTables {
    /// The tables for `t` new positions after `offset` cached ones.
    fn new(s: &LlamaSpec, t: usize, offset: usize, dev: &Device) -> Result<AttnTables> {
        let rope = |theta: f64, scaling: &RopeScaling| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = ops::rope_tables(offset + t, s.head_dim, theta, scaling, dev)?;
            Ok((cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?))
        };
        let (cos, sin) = rope(s.rope_theta, &s.rope_scaling)?;
        let global = (cos, sin, ops::causal_mask(t, offset, None, dev)?);
        let sliding = match s.sliding_window {
            None => None,
            Some(w) => {
                let (cos, sin) = match s.rope_local_theta {
                    Some(theta) => rope(theta, &RopeScaling::None)?,
                    None => (global.0.clone(), global.1.clone()),
                };
                Some((cos, sin, ops::causal_mask(t, offset, Some(w), dev)?))
            }
        };
        Ok(AttnTables { global, sliding })
    }

    /// (cos, sin, mask) of layer `li`.
    fn layer(&self, s: &LlamaSpec, li: usize) -> (&Tensor, &Tensor, &Tensor) {
        let (cos, sin, mask) = match &self.sliding {
            Some(sl) if s.sliding_layers.is_sliding(li) => sl,
            _ => &self.global,
        };
        (cos, sin, mask)
    }
}

/// Layers that read the same input: separate, or one layer whose output rows are theirs
/// stacked (Phi-3's `qkv_proj` [q; k; v] and `gate_up_proj` [gate; up]).
#[derive(Debug, Clone)]
enum Projections {
    /// One layer per output.
    Separate(Vec<TrackedLinear>),
    /// One layer; output j is columns offsets[j]..offsets[j] + widths[j] of its output.
    Fused(TrackedLinear, Vec<usize>),
}

impl Projections {
    /// Loads `names` (widths `widths`) from `d_in`, or the one layer `fused` when given.
    fn load(
        p: &mut ParamLoader<'_>,
        fused: Option<&str>,
        names: &[String],
        d_in: usize,
        widths: &[usize],
        bias: bool,
    ) -> Result<Self> {
        Ok(match fused {
            Some(name) => Projections::Fused(
                lin(p, name, d_in, widths.iter().sum(), bias)?,
                widths.to_vec(),
            ),
            None => Projections::Separate(
                names
                    .iter()
                    .zip(widths)
                    .map(|(n, &w)| lin(p, n, d_in, w, bias))
                    .collect::<Result<_>>()?,
            ),
        })
    }

    /// Every output for input x [B, T, d_in], in order.
    fn forward(&self, x: &Tensor, mut rec: Option<&mut Recorder>) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(ls) => ls
                .iter()
                .map(|l| l.forward(x, rec.as_deref_mut()))
                .collect(),
            Projections::Fused(l, widths) => {
                let y = l.forward(x, rec)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(2, start, w)?;
                        start += w;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut TrackedLinear> {
        match self {
            Projections::Separate(ls) => ls.iter_mut().collect(),
            Projections::Fused(l, _) => vec![l],
        }
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub(crate) struct LlamaBlock {
    input_norm: Var,
    post_norm: Var,
    /// q, k, v.
    qkv: Projections,
    /// Qwen3's per-head RMSNorm weights [D] of queries and keys.
    qk_norm: Option<(Var, Var)>,
    o: TrackedLinear,
    /// gate, up.
    gate_up: Projections,
    down: TrackedLinear,
    /// Gemma's `pre_feedforward_layernorm` and `post_feedforward_layernorm`
    /// (`post_norm` then normalises the attention output).
    ff_norms: Option<(Var, Var)>,
}

/// A Llama-family model's parameters.
#[derive(Debug, Clone)]
pub(crate) struct Llama {
    spec: LlamaSpec,
    embed: Var,
    blocks: Vec<LlamaBlock>,
    norm: Var,
    lm_head: TrackedLinear,
    /// The base weights are frozen (a LoRA model): the embedding, and outside a capture the
    /// norm weights, enter the forward detached, so that no backward computes their gradients.
    pub(crate) frozen: bool,
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
            let fused = spec.fused_projections;
            let qkv = Projections::load(
                p,
                fused.then(|| format!("{at}.qkv_proj")).as_deref(),
                &["q_proj", "k_proj", "v_proj"].map(|n| format!("{at}.{n}")),
                d,
                &[dq, dkv, dkv],
                spec.qkv_bias,
            )?;
            let qk_norm = if spec.qk_norm {
                Some((
                    p.var(&format!("{at}.q_norm.weight"), &[spec.head_dim])?,
                    p.var(&format!("{at}.k_norm.weight"), &[spec.head_dim])?,
                ))
            } else {
                None
            };
            let o = lin(p, &format!("{at}.o_proj"), dq, d, spec.o_bias)?;
            let post_norm = p.var(&format!("{pre}.post_attention_layernorm.weight"), &[d])?;
            let mlp = format!("{pre}.mlp");
            let gate_up = Projections::load(
                p,
                fused.then(|| format!("{mlp}.gate_up_proj")).as_deref(),
                &["gate_proj", "up_proj"].map(|n| format!("{mlp}.{n}")),
                d,
                &[f, f],
                spec.mlp_bias,
            )?;
            let down = lin(p, &format!("{mlp}.down_proj"), f, d, spec.mlp_bias)?;
            let ff_norms = if spec.gemma {
                Some((
                    p.var(&format!("{pre}.pre_feedforward_layernorm.weight"), &[d])?,
                    p.var(&format!("{pre}.post_feedforward_layernorm.weight"), &[d])?,
                ))
            } else {
                None
            };
            blocks.push(LlamaBlock {
                input_norm,
                post_norm,
                qkv,
                qk_norm,
                o,
                gate_up,
                down,
                ff_norms,
            });
        }
        let norm = p.var("model.norm.weight", &[d])?;
        let lm_head = if spec.tie_word_embeddings {
            TrackedLinear::from_weight("lm_head", embed.clone(), false)
        } else {
            TrackedLinear::load(p, "lm_head", d, v, false, false, false)?
        };
        Ok(Self {
            spec: spec.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            frozen: false,
        })
    }

    /// Every linear layer in forward order (blocks first, lm_head last).
    pub fn linears_mut(&mut self) -> Vec<&mut TrackedLinear> {
        let mut out = Vec::new();
        for b in self.blocks.iter_mut() {
            out.extend(b.qkv.linears_mut());
            out.push(&mut b.o);
            out.extend(b.gate_up.linears_mut());
            out.push(&mut b.down);
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
        let tables = AttnTables::new(s, t, offset, dev)?;
        let scores = ops::Scores {
            scale: s.attn_scale,
            softcap: s.attn_softcap,
        };
        // RMSNorm's weight: w, or Gemma's 1 + w.
        // A LoRA model's norm weights are detached in training; a capture keeps them, as its
        // δ hand-over needs the first tracked layer's input to be on the autograd graph.
        let detach_norms = self.frozen && rec.is_none();
        let nw = |w: &Var| -> Result<Tensor> {
            let w = match detach_norms {
                true => w.as_tensor().detach(),
                false => w.as_tensor().clone(),
            };
            Ok(if s.gemma { w.affine(1.0, 1.0)? } else { w })
        };
        // A capture (`rec` given) uses the fused RMSNorm, RoPE and attention softmax (same
        // values to rounding, a fraction of the graph). Training and generation keep the composed ops, whose
        // exact rounding the committed demo assets (trained by this code) reproduce.
        let fused = rec.is_some();
        // A capture, and a LoRA model, need no embedding gradient: the lookup is detached.
        let embed = if rec.is_some() || self.frozen {
            self.embed.as_tensor().detach()
        } else {
            self.embed.as_tensor().clone()
        };
        let mut h = embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden_size))?;
        if s.gemma {
            h = h.affine((s.hidden_size as f64).sqrt(), 0.0)?;
        }
        for (li, blk) in self.blocks.iter().enumerate() {
            let x = ops::rms_norm(&h, &nw(&blk.input_norm)?, s.rms_norm_eps, fused)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, s.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let [q, k, v]: [Tensor; 3] = blk
                .qkv
                .forward(&x, rec.as_deref_mut())?
                .try_into()
                .map_err(|_| crate::error::Error::Model("q, k, v: expected 3 outputs".into()))?;
            let (mut q, mut k, v) = (
                heads(q, s.num_heads)?,
                heads(k, s.num_kv_heads)?,
                heads(v, s.num_kv_heads)?,
            );
            if let Some((nq, nk)) = &blk.qk_norm {
                q = ops::rms_norm(&q, &nw(nq)?, s.rms_norm_eps, fused)?;
                k = ops::rms_norm(&k, &nw(nk)?, s.rms_norm_eps, fused)?;
            }
            let (cos, sin, layer_mask) = tables.layer(s, li);
            let q = ops::apply_rope(&q, cos, sin, fused)?;
            let k = ops::apply_rope(&k, cos, sin, fused)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(li, k, v)?,
                None => (k, v),
            };
            let y = ops::attention(&q, &k, &v, layer_mask, scores, fused)?;
            let y = blk.o.forward(&y, rec.as_deref_mut())?;
            let x = match &blk.ff_norms {
                None => {
                    h = (h + y)?;
                    ops::rms_norm(&h, &nw(&blk.post_norm)?, s.rms_norm_eps, fused)?
                }
                Some((pre_ff, _)) => {
                    let y = ops::rms_norm(&y, &nw(&blk.post_norm)?, s.rms_norm_eps, fused)?;
                    h = (h + y)?;
                    ops::rms_norm(&h, &nw(pre_ff)?, s.rms_norm_eps, fused)?
                }
            };
            let [g, u]: [Tensor; 2] = blk
                .gate_up
                .forward(&x, rec.as_deref_mut())?
                .try_into()
                .map_err(|_| crate::error::Error::Model("gate, up: expected 2 outputs".into()))?;
            let g = match s.mlp_activation {
                MlpActivation::Silu => g.silu()?,
                MlpActivation::GeluTanh => g.gelu()?,
            };
            let y = blk.down.forward(&(g * u)?, rec.as_deref_mut())?;
            let y = match &blk.ff_norms {
                Some((_, post_ff)) => ops::rms_norm(&y, &nw(post_ff)?, s.rms_norm_eps, fused)?,
                None => y,
            };
            h = (h + y)?;
        }
        if let Some(c) = cache {
            c.offset += t;
        }
        ops::rms_norm(&h, &nw(&self.norm)?, s.rms_norm_eps, fused)
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
