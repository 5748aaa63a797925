//! Owns `[data.NAME]`: `DataConfig`, `DatasetConfig`, `DataFormat`, `DocShape` and role names.
//! Layer: ground — may import error, util and, in this folder, source.rs.
//!
//! `[data.NAME]`: the data sets of a run. `train` (required), `query` and `pretrain` have
//! fixed meanings; any other name declares an extra data set (for example the documents of a
//! second fine-tuning stage, `[[train.stages]] dataset = "NAME"`). Every set is fetched and
//! prepared (`prepare/NAME.parquet`) like the fixed ones.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::source::{default_revision, SourceKind};
use super::split::SplitSpec;
use crate::error::{Error, Result};

/// The chat template preset for ChatML models (SmolLM2-Instruct, Qwen2).
pub const CHATML_TEMPLATE: &str = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n";

/// The role names with a fixed meaning.
pub const FIXED_ROLES: [&str; 3] = ["train", "query", "pretrain"];

/// `[data]`: the data sets of the run, by role name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, DatasetConfig>")]
pub struct DataConfig {
    /// The fine-tuning documents (the ones attributed to).
    pub train: DatasetConfig,
    /// Queries: prompts (and completions) whose generation is explained.
    pub query: Option<DatasetConfig>,
    /// A sample of pretraining documents, to attribute to pretraining as a separate segment.
    pub pretrain: Option<DatasetConfig>,
    /// Further data sets `[data.NAME]` by name (documents of further fine-tuning stages).
    #[serde(flatten)]
    pub extra: BTreeMap<String, DatasetConfig>,
}

impl TryFrom<BTreeMap<String, DatasetConfig>> for DataConfig {
    type Error = String;

    fn try_from(mut m: BTreeMap<String, DatasetConfig>) -> std::result::Result<Self, String> {
        let train = m.remove("train").ok_or_else(|| {
            "missing [data.train]: the fine-tuning documents are required (add [data.train] \
             with an `id`)"
                .to_string()
        })?;
        let (query, pretrain) = (m.remove("query"), m.remove("pretrain"));
        if let Some(bad) = m.keys().find(|k| !is_role_name(k)) {
            return Err(format!(
                "data set name `{bad}` is not allowed; allowed: letters, digits, `_` and `-` \
                 (it names the file prepare/NAME.parquet)"
            ));
        }
        Ok(DataConfig {
            train,
            query,
            pretrain,
            extra: m,
        })
    }
}

