//! Owns `Model` and `LoadOptions`: loading a causal language model of any supported family.
//! Layer: model — may import the ground, linalg, backend and, in this folder, batch.rs, config.rs,
//! dual.rs, fused.rs, gpt2.rs, kv_cache.rs, linear.rs, llama.rs, loss.rs, tracking.rs, weights.rs.
//!
//! [`Model`]: a loaded causal language model of any supported family, with its trainable
//! parameters and tracked linear layers.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

use super::batch::TokenBatch;
use super::config::ModelSpec;
use super::gpt2::Gpt2;
use super::kv_cache::KvCache;
use super::linear::{Param, ParamLoader, Recorder, TrackedLinear};
use super::llama::Llama;
use super::loss;
use super::tracking::Tracking;
use super::weights::{SafetensorsDir, TensorSource};

/// How to build a model from a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Keep only the first N decoder layers (embeddings, final norm and head are kept).
    pub max_layers: Option<usize>,
    /// Which linear layers record (a, δ).
    pub tracking: Tracking,
}

/// Shape facts of one tracked layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Hugging Face module name, e.g. `model.layers.0.mlp.down_proj`.
    pub name: String,
    /// d_in (without the bias column).
    pub d_in: usize,
    /// d_out.
    pub d_out: usize,
    /// The layer has a bias; captured `a` then has d_in + 1 columns, the last all ones.
    pub has_bias: bool,
}

#[derive(Debug, Clone)]
enum Net {
    Llama(Llama),
    Gpt2(Gpt2),
}

/// A causal LM (f32) whose weights are trainable `Var`s.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    net: Net,
    params: Vec<Param>,
    tracked: Vec<LayerInfo>,
    device: Device,
}

