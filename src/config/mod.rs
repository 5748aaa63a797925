//! Config: the typed parameter sets (`configs/*.toml`) and pipeline files, with validation.
//! Layer: ground — may import error and util only (every other layer reads its types).
//!
//! Parameter sets (`configs/*.toml`): typed, validated on load, resolved (defaults filled
//! in, relative paths made absolute against the config file's folder) and written into the
//! run directory.
//!
//! ```toml
//! [model]
//! id = "HuggingFaceTB/SmolLM2-135M-Instruct"   # hub repo id, or a local folder
//! revision = "main"
//!
//! [data.train]
//! id = "my-org/my-finetune-set"                # hub dataset id, or a local file or folder
//! split = "train"
//! shape = "text"                               # or "prompt_completion"
//! ```
//!
//! Every key, its default and its allowed values are documented on the fields below and in
//! `configs/README.md`.

mod attribution;
mod data;
mod device;
mod diff;
mod eval;
mod load;
mod lora;
mod pipeline;
mod query;
mod source;
mod split;
mod stages;
mod train;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use attribution::{
    AdamResponse, AttributionConfig, CandidatesConfig, EigenPrecision, FisherKind, GeneratedConfig,
    MethodKind, RefineConfig, RefineMethod,
};
pub use data::{
    is_role_name, DataConfig, DataFormat, DatasetConfig, DocShape, CHATML_TEMPLATE, FIXED_ROLES,
};
pub use device::{DeviceKind, PrecisionKind};
pub use diff::{diff_values, KeyChange};
pub use eval::{EvalConfig, EvalMethod};
pub use load::{parse_toml, read_toml};
pub use lora::{AdapterConfig, LoraTargets, LoraTrack, LoraTrainConfig};
pub use pipeline::{Pipeline, STAGE_ORDER};
pub use query::QueryConfig;
pub use source::SourceKind;
pub use split::{SliceUnit, SplitSlice, SplitSpec, SPLIT_FORMS};
pub use stages::TrainStage;
pub use train::{
    LossNormalization, MassSpec, OptimizerKind, PretrainConfig, ScheduleKind, StageConfig,
    TrainConfig, FROM_MODEL, MAX_TOTAL_STEPS,
};

use crate::error::{Error, Result};
use source::default_revision;

/// A whole parameter set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run-wide settings.
    #[serde(default)]
    pub run: RunConfig,
    /// Where models and datasets come from (Hugging Face hub and its cache).
    #[serde(default)]
    pub hub: HubConfig,
    /// The pretrained model to fine-tune and attribute.
    pub model: ModelConfig,
    /// The data sets: fine-tuning documents, queries, pretraining sample.
    pub data: DataConfig,
    /// How documents are grouped into batches by the stages that run the model.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Fine-tuning by the `finetune` stage: optimizer, schedule, batches, segments.
    #[serde(default)]
    pub train: TrainConfig,
    /// The pretrained model as the trajectory's first segment.
    #[serde(default)]
    pub pretrain: Option<PretrainConfig>,
    /// How the fit, query and score stages attribute.
    #[serde(default)]
    pub attribution: AttributionConfig,
    /// The evaluation stages `eval-recall` and `eval-lds`.
    #[serde(default)]
    pub eval: EvalConfig,
    /// How the query stage completes prompt-only queries.
    #[serde(default)]
    pub query: QueryConfig,
}

/// `[run]`: settings for the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A label for the run (shown in reports). Default: the config file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Seed of every random choice in the run. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Where `fit` and `score` run: `cpu` (the reference) or `cuda`. Default `cpu`.
    #[serde(default, skip_serializing_if = "DeviceKind::is_default")]
    pub device: DeviceKind,
    /// Input precision of the CUDA kernels: `f32`, `tf32` or `bf16` (only with `device =
    /// "cuda"`). Default `f32`.
    #[serde(default, skip_serializing_if = "PrecisionKind::is_default")]
    pub precision: PrecisionKind,
}

/// `[hub]`: the Hugging Face hub and its local cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The hub cache folder (the one holding `models--ORG--NAME`). Default: `$HF_HUB_CACHE`,
    /// else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network; resolve from the cache only. `HF_HUB_OFFLINE=1` does the same.
    #[serde(default)]
    pub offline: bool,
    /// The hub's address. Default: `$HF_ENDPOINT`, else `https://huggingface.co`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Seconds to wait for the hub to accept a connection before falling back to the cache.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: f64,
}

fn default_connect_timeout() -> f64 {
    5.0
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            cache_dir: None,
            offline: false,
            endpoint: None,
            connect_timeout_s: default_connect_timeout(),
        }
    }
}

