//! Owns `Param`, `TrackedLinear` and `Recorder`: trainable parameters and the tracked linear layer.
//! Layer: model — may import the ground, linalg, backend and, in this folder, custom_ops.rs,
//! weights.rs.
//!
//! A [`TrackedLinear`] computes y = a Wᵀ + b (W: [d_out, d_in]). When a [`Recorder`] is
//! passed and the layer is tracked, it also keeps its input `a` and adds a zero `Var` ε of
//! y's shape to the output: y + ε has the same value, and after backward ∂L/∂ε = ∂L/∂y = δ
//! (candle's backward keeps gradients only for `Var`s, see NOTES-rust-stack.md).

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
    /// The last input recorded, by the id of the live tensor it was detached from: layers
    /// fed the same tensor (q/k/v, gate/up) get clones of one detached tensor, so later
    /// stages can recognise a shared input by [`Tensor::id`] and compute its factor once.
    last_input: Option<(candle_core::TensorId, Tensor)>,
}

impl Recorder {
    /// A recorder for `n` tracked layers.
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| None).collect(),
            last_input: None,
        }
    }

    /// `x` detached, shared with the previous call when `x` is the same tensor.
    fn detached_input(&mut self, x: &Tensor) -> Tensor {
        match &self.last_input {
            Some((id, t)) if *id == x.id() => t.clone(),
            _ => {
                let t = x.detach();
                self.last_input = Some((x.id(), t.clone()));
                t
            }
        }
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
        })
    }

    /// d_in.
    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    /// d_out.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: [B, T, d_in] → y: [B, T, d_out]. Records (x, ε) when tracked and `rec` is given.
    pub fn forward(&self, x: &Tensor, rec: Option<&mut Recorder>) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
        let tracked = rec.is_some() && self.slot.is_some();
        // In a capture (`rec` given) only ∂L/∂(layer outputs) are wanted: skip ∂L/∂W, and
        // let the op's backward hand over δ when it can.
        let slot: Option<DeltaSlot> = (tracked && is_custom_linear(x)).then(DeltaSlot::default);
        let y = if rec.is_some() {
            linear_input_grad_only(x, self.weight.as_tensor(), slot.clone())?
        } else {
            x.reshape((b * t, d_in))?
                .matmul(&self.weight.as_tensor().t()?)?
                .reshape((b, t, self.d_out()))?
        };
        let y = match &self.bias {
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
