//! Owns `Model` and `LoadOptions`: loading a causal language model of any supported family.
//! Layer: model — may import the ground, linalg, backend and, in this folder, batch.rs, config.rs,
//! dual.rs, fused.rs, gpt2.rs, kv_cache.rs, linear.rs, llama.rs, lora.rs, loss.rs, tracking.rs,
//! weights.rs.
//!
//! [`Model`]: a loaded causal language model of any supported family, with its trainable
//! parameters and tracked linear layers. With a LoRA adapter (a PEFT adapter folder, or a
//! fresh one for fine-tuning) the trainable parameters are the adapter's A and B only.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

use super::batch::TokenBatch;
use super::config::ModelSpec;
use super::gpt2::Gpt2;
use super::kv_cache::KvCache;
use super::linear::{Param, ParamLoader, Recorder, TrackedLinear};
use super::llama::Llama;
use super::lora::{self, AdapterWeights, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use super::loss;
use super::tracking::Tracking;
use super::weights::{SafetensorsDir, TensorSource};
use crate::config::LoraTrack;

/// A fresh LoRA adapter to fine-tune ([`AdapterWeights::Fresh`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInit {
    /// The adapter's rank, α and targets.
    pub config: LoraConfig,
    /// Seed of A's initialisation.
    pub seed: u64,
}

/// How to build a model from a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Keep only the first N decoder layers (embeddings, final norm and head are kept).
    pub max_layers: Option<usize>,
    /// Which linear layers record (a, δ).
    pub tracking: Tracking,
    /// Give a model loaded from a plain checkpoint this fresh LoRA adapter (an adapter
    /// folder keeps its own).
    pub lora_init: Option<LoraInit>,
    /// On a LoRA model, which layers [`Tracking::BlockLinears`] tracks: the adapters' or the
    /// frozen layers they wrap.
    pub lora_track: LoraTrack,
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
    /// The adapter, on a LoRA model.
    lora: Option<LoraConfig>,
    /// Floats of the frozen base weights of a LoRA model (0 otherwise).
    frozen_floats: u64,
    /// The folder the base weights were read from (for an adapter's
    /// `base_model_name_or_path`).
    base_dir: Option<PathBuf>,
}

/// Resolves an adapter folder's base model: `base_model_name_or_path` as a local folder
/// (absolute, or relative to the adapter folder) holding `config.json`.
fn adapter_base(dir: &Path, cfg: &LoraConfig) -> Result<PathBuf> {
    let name = cfg.base_model.as_deref().unwrap_or("");
    let cand = dir.join(name);
    if !name.is_empty() && cand.join("config.json").is_file() {
        return Ok(cand);
    }
    Err(Error::Model(format!(
        "{}: field `base_model_name_or_path` = `{name}` is not a local model folder (with \
         config.json); set it to the base model's folder (absolute, or relative to the adapter \
         folder), or import the run with `[train] import_from` (docs/import-trainer.md)",
        dir.join(ADAPTER_CONFIG).display()
    )))
}

