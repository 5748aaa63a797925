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
mod diff;
mod load;
mod pipeline;
mod train;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use attribution::{AttributionConfig, FisherKind, MethodKind};
pub use diff::{diff_values, KeyChange};
pub use load::{parse_toml, read_toml};
pub use pipeline::Pipeline;
pub use train::{MassSpec, OptimizerKind, PretrainConfig, ScheduleKind, TrainConfig};

use crate::error::{Error, Result};

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

/// Where a model or dataset comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A local path if `id` names an existing file or folder (or starts with `/`, `./`,
    /// `../`), otherwise the hub. Resolved on load.
    #[default]
    Auto,
    /// The Hugging Face hub (online, or its cache when offline).
    Hub,
    /// A local file or folder.
    Local,
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
}

fn default_revision() -> String {
    "main".to_string()
}

/// `[data]`: the data sets of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The fine-tuning documents (the ones attributed to).
    pub train: DatasetConfig,
    /// Queries: prompts (and completions) whose generation is explained.
    #[serde(default)]
    pub query: Option<DatasetConfig>,
    /// A sample of pretraining documents, to attribute to pretraining as a separate segment.
    #[serde(default)]
    pub pretrain: Option<DatasetConfig>,
}

impl DataConfig {
    /// The data sets present, with their role names (`train`, `query`, `pretrain`).
    pub fn roles(&self) -> Vec<(&'static str, &DatasetConfig)> {
        let mut out = vec![("train", &self.train)];
        if let Some(q) = &self.query {
            out.push(("query", q));
        }
        if let Some(p) = &self.pretrain {
            out.push(("pretrain", p));
        }
        out
    }
}

/// File format of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// From the file extension: `.jsonl`/`.json`/`.ndjson`, `.csv`, `.parquet`.
    #[default]
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// What a document is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DocShape {
    /// One text column; the loss counts every token.
    #[default]
    Text,
    /// A prompt and a completion; the loss counts completion tokens only.
    PromptCompletion,
}

/// `[data.train]`, `[data.query]`, `[data.pretrain]`: one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Hub dataset id (`ORG/NAME`), or a local file or folder.
    pub id: String,
    /// Branch, tag or commit of the hub repo (`refs/convert/parquet` for the hub's Parquet
    /// conversion). Default `main`.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// `auto`, `hub` or `local`. Default `auto`.
    #[serde(default)]
    pub source: SourceKind,
    /// Which split to read: files whose path has a folder named SPLIT, or whose name starts
    /// with SPLIT followed by `-`, `_` or `.`. Default `train`.
    #[serde(default = "default_split")]
    pub split: String,
    /// Explicit files (relative to the repo or folder); overrides `split`.
    #[serde(default)]
    pub files: Option<Vec<String>>,
    /// `auto`, `jsonl`, `csv` or `parquet`. Default `auto` (from the extension).
    #[serde(default)]
    pub format: DataFormat,
    /// `text` or `prompt_completion`. Default `text`.
    #[serde(default)]
    pub shape: DocShape,
    /// Column with the document text (shape `text`). Default `text`.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Column with the prompt (shape `prompt_completion`). Default `prompt`.
    #[serde(default = "default_prompt_column")]
    pub prompt_column: String,
    /// Column with the completion (shape `prompt_completion`). Default `completion`.
    #[serde(default = "default_completion_column")]
    pub completion_column: String,
    /// Column with a document id; default: none, ids are `SPLIT-ROW`.
    #[serde(default)]
    pub id_column: Option<String>,
    /// Wraps the prompt before tokenisation: `chatml`, or a string containing `{prompt}`.
    /// Default: none (the prompt as it is).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Let the tokenizer add its special tokens (e.g. BOS). Default true.
    #[serde(default = "default_true")]
    pub add_special_tokens: bool,
    /// Longest document in tokens; longer ones are truncated (and counted). Default 512.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Use only the first N documents. Default: all.
    #[serde(default)]
    pub max_documents: Option<usize>,
}

