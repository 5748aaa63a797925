//! Owns `Param`, `TrackedLinear` and `Recorder`: trainable parameters and the tracked linear layer.
//! Layer: model — may import the ground, linalg, backend and, in this folder, custom_ops.rs,
//! weights.rs.
//!
//! A [`TrackedLinear`] computes y = a Wᵀ + b (W: [d_out, d_in]). When a [`Recorder`] is
//! passed and the layer is tracked, it also keeps its input `a` and adds a zero `Var` ε of
//! y's shape to the output: y + ε has the same value, and after backward ∂L/∂ε = ∂L/∂y = δ
//! (candle's backward keeps gradients only for `Var`s, see NOTES-rust-stack.md).
//!
//! With a LoRA adapter ([`LoraBranch`]) the layer computes y = a Wᵀ + b + s (a Aᵀ) Bᵀ: the
//! adapter is two tracked linears of its own, `lora_A` (input a, output u = a Aᵀ) and
//! `lora_B` (input s u, output s u Bᵀ), so each records its (input, δ) like any layer:
//! lora_A's δ is ∂L/∂u = s δ_y B, lora_B's is δ_y, and δᵀ·input is ∂L/∂A and ∂L/∂B.

use candle_core::{Device, Shape, Tensor, Var};

use crate::error::Result;

use super::custom_ops::{is_custom_linear, linear_input_grad_only, DeltaSlot};
use super::weights::TensorSource;

/// One trainable tensor with its Hugging Face name.
#[derive(Debug, Clone)]
pub struct Param {
    /// The tensor's name in the Hugging Face checkpoint.
    pub name: String,
    /// The trainable value (f32).
    pub var: Var,
    /// True for GPT-2 Conv1D weights: the checkpoint stores [d_in, d_out] and `var` holds
    /// the transpose [d_out, d_in]; a checkpoint writer must transpose back.
    pub transposed_from_checkpoint: bool,
}

/// Loads named tensors from a source into `Var`s, in order.
pub(crate) struct ParamLoader<'a> {
    pub source: &'a dyn TensorSource,
    pub device: &'a Device,
    pub params: Vec<Param>,
}

impl<'a> ParamLoader<'a> {
    pub fn new(source: &'a dyn TensorSource, device: &'a Device) -> Self {
        Self {
            source,
            device,
            params: Vec::new(),
        }
    }

    /// The tensor `name` of shape `shape` as a new trainable `Var`.
    pub fn var(&mut self, name: &str, shape: &[usize]) -> Result<Var> {
        let t = self.source.get(name, shape, self.device)?;
        let var = Var::from_tensor(&t)?;
        self.params.push(Param {
            name: name.to_string(),
            var: var.clone(),
            transposed_from_checkpoint: false,
        });
        Ok(var)
    }

    /// A Conv1D weight stored as [d_in, d_out]: loaded and transposed to [d_out, d_in].
    pub fn var_transposed(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Var> {
        let var = if self.source.zero_filled() {
            Var::from_tensor(&self.source.get(name, &[d_out, d_in], self.device)?)?
        } else {
            let t = self.source.get(name, &[d_in, d_out], self.device)?;
            Var::from_tensor(&t.t()?.contiguous()?)?
        };
        self.params.push(Param {
            name: name.to_string(),
            var: var.clone(),
            transposed_from_checkpoint: true,
        });
        Ok(var)
    }
}

/// How a tracked layer's δ = ∂L/∂y is obtained after the backward.
#[derive(Debug)]
pub enum DeltaSource {
    /// Left by the custom linear op's backward (f32 on the CPU); empty when the output did
    /// not reach the loss. Holds the output shape for that case.
    Slot(DeltaSlot, Shape),
    /// The gradient of a zero `Var` ε added to the output (other devices and dtypes):
    /// y + ε has the numerics of y and ∂L/∂ε = δ.
    Perturbation(Var),
}

/// Per-forward record of tracked layers' inputs and where their δ comes from.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Indexed by tracked-layer slot: (a [B, T, d_in] detached, δ's source).
    pub slots: Vec<Option<(Tensor, DeltaSource)>>,
    /// The last few inputs recorded, by the id of the live tensor each was detached from:
    /// layers fed the same tensor (q/k/v, gate/up, and their LoRA `lora_A`s, between which
    /// the `lora_B`s record other inputs) get clones of one detached tensor, so later stages
    /// can recognise a shared input by [`Tensor::id`] and compute its factor once.
    recent_inputs: Vec<(candle_core::TensorId, Tensor)>,
}

/// How many recent inputs [`Recorder`] remembers: enough for q, k, v with adapters (each
/// `lora_A` reads x; each `lora_B` records an input of its own in between).
const RECENT_INPUTS: usize = 4;