/// `[model]`: the pretrained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hub repo id (`ORG/NAME`) or local folder with config.json, tokenizer.json and
    /// safetensors weights.
    pub id: String,
    /// Branch, tag or commit of the hub repo. Default `main`. Ignored for local folders.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// `auto`, `hub` or `local`. Default `auto`.
    #[serde(default)]
    pub source: SourceKind,
    /// A PEFT LoRA adapter over this model, attributed as the fine-tuned model
    /// ([`AdapterConfig`]). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterConfig>,
}

/// `[batching]`: token-budget batching used by the stages that run the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Upper bound on batch size × padded length (tokens per batch). Default 4096.
    #[serde(default = "default_token_budget")]
    pub token_budget: usize,
    /// Upper bound on documents per batch. Default 64.
    #[serde(default = "default_max_batch")]
    pub max_batch_size: usize,
}

fn default_token_budget() -> usize {
    4096
}
fn default_max_batch() -> usize {
    64
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            token_budget: default_token_budget(),
            max_batch_size: default_max_batch(),
        }
    }
}

impl Config {
    /// Reads, validates and resolves a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let path = crate::util::fsx::clean_path(path);
        let mut config: Config = read_toml(&path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.run.name.is_none() {
            config.run.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        config.resolve(base, &path)?;
        config.validate(&path)?;
        Ok(config)
    }

    /// Parses a config from text (relative paths resolve against `base`); `file` is used in
    /// error messages.
    pub fn from_str_at(text: &str, file: &Path, base: &Path) -> Result<Config> {
        let mut config: Config = parse_toml(file, text)?;
        config.resolve(base, file)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Fills in what `auto` means and makes local paths absolute.
    fn resolve(&mut self, base: &Path, file: &Path) -> Result<()> {
        if let Some(dir) = &self.hub.cache_dir {
            self.hub.cache_dir = Some(absolute_against(base, dir));
        }
        let (source, id) = resolve_source(self.model.source, &self.model.id, base, file, "model")?;
        self.model.source = source;
        self.model.id = id;
        if let Some(a) = &mut self.model.adapter {
            let (source, id) = resolve_source(a.source, &a.id, base, file, "model.adapter")?;
            a.source = source;
            a.id = id;
        }
        for (role, ds) in self.data.roles_mut() {
            let (source, id) =
                resolve_source(ds.source, &ds.id, base, file, &format!("data.{role}"))?;
            ds.source = source;
            ds.id = id;
        }
        self.train.resolve(self.run.seed);
        if let Some(p) = &self.train.import_from {
            self.train.import_from = Some(absolute_against(base, p));
        }
        if let Some(p) = &self.attribution.factor_cache {
            self.attribution.factor_cache = Some(absolute_against(base, p));
        }
        if let Some(p) = &mut self.pretrain {
            if p.dataset.is_none() && self.data.pretrain.is_some() {
                p.dataset = Some("pretrain".into());
            }
        }
        Ok(())
    }

    /// Checks every value against its allowed range.
    fn validate(&self, file: &Path) -> Result<()> {
        let err = |key: &str, msg: String| Error::config(file, format!("key `{key}`: {msg}"));
        if !(self.hub.connect_timeout_s > 0.0 && self.hub.connect_timeout_s <= 600.0) {
            return Err(err(
                "hub.connect_timeout_s",
                format!(
                    "{} is out of range; allowed: a number of seconds in (0, 600]",
                    self.hub.connect_timeout_s
                ),
            ));
        }
        if let Some(ep) = &self.hub.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(err(
                    "hub.endpoint",
                    format!("`{ep}` is not a URL; allowed: http://… or https://…"),
                ));
            }
        }
        if self.run.device == DeviceKind::Cpu && !self.run.precision.is_default() {
            return Err(err(
                "run.precision",
                format!(
                    "\"{}\" needs `device = \"cuda\"` (the CPU path computes in f32); allowed \
                     with `device = \"cpu\"`: \"f32\"",
                    self.run.precision.name()
                ),
            ));
        }
        if self.model.revision.trim().is_empty() {
            return Err(err(
                "model.revision",
                "is empty; allowed: a branch, tag or commit hash".into(),
            ));
        }
        if self.batching.token_budget == 0 {
            return Err(err(
                "batching.token_budget",
                "is 0; allowed: a number of tokens ≥ the longest `max_length`".into(),
            ));
        }
        if self.batching.max_batch_size == 0 {
            return Err(err(
                "batching.max_batch_size",
                "is 0; allowed: 1 or more".into(),
            ));
        }
        let roles: Vec<&str> = self.data.roles().iter().map(|(r, _)| *r).collect();
        self.train.check(&roles).map_err(|(k, m)| err(&k, m))?;
        self.attribution.check().map_err(|(k, m)| err(&k, m))?;
        self.eval.check().map_err(|(k, m)| err(&k, m))?;
        self.query.check().map_err(|(k, m)| err(&k, m))?;
        self.train
            .check_stages(&roles)
            .map_err(|(k, m)| err(&k, m))?;
        if let Some(a) = &self.model.adapter {
            self.check_adapter(a, &err)?;
        }
        if self.train.lora.is_some() && self.pretrain.is_some() {
            return Err(err(
                "train.lora",
                "with [pretrain]: the pretrained model has no adapter to attribute through; \
                 drop [pretrain] for a LoRA fine-tune"
                    .into(),
            ));
        }
        let used: Vec<String> = self
            .train
            .stage_list()
            .into_iter()
            .map(|s| s.train.dataset)
            .chain(self.pretrain.iter().filter_map(|p| p.dataset.clone()))
            .collect();
        if let Some(unused) = self.data.extra.keys().find(|k| !used.contains(k)) {
            return Err(err(
                &format!("data.{unused}"),
                "is not used: a data set other than train, query and pretrain must be the \
                 `dataset` of a [[train.stages]] entry, of [train] or of [pretrain]; name it \
                 there or remove it"
                    .into(),
            ));
        }
        if let Some(p) = &self.pretrain {
            p.check(&roles).map_err(|(k, m)| err(&k, m))?;
        }
        self.data.check(self.batching.token_budget, &err)?;
        Ok(())
    }