fn default_split() -> String {
    "train".to_string()
}
fn default_text_column() -> String {
    "text".to_string()
}
fn default_prompt_column() -> String {
    "prompt".to_string()
}
fn default_completion_column() -> String {
    "completion".to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_length() -> usize {
    512
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

/// The chat template preset for ChatML models (SmolLM2-Instruct, Qwen2).
pub const CHATML_TEMPLATE: &str = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n";

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
        for (role, ds) in [
            ("data.train", Some(&mut self.data.train)),
            ("data.query", self.data.query.as_mut()),
            ("data.pretrain", self.data.pretrain.as_mut()),
        ] {
            if let Some(ds) = ds {
                let (source, id) = resolve_source(ds.source, &ds.id, base, file, role)?;
                ds.source = source;
                ds.id = id;
            }
        }
        self.train.resolve(self.run.seed);
        if let Some(p) = &self.train.import_from {
            self.train.import_from = Some(absolute_against(base, p));
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
        if let Some(p) = &self.pretrain {
            p.check(&roles).map_err(|(k, m)| err(&k, m))?;
        }
        for (role, ds) in self.data.roles() {
            let key = |k: &str| format!("data.{role}.{k}");
            if ds.revision.trim().is_empty() {
                return Err(err(
                    &key("revision"),
                    "is empty; allowed: a branch, tag or commit hash".into(),
                ));
            }
            if ds.split.trim().is_empty() {
                return Err(err(
                    &key("split"),
                    "is empty; allowed: a split name such as `train`".into(),
                ));
            }
            if let Some(files) = &ds.files {
                if files.is_empty() {
                    return Err(err(
                        &key("files"),
                        "is an empty list; remove it to select files by `split`".into(),
                    ));
                }
            }
            if !(2..=1_048_576).contains(&ds.max_length) {
                return Err(err(
                    &key("max_length"),
                    format!(
                        "{} is out of range; allowed: 2 ..= 1048576 tokens",
                        ds.max_length
                    ),
                ));
            }
            if ds.max_length > self.batching.token_budget {
                return Err(err(
                    &key("max_length"),
                    format!(
                        "{} exceeds `batching.token_budget` = {}: one document must fit in a \
                         batch; raise the budget or lower max_length",
                        ds.max_length, self.batching.token_budget
                    ),
                ));
            }
            if ds.max_documents == Some(0) {
                return Err(err(
                    &key("max_documents"),
                    "is 0; allowed: 1 or more (remove the key to use every document)".into(),
                ));
            }
            let mut columns = vec![("text_column", &ds.text_column)];
            if ds.shape == DocShape::PromptCompletion {
                columns = vec![
                    ("prompt_column", &ds.prompt_column),
                    ("completion_column", &ds.completion_column),
                ];
            }
            for (k, v) in &columns {
                if v.trim().is_empty() {
                    return Err(err(&key(k), "is empty; allowed: a column name".into()));
                }
            }
            if ds.shape == DocShape::PromptCompletion && ds.prompt_column == ds.completion_column {
                return Err(err(
                    &key("completion_column"),
                    format!(
                        "is the same column as prompt_column (`{}`); they must differ",
                        ds.prompt_column
                    ),
                ));
            }
            if let Some(t) = &ds.chat_template {
                if t != "chatml" && !t.contains("{prompt}") {
                    return Err(err(
                        &key("chat_template"),
                        format!(
                            "`{t}` is neither a preset nor a template; allowed: `chatml`, or a \
                             string containing `{{prompt}}`"
                        ),
                    ));
                }
                if ds.shape == DocShape::Text {
                    return Err(err(
                        &key("chat_template"),
                        "applies to prompts, but `shape` is `text`; set shape = \
                         \"prompt_completion\" or remove chat_template"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
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

impl DatasetConfig {
    /// The prompt template, if any, with presets expanded (contains `{prompt}`).
    pub fn template(&self) -> Option<&str> {
        match self.chat_template.as_deref() {
            Some("chatml") => Some(CHATML_TEMPLATE),
            other => other,
        }
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