impl Model {
    /// Loads `dir/config.json` and the safetensors weights in `dir`; or, when `dir` is a
    /// PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`), its base
    /// model with the adapter. A plain checkpoint gets `opts.lora_init`'s fresh adapter.
    pub fn load(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        if dir.join(ADAPTER_CONFIG).is_file() {
            let cfg = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG))?;
            if cfg.dropout > 0.0 {
                tracing::debug!(
                    "{}: lora_dropout = {} was a training-time noise; gradients are taken \
                     without it",
                    dir.display(),
                    cfg.dropout
                );
            }
            let base = adapter_base(dir, &cfg)?;
            if !dir.join(ADAPTER_WEIGHTS).is_file() {
                return Err(Error::Model(format!(
                    "{}: no {ADAPTER_WEIGHTS}; save the adapter with safetensors \
                     (save_pretrained(..., safe_serialization=True), PEFT's default)",
                    dir.display()
                )));
            }
            let weights = SafetensorsDir::open_file(dir, ADAPTER_WEIGHTS)?;
            let spec = ModelSpec::from_file(&base.join("config.json"))?;
            let source = SafetensorsDir::open(&base)?;
            let mut m = Self::build(
                &spec,
                &source,
                Some((&cfg, AdapterWeights::Source(&weights))),
                opts,
                device,
            )?;
            // Every tensor of the file must be an adapter matrix the model uses.
            let used: std::collections::HashSet<&str> =
                m.params.iter().map(|p| p.name.as_str()).collect();
            if let Some(extra) = weights
                .names()
                .into_iter()
                .find(|n| !used.contains(n.as_str()))
            {
                return Err(Error::Model(format!(
                    "{}: tensor `{extra}` is not a lora_A/lora_B matrix of a targeted module \
                     (embedding adapters, DoRA magnitudes and saved modules are not supported)",
                    dir.join(ADAPTER_WEIGHTS).display()
                )));
            }
            m.base_dir = Some(base);
            return Ok(m);
        }
        let spec = ModelSpec::from_file(&dir.join("config.json"))?;
        let source = SafetensorsDir::open(dir)?;
        let mut m = Self::from_source(&spec, &source, opts, device)?;
        m.base_dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// The model at `dir` (a checkpoint or an adapter folder, as [`Model::load`] reads)
    /// with zero weights that occupy (almost) no memory ([`Model::shape_only`]).
    pub fn shapes_of(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let zeros = super::weights::ShapeOnly;
        if dir.join(ADAPTER_CONFIG).is_file() {
            let cfg = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG))?;
            let spec = ModelSpec::from_file(&adapter_base(dir, &cfg)?.join("config.json"))?;
            let w = AdapterWeights::Source(&zeros);
            return Self::build(&spec, &zeros, Some((&cfg, w)), opts, &Device::Cpu);
        }
        let spec = ModelSpec::from_file(&dir.join("config.json"))?;
        Self::shape_only(&spec, opts)
    }

    /// The model of `spec` with zero weights that occupy (almost) no memory
    /// ([`super::weights::ShapeOnly`]): its parameters, tracked layers and vocabulary have
    /// their real shapes, for the memory and storage plan of a model whose weights are not
    /// here (`source-tda plan`). Never run it: every output would be zero.
    pub fn shape_only(spec: &ModelSpec, opts: &LoadOptions) -> Result<Self> {
        Self::from_source(spec, &super::weights::ShapeOnly, opts, &Device::Cpu)
    }

    /// Builds the model of `spec` from tensors named as in Hugging Face checkpoints (with
    /// `opts.lora_init`'s fresh adapter when set).
    pub fn from_source(
        spec: &ModelSpec,
        source: &dyn TensorSource,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        match &opts.lora_init {
            Some(init) => {
                let w = AdapterWeights::Fresh { seed: init.seed };
                Self::build(spec, source, Some((&init.config, w)), opts, device)
            }
            None => Self::build(spec, source, None, opts, device),
        }
    }

    /// Builds the model of `spec` from `source`, with `adapter` when given.
    fn build(
        spec: &ModelSpec,
        source: &dyn TensorSource,
        adapter: Option<(&LoraConfig, AdapterWeights<'_>)>,
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
        let mut params = loader.params;
        let mut linears: Vec<&mut TrackedLinear> = match &mut net {
            Net::Llama(m) => m.linears_mut(),
            Net::Gpt2(m) => m.linears_mut(),
        };
        let frozen_floats: u64 = match adapter {
            None => 0,
            Some(_) => params.iter().map(|p| p.var.elem_count() as u64).sum(),
        };
        let lora_cfg = match adapter {
            None => None,
            Some((cfg, weights)) => {
                let modules: Vec<String> = linears
                    .iter()
                    .map(|l| peft_module(&spec, &l.name))
                    .collect();
                params = lora::attach(&mut linears, &modules, cfg, &weights, device)?;
                Some(cfg.clone())
            }
        };
        // Default tracking on a LoRA model: the adapters, or the layers they wrap.
        let adapters = opts.lora_track == LoraTrack::Adapter;
        let mut names: Vec<(String, bool)> = Vec::new();
        for l in &linears {
            match &l.lora {
                None => names.push((l.name.clone(), l.in_block && lora_cfg.is_none())),
                Some(b) => {
                    names.push((l.name.clone(), l.in_block && !adapters));
                    names.push((b.a.name.clone(), adapters));
                    names.push((b.b.name.clone(), adapters));
                }
            }
        }
        let chosen = opts.tracking.select(&names)?;
        let mut chosen = chosen.into_iter();
        let mut tracked = Vec::new();
        let mut assign = |l: &mut TrackedLinear, on: bool| {
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
        };
        for l in linears.iter_mut() {
            assign(l, chosen.next().unwrap_or(false));
            if let Some(b) = l.lora.as_mut() {
                assign(&mut b.a, chosen.next().unwrap_or(false));
                assign(&mut b.b, chosen.next().unwrap_or(false));
            }
        }
        // A LoRA model trains A and B only: its embeddings and norms (like its linears) enter
        // the forward detached, so that training computes no gradient it would discard.
        if lora_cfg.is_some() {
            match &mut net {
                Net::Llama(m) => m.frozen = true,
                Net::Gpt2(m) => m.frozen = true,
            }
        }
        Ok(Self {
            spec,
            net,
            params,
            tracked,
            device: device.clone(),
            lora: lora_cfg,
            frozen_floats,
            base_dir: None,
        })
    }

    /// Floats of the frozen base weights of a LoRA model, which [`Model::params`] leaves
    /// out (0 for a plain model).
    pub fn frozen_floats(&self) -> u64 {
        self.frozen_floats
    }

    /// The LoRA adapter's configuration, on a LoRA model.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The folder the base weights were read from, when loaded from one.
    pub fn base_dir(&self) -> Option<&Path> {
        self.base_dir.as_deref()
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
    /// embedding); on a LoRA model the adapter matrices alone, named as in
    /// `adapter_model.safetensors`.
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
        if self.lora.is_some() {
            return Err(Error::Model(
                "forward-mode tangents (Gauss–Newton products) are not implemented for LoRA \
                 models"
                    .into(),
            ));
        }
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
            && head.lora.is_none()
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

/// The module's path in the `transformers` model (PEFT's name for it): ours, except that
/// GPT-2's blocks sit under `transformer.` even where the checkpoint leaves the prefix out.
fn peft_module(spec: &ModelSpec, name: &str) -> String {
    match spec {
        ModelSpec::Gpt2(_) if name != "lm_head" && !name.starts_with("transformer.") => {
            format!("transformer.{name}")
        }
        _ => name.to_string(),
    }
}