    /// `[model] adapter` is the fine-tuned model: refuses the keys that would train or import
    /// another one, naming what to drop.
    fn check_adapter(&self, a: &AdapterConfig, err: &dyn Fn(&str, String) -> Error) -> Result<()> {
        if a.revision.trim().is_empty() {
            return Err(err(
                "model.adapter.revision",
                "is empty; allowed: a branch, tag or commit hash".into(),
            ));
        }
        let clash = [
            (
                self.train.lora.is_some(),
                "train.lora",
                "would train a new adapter; drop [train.lora] to attribute the given adapter, or \
                 drop model.adapter to fine-tune one",
            ),
            (
                self.train.import_from.is_some(),
                "train.import_from",
                "imports a Trainer run whose checkpoints are the fine-tuned model (a Trainer + \
                 PEFT run's adapters import that way); drop one of the two",
            ),
            (
                self.train.stages.is_some(),
                "train.stages",
                "trains stages; an adapter given by model.adapter is not trained here",
            ),
            (
                self.pretrain.is_some() || self.data.pretrain.is_some(),
                if self.pretrain.is_some() {
                    "pretrain"
                } else {
                    "data.pretrain"
                },
                "declares a pretraining segment, which has no adapter to attribute through; \
                 drop it",
            ),
        ];
        match clash.into_iter().find(|c| c.0) {
            Some((_, key, why)) => Err(err(key, format!("with model.adapter: {why}"))),
            None => Ok(()),
        }
    }

    /// The resolved config as TOML (what is written into the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// The resolved config as a JSON value (for hashing and diffs).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("config serialises to JSON")
    }
}

fn absolute_against(base: &Path, p: &Path) -> PathBuf {
    let p = expand_home(p);
    crate::util::fsx::clean_path(&if p.is_absolute() { p } else { base.join(p) })
}

fn expand_home(p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    p.to_path_buf()
}

fn looks_like_path(id: &str) -> bool {
    id.starts_with('/') || id.starts_with("./") || id.starts_with("../") || id.starts_with('~')
}

/// A hub repo id: `NAME` or `ORG/NAME` of letters, digits, `-`, `_`, `.`.
pub fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    !id.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn resolve_source(
    kind: SourceKind,
    id: &str,
    base: &Path,
    file: &Path,
    section: &str,
) -> Result<(SourceKind, String)> {
    let id = id.trim();
    if id.is_empty() {
        return Err(Error::config(
            file,
            format!(
                "key `{section}.id`: is empty; allowed: a hub repo id (ORG/NAME) or a local path"
            ),
        ));
    }
    let local = absolute_against(base, Path::new(id));
    let kind = match kind {
        SourceKind::Auto if looks_like_path(id) || local.exists() => SourceKind::Local,
        SourceKind::Auto => SourceKind::Hub,
        k => k,
    };
    match kind {
        SourceKind::Local => Ok((SourceKind::Local, local.to_string_lossy().into_owned())),
        SourceKind::Hub if is_repo_id(id) => Ok((SourceKind::Hub, id.to_string())),
        SourceKind::Hub => Err(Error::config(
            file,
            format!(
                "key `{section}.id`: `{id}` is not a hub repo id and no such local path exists \
                 (looked for {}); allowed: ORG/NAME of letters, digits, `-`, `_`, `.`, or an \
                 existing path",
                local.display()
            ),
        )),
        SourceKind::Auto => unreachable!("auto resolved above"),
    }
}