/// A data role name: non-empty letters, digits, `_`, `-`.
pub fn is_role_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl DataConfig {
    /// The data sets present, with their role names: `train`, `query`, `pretrain`, then the
    /// extra sets in name order.
    pub fn roles(&self) -> Vec<(&str, &DatasetConfig)> {
        let mut out = vec![("train", &self.train)];
        if let Some(q) = &self.query {
            out.push(("query", q));
        }
        if let Some(p) = &self.pretrain {
            out.push(("pretrain", p));
        }
        out.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v)));
        out
    }

    /// The data sets present, mutably (for resolving paths).
    pub(crate) fn roles_mut(&mut self) -> Vec<(String, &mut DatasetConfig)> {
        let mut out = vec![("train".to_string(), &mut self.train)];
        if let Some(q) = &mut self.query {
            out.push(("query".into(), q));
        }
        if let Some(p) = &mut self.pretrain {
            out.push(("pretrain".into(), p));
        }
        out.extend(self.extra.iter_mut().map(|(k, v)| (k.clone(), v)));
        out
    }

    /// Checks every data set's values; `err(key, message)` makes the error.
    pub(crate) fn check(
        &self,
        token_budget: usize,
        err: &dyn Fn(&str, String) -> Error,
    ) -> Result<()> {
        for (role, ds) in self.roles() {
            let key = |k: &str| format!("data.{role}.{k}");
            if ds.revision.trim().is_empty() {
                return Err(err(
                    &key("revision"),
                    "is empty; allowed: a branch, tag or commit hash".into(),
                ));
            }
            if let Err(e) = ds.split_spec() {
                return Err(err(&key("split"), e));
            }
            if let Some(c) = &ds.config {
                if c.trim().is_empty() || c.starts_with('/') || c.split('/').any(|p| p == "..") {
                    return Err(err(
                        &key("config"),
                        format!(
                            "`{c}` is not a config name; allowed: a name from the dataset card's \
                             `configs:` or a folder of the repo (remove the key for the default)"
                        ),
                    ));
                }
                if ds.files.is_some() {
                    return Err(err(
                        &key("config"),
                        "and `files` both choose the data files; keep one".into(),
                    ));
                }
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
            if ds.max_length > token_budget {
                return Err(err(
                    &key("max_length"),
                    format!(
                        "{} exceeds `batching.token_budget` = {}: one document must fit in a \
                         batch; raise the budget or lower max_length",
                        ds.max_length, token_budget
                    ),
                ));
            }
            if ds.max_documents == Some(0) {
                return Err(err(
                    &key("max_documents"),
                    "is 0; allowed: 1 or more (remove the key to use every document)".into(),
                ));
            }
            if ds.shape == DocShape::Prompt && role != "query" {
                return Err(err(
                    &key("shape"),
                    "`prompt` (completions generated by the model) is for `[data.query]` only; \
                     documents that are trained on need `text` or `prompt_completion`"
                        .into(),
                ));
            }
            let mut columns = vec![("text_column", &ds.text_column)];
            if ds.shape == DocShape::Prompt {
                columns = vec![("prompt_column", &ds.prompt_column)];
            }
            if ds.shape == DocShape::PromptCompletion {
                columns = vec![
                    ("prompt_column", &ds.prompt_column),
                    ("completion_column", &ds.completion_column),
                ];
            }
            if ds.shape == DocShape::Messages {
                columns = vec![("messages_column", &ds.messages_column)];
            }
            for (k, v) in &columns {
                if v.trim().is_empty() {
                    return Err(err(&key(k), "is empty; allowed: a column name".into()));
                }
            }
            if ds.shape == DocShape::Messages {
                if role == "query" {
                    return Err(err(
                        &key("shape"),
                        "`messages` is for documents that are trained on; queries are \
                         `prompt` or `prompt_completion`"
                            .into(),
                    ));
                }
                if ds.chat_template.is_some() {
                    return Err(err(
                        &key("chat_template"),
                        "does not apply to shape `messages`: conversations are rendered with the \
                         model's own chat template (tokenizer_config.json or \
                         chat_template.jinja); remove chat_template"
                            .into(),
                    ));
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
    /// A prompt only (queries): the `query` stage generates the completion with the final
    /// fine-tuned model (`[query]`) and measures it.
    Prompt,
    /// A conversation: a list of `{role, content}` messages rendered with the model's chat
    /// template; the loss counts the assistant turns only.
    Messages,
}

/// `[data.NAME]`: one data set.
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
    /// The dataset's config (subset): a name from the dataset card's `configs:`, or a folder
    /// of the repo. Default: the card's default config, or the whole repo.
    #[serde(default)]
    pub config: Option<String>,
    /// Which split to read, as the `datasets` library finds it (shard names
    /// `data/SPLIT-0000N-of-0000M.*`, folders and file names with the split's keywords, the
    /// card's `data_files`), optionally sliced: `train[:2000]`, `train[10%:]`. Default
    /// `train`.
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
    /// Column with the conversation (shape `messages`): a list of `{role, content}`.
    /// Default `messages`.
    #[serde(default = "default_messages_column")]
    pub messages_column: String,
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
fn default_messages_column() -> String {
    "messages".to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_length() -> usize {
    512
}

impl DatasetConfig {
    /// The split name and its slice (`train[:2000]`); the error shows the accepted forms.
    pub fn split_spec(&self) -> std::result::Result<SplitSpec, String> {
        SplitSpec::parse(&self.split)
    }

    /// The prompt template, if any, with presets expanded (contains `{prompt}`).
    pub fn template(&self) -> Option<&str> {
        match self.chat_template.as_deref() {
            Some("chatml") => Some(CHATML_TEMPLATE),
            other => other,
        }
    }
}