impl Recorder {
    /// A recorder for `n` tracked layers.
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| None).collect(),
            recent_inputs: Vec::new(),
        }
    }

    /// `x` detached, shared with an earlier call on the same tensor.
    fn detached_input(&mut self, x: &Tensor) -> Tensor {
        if let Some((_, t)) = self.recent_inputs.iter().find(|(id, _)| *id == x.id()) {
            return t.clone();
        }
        let t = x.detach();
        if self.recent_inputs.len() == RECENT_INPUTS {
            self.recent_inputs.remove(0);
        }
        self.recent_inputs.push((x.id(), t.clone()));
        t
    }
}

/// A linear layer y = a Wᵀ + b that can record (a, δ). While recording, its backward
/// forms ∂L/∂a but not ∂L/∂W (see [`linear_input_grad_only`]).
#[derive(Debug, Clone)]
pub struct TrackedLinear {
    /// Hugging Face module name (weight name without `.weight`).
    pub name: String,
    /// W: [d_out, d_in].
    pub weight: Var,
    /// b: \[d_out\].
    pub bias: Option<Var>,
    /// Recorder slot when tracked.
    pub slot: Option<usize>,
    /// Whether the layer sits inside a transformer block (default tracking).
    pub in_block: bool,
    /// A LoRA adapter added to the output.
    pub lora: Option<Box<LoraBranch>>,
    /// W and b are frozen (a LoRA fine-tune): the forward detaches them, so no backward
    /// forms their gradients.
    pub frozen: bool,
}

/// A LoRA adapter of a linear layer: output s B A a, as the two linears `a` (A: [r, d_in])
/// and `b` (B: [d_out, r]) with the scale s applied to `b`'s input.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    /// lora_A: [r, d_in].
    pub a: TrackedLinear,
    /// lora_B: [d_out, r].
    pub b: TrackedLinear,
    /// s = α / r (α / √r with rsLoRA).
    pub scale: f64,
}

impl TrackedLinear {
    /// Loads `{name}.weight` ([d_out, d_in], or [d_in, d_out] when `conv1d`) and, when
    /// `bias`, `{name}.bias` ([d_out]).
    pub(crate) fn load(
        p: &mut ParamLoader<'_>,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        conv1d: bool,
        in_block: bool,
    ) -> Result<Self> {
        let wname = format!("{name}.weight");
        let weight = if conv1d {
            p.var_transposed(&wname, d_in, d_out)?
        } else {
            p.var(&wname, &[d_out, d_in])?
        };
        let bias = if bias {
            Some(p.var(&format!("{name}.bias"), &[d_out])?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight,
            bias,
            slot: None,
            in_block,
            lora: None,
            frozen: false,
        })
    }

    /// A plain layer (no bias, untracked) over an existing weight.
    pub(crate) fn from_weight(name: &str, weight: Var, in_block: bool) -> Self {
        Self {
            name: name.to_string(),
            weight,
            bias: None,
            slot: None,
            in_block,
            lora: None,
            frozen: false,
        }
    }

    /// d_in.
    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    /// d_out.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: [B, T, d_in] → y: [B, T, d_out] (plus the adapter's output when it has one).
    /// Records (x, ε) when tracked and `rec` is given, and the adapter's layers likewise.
    pub fn forward(&self, x: &Tensor, mut rec: Option<&mut Recorder>) -> Result<Tensor> {
        let y = self.forward_own(x, rec.as_deref_mut())?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let u = l.a.forward(x, rec.as_deref_mut())?;
                let z = l.b.forward(&u.affine(l.scale, 0.0)?, rec)?;
                Ok((y + z)?)
            }
        }
    }

    /// y = x Wᵀ + b without the adapter.
    fn forward_own(&self, x: &Tensor, rec: Option<&mut Recorder>) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let tracked = rec.is_some() && self.slot.is_some();
        // In a capture (`rec` given) only ∂L/∂(layer outputs) are wanted: skip ∂L/∂W, and
        // let the op's backward hand over δ when it can.
        let slot: Option<DeltaSlot> = (tracked && is_custom_linear(x)).then(DeltaSlot::default);
        let w = if self.frozen {
            self.weight.as_tensor().detach()
        } else {
            self.weight.as_tensor().clone()
        };
        let y = if rec.is_some() {
            linear_input_grad_only(x, &w, slot.clone())?
        } else {
            x.reshape((b * t, d_in))?
                .matmul(&w.t()?)?
                .reshape((b, t, self.d_out()))?
        };
        let y = match &self.bias {
            Some(bias) if self.frozen => y.broadcast_add(&bias.as_tensor().detach())?,
            Some(bias) => y.broadcast_add(bias.as_tensor())?,
            None => y,
        };
        match (rec, self.slot) {
            (Some(rec), Some(i)) => {
                let a = rec.detached_input(x);
                let (y, source) = match slot {
                    Some(slot) => (y.clone(), DeltaSource::Slot(slot, y.shape().clone())),
                    None => {
                        let eps = Var::zeros(y.shape(), y.dtype(), y.device())?;
                        ((y + eps.as_tensor())?, DeltaSource::Perturbation(eps))
                    }
                };
                rec.slots[i] = Some((a, source));
                Ok(y)
            }
            _ => Ok(y),
        }
    }
}