impl Model {
    /// Loads `dir/config.json` and the safetensors weights in `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let spec = ModelSpec::from_file(&dir.join("config.json"))?;
        let source = SafetensorsDir::open(dir)?;
        Self::from_source(&spec, &source, opts, device)
    }

    /// The model of `spec` with zero weights that occupy (almost) no memory
    /// ([`super::weights::ShapeOnly`]): its parameters, tracked layers and vocabulary have
    /// their real shapes, for the memory and storage plan of a model whose weights are not
    /// here (`source-tda plan`). Never run it: every output would be zero.
    pub fn shape_only(spec: &ModelSpec, opts: &LoadOptions) -> Result<Self> {
        Self::from_source(spec, &super::weights::ShapeOnly, opts, &Device::Cpu)
    }

    /// Builds the model of `spec` from tensors named as in Hugging Face checkpoints.
    pub fn from_source(
        spec: &ModelSpec,
        source: &dyn TensorSource,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        let spec = match opts.max_layers {
            Some(n) => spec.truncated(n)?,
            None => spec.clone(),
        };
        let mut loader = ParamLoader::new(source, device);
        let mut net = match &spec {
            ModelSpec::Llama(s) => Net::Llama(Llama::load(s, &mut loader)?),
            ModelSpec::Gpt2(s) => Net::Gpt2(Gpt2::load(s, &mut loader)?),
        };
        let params = loader.params;
        let mut linears: Vec<&mut TrackedLinear> = match &mut net {
            Net::Llama(m) => m.linears_mut(),
            Net::Gpt2(m) => m.linears_mut(),
        };
        let names: Vec<(String, bool)> = linears
            .iter()
            .map(|l| (l.name.clone(), l.in_block))
            .collect();
        let chosen = opts.tracking.select(&names)?;
        let mut tracked = Vec::new();
        for (l, on) in linears.iter_mut().zip(chosen) {
            l.slot = None;
            if on {
                l.slot = Some(tracked.len());
                tracked.push(LayerInfo {
                    name: l.name.clone(),
                    d_in: l.d_in(),
                    d_out: l.d_out(),
                    has_bias: l.bias.is_some(),
                });
            }
        }
        Ok(Self {
            spec,
            net,
            params,
            tracked,
            device: device.clone(),
        })
    }

    /// The architecture (after truncation).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable parameters in checkpoint order (a tied head appears once, as the
    /// embedding).
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Tracked layers in forward order; capture results use the same order.
    pub fn tracked_layers(&self) -> &[LayerInfo] {
        &self.tracked
    }

    /// ids: [B, T] u32 → logits [B, T, V]. Differentiable w.r.t. the parameters.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_rec(ids, None)
    }

    pub(crate) fn forward_rec(&self, ids: &Tensor, rec: Option<&mut Recorder>) -> Result<Tensor> {
        self.forward_inner(ids, rec, None)
    }

    pub(crate) fn forward_inner(
        &self,
        ids: &Tensor,
        mut rec: Option<&mut Recorder>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = self.hidden_inner(ids, rec.as_deref_mut(), cache)?;
        let z = self.head().forward(&x, rec)?;
        match self.spec.final_softcap() {
            Some(c) => super::ops::softcap(&z, c),
            None => Ok(z),
        }
    }

    /// ids: [B, T] u32 → the final normalised hidden states [B, T, d] that the head reads.
    pub(crate) fn hidden_rec(&self, ids: &Tensor, rec: Option<&mut Recorder>) -> Result<Tensor> {
        self.hidden_inner(ids, rec, None)
    }

    fn hidden_inner(
        &self,
        ids: &Tensor,
        rec: Option<&mut Recorder>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.check_ids(ids)?;
        match &self.net {
            Net::Llama(m) => m.hidden(ids, rec, cache),
            Net::Gpt2(m) => m.hidden(ids, rec, cache),
        }
    }

    /// ids [K·B, T] → the final normalised hidden states and their tangents along `dirs`
    /// (K copies of B documents; [`super::dual`]).
    pub(super) fn hidden_tangent(
        &self,
        ids: &Tensor,
        dirs: super::dual::Directions,
    ) -> Result<super::dual::Dual> {
        self.check_ids(ids)?;
        match &self.net {
            Net::Llama(m) => m.hidden_tangent(ids, dirs),
            Net::Gpt2(m) => m.hidden_tangent(ids, dirs),
        }
    }

    /// The output head (lm_head; tied to the embeddings when the checkpoint ties them).
    pub(super) fn head(&self) -> &TrackedLinear {
        match &self.net {
            Net::Llama(m) => m.head(),
            Net::Gpt2(m) => m.head(),
        }
    }

    /// The head's weight W [V, d] when a capture may fuse the head with its loss
    /// ([`super::head_loss`]): the head is not tracked (its δ would be the [N, V] logit
    /// gradient the fused op never forms), has no bias, its logits are not soft-capped, and
    /// it is f32 on the CPU.
    pub(crate) fn fusable_head(&self) -> Option<Tensor> {
        let head = self.head();
        let w = head.weight.as_tensor();
        (head.slot.is_none()
            && head.bias.is_none()
            && self.spec.final_softcap().is_none()
            && super::fused::applies(w))
        .then(|| w.clone())
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let v = self.spec.vocab_size() as u32;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id >= v {
            return Err(Error::Model(format!(
                "token id {max_id} is out of range for vocabulary size {v}"
            )));
        }
        Ok(())
    }

    /// Per-document summed cross-entropy over the batch's loss-masked targets, as a
    /// differentiable \[B\] tensor (the training objective is its sum or mean). On a
    /// prompt/completion batch this is the query measurement −log p(completion | prompt).
    pub fn loss_tensor(&self, batch: &TokenBatch) -> Result<Tensor> {
        let logits = self.forward(&batch.input_ids)?;
        loss::doc_losses(&logits, &batch.target_ids, &batch.prediction_mask)
    }

    /// Per-document losses without building gradients.
    pub fn doc_losses(&self, batch: &TokenBatch) -> Result<Vec<f32>> {
        Ok(self.loss_tensor(batch)?.detach().to_vec1::<f32>()?)
    }

    /// Number of tracked layers.
    pub(crate) fn n_tracked(&self) -> usize {
        self.tracked.len()
    }
}
