//! Owns `[train.lora]`, `[model] adapter` and `[attribution] lora_layers`: `LoraTrainConfig`,
//! `LoraTargets`, `AdapterConfig`, `LoraTrack`.
//! Layer: ground — may import error and util; sibling source.rs.
//!
//! LoRA fine-tuning (Hu et al. 2021) as PEFT does it: every targeted linear layer
//! y = W x becomes y = W x + s B A x with W frozen, A: r × d_in, B: d_out × r and
//! s = α / r (α / √r with rsLoRA). A starts Kaiming-uniform (U(−1/√d_in, 1/√d_in), PEFT's
//! default), B at zero, so the fine-tune starts at the base model.
//!
//! ```toml
//! [train.lora]
//! r = 8
//! alpha = 16
//! target_modules = ["q_proj", "v_proj"]   # suffixes of module names, a regex string, or "all-linear"
//!
//! [attribution]
//! lora_layers = "adapter"                 # or "base": the frozen linears the adapters wrap
//! ```
//!
//! A PEFT adapter trained elsewhere (hub repo or local folder) is attributed as the fine-tuned
//! model instead of training one:
//!
//! ```toml
//! [model]
//! id = "ORG/BASE"
//! adapter = { id = "ORG/ADAPTER", revision = "main" }   # or a local folder
//! ```

use serde::{Deserialize, Serialize};

use super::source::{default_revision, SourceKind};

/// Which modules get an adapter, as PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraTargets {
    /// Module names or name suffixes: a module `m` is targeted when `m == t` or `m` ends
    /// with `.t`.
    Names(Vec<String>),
    /// `"all-linear"` (every linear layer of the blocks), or a regular expression the whole
    /// module name must match (Python's `re.fullmatch`).
    Pattern(String),
}

/// `[train.lora]`: fine-tune a LoRA adapter instead of every weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrainConfig {
    /// Rank r of the adapters (≥ 1).
    pub r: usize,
    /// α: the adapter output is scaled by s = α / r. Default 8 (PEFT's).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// The modules that get an adapter (PEFT's `target_modules`).
    pub target_modules: LoraTargets,
    /// Scale by α / √r instead of α / r (rsLoRA). Default false.
    #[serde(default)]
    pub use_rslora: bool,
    /// Seed of A's initialisation. Default: the run's seed.
    #[serde(default)]
    pub seed: Option<u64>,
}

fn default_alpha() -> f64 {
    8.0
}

/// `[model] adapter`: a PEFT LoRA adapter (`adapter_config.json`,
/// `adapter_model.safetensors`) over `[model]`, fetched like the model and attributed as the
/// fine-tuned model (the `finetune` stage records it instead of training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Hub repo id (`ORG/NAME`) or local folder holding the adapter's two files.
    pub id: String,
    /// Branch, tag or commit of the hub repo. Default `main`. Ignored for local folders.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// `auto`, `hub` or `local`. Default `auto`.
    #[serde(default)]
    pub source: SourceKind,
    /// Accept an adapter whose `base_model_name_or_path` names another hub repo than
    /// `[model] id` (a mirror or a copy of the same weights). Default false: `fetch` refuses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_other_base: bool,
}

/// `[attribution] lora_layers`: on a LoRA model, which layers are attributed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraTrack {
    /// The adapter matrices A and B of every adapted layer (what the fine-tune trained).
    #[default]
    Adapter,
    /// The frozen linear layers the adapters wrap, as the merged weight W + s B A.
    Base,
}

impl LoraTrack {
    /// Whether this is the default (kept out of serialised configs so that their hashes stay).
    pub fn is_default(&self) -> bool {
        *self == LoraTrack::Adapter
    }
}

impl LoraTrainConfig {
    /// Checks r ≥ 1 and a finite α; the error names the key.
    pub(crate) fn check(&self) -> std::result::Result<(), (String, String)> {
        if self.r == 0 {
            return Err(("lora.r".into(), "must be at least 1".into()));
        }
        if !self.alpha.is_finite() {
            return Err(("lora.alpha".into(), "must be a finite number".into()));
        }
        if let LoraTargets::Names(n) = &self.target_modules {
            if n.is_empty() {
                return Err((
                    "lora.target_modules".into(),
                    "is empty; name the modules, e.g. [\"q_proj\", \"v_proj\"]".into(),
                ));
            }
        }
        Ok(())
    }
}
