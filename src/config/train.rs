//! Owns `[train]` and `[pretrain]`: `TrainConfig`, `StageConfig`, `PretrainConfig` and their kinds.
//! Layer: ground — may import error and util; no sibling.
//!
//! `[train]` and `[pretrain]`: how the `finetune` stage trains (optimizer, learning-rate
//! schedule, batches, segments and checkpoints) and how the pretrained model enters the
//! trajectory as a `pretrain` segment (docs/design.md §2).
//!
//! ```toml
//! [train]
//! optimizer = "adamw"          # sgd | momentum | adamw
//! lr = 1e-3
//! schedule = "cosine"          # constant | linear | cosine
//! warmup_steps = 10
//! batch_size = 16              # documents per optimizer step
//! epochs = 2
//! segments = 3                 # L
//! checkpoints_per_segment = 2  # C
//!
//! [pretrain]
//! lr_mass = "converged"        # or a number: s of the pretraining segment
//! ```

use serde::{Deserialize, Serialize};

/// How the optimizer's objective was normalised; H and the gradients scale with it, and so
/// does s σ (docs/design.md §2). `trajectory.json` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// J = (1/N) Σ_m L(z_m): each document's loss summed over its tokens, averaged over the
    /// documents of a batch (docs/design.md §2's convention).
    SumPerDocument,
    /// The loss averaged over all loss tokens of a batch (Hugging Face Trainer's default).
    MeanPerToken,
}

/// The optimizer the `finetune` stage steps with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// θ ← θ − η g (with decoupled weight decay θ ← (1 − ηλ) θ first).
    Sgd,
    /// Heavy-ball momentum (PyTorch form): b ← β b + g, θ ← θ − η b.
    Momentum,
    /// AdamW with bias correction (PyTorch semantics).
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
}

impl OptimizerKind {
    /// Floats of state per parameter the optimizer keeps while training and its checkpoints
    /// save: AdamW 2 (m, v), SGD with momentum 1, SGD 0.
    pub fn state_floats(self) -> u64 {
        match self {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Momentum => 1,
            OptimizerKind::AdamW => 2,
        }
    }
}

/// The learning-rate schedule after warm-up (Hugging Face Trainer's `lr_lambda`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// η_k = η.
    Constant,
    /// η_k = η (T − k) / (T − W) after W warm-up steps.
    #[default]
    Linear,
    /// η_k = η · ½ (1 + cos(π (k − W) / (T − W))) after W warm-up steps.
    Cosine,
}

/// `[train]`: full fine-tuning by the `finetune` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The data role trained on: `train` (default) or `pretrain`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// `sgd`, `momentum` or `adamw`. Default `adamw`.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate η. Default 5e-5.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// β of heavy-ball momentum (`optimizer = "momentum"` only). Default 0.9.
    #[serde(default)]
    pub momentum: Option<f64>,
    /// Adam's β₁ (`adamw` only). Default 0.9.
    #[serde(default)]
    pub beta1: Option<f64>,
    /// Adam's β₂ (`adamw` only). Default 0.999.
    #[serde(default)]
    pub beta2: Option<f64>,
    /// Adam's ε (`adamw` only). Default 1e-8.
    #[serde(default)]
    pub eps: Option<f64>,
    /// Decoupled weight decay λ: θ ← (1 − ηλ) θ each step. Default 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// `constant`, `linear` or `cosine` (decay to 0 at the last step). Default `linear`.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// W: steps of linear warm-up from 0 to η. Default 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Documents per optimizer step. A step's documents are split into micro-batches under
    /// `[batching]`'s token budget and their gradients accumulated. Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Passes over the data set (each reshuffled). Default 1. Ignored with `max_steps`.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Total optimizer steps T, overriding `epochs` (epochs repeat as needed).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Clip the gradient to this global L2 norm (‖g‖ = sqrt Σ_p ‖g_p‖²). Default: no clipping.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the shuffle. Default: `run.seed`.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `sum_per_document`: J = (1/n) Σ_m L(z_m) over a step's n documents (docs/design.md §2);
    /// `mean_per_token`: the loss averaged over the step's loss tokens (HF Trainer).
    #[serde(default = "default_normalization")]
    pub loss_normalization: LossNormalization,
    /// L: segments the fine-tuning steps are cut into, evenly. Default 3 (or one more than
    /// the number of `segment_boundaries`).
    #[serde(default)]
    pub segments: Option<usize>,
    /// C: checkpoints per segment, evenly spaced, the last at the segment's end. Default 2.
    #[serde(default = "default_checkpoints")]
    pub checkpoints_per_segment: usize,
    /// Explicit interior segment boundaries in steps (strictly increasing, inside (0, T)).
    #[serde(default)]
    pub segment_boundaries: Option<Vec<u64>>,
    /// A Hugging Face Trainer output folder (with `checkpoint-N/`) to import instead of
    /// training; see docs/import-trainer.md. The keys above then declare what the Trainer
    /// used (lr, schedule, warmup_steps, optimizer, …).
    #[serde(default)]
    pub import_from: Option<std::path::PathBuf>,
    /// `[train.lora]`: train a LoRA adapter (every other weight frozen) instead of the whole
    /// model; see [`super::lora`]. Default: full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::lora::LoraTrainConfig>,
    /// `[[train.stages]]`: a sequence of fine-tuning stages, each with its own data role and
    /// any of the keys above overridden; see [`StageConfig`]. Default: `[train]` alone is the
    /// one stage, `finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageConfig>>,
}

/// One `[[train.stages]]` entry: a fine-tuning stage and the `[train]` keys it overrides
/// (how they merge with `[train]`: [`StageConfig::merged`], in `config/stages.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage name (unique; not `pretrain`): the `stage` of its trajectory segments.
    pub name: String,
    /// The data role it trains on (`train`, `pretrain`, or an extra `[data.NAME]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Start from the previous stage's optimizer state (moments and step count) instead of
    /// a fresh one. Needs the same optimizer as the previous stage. Default false.
    #[serde(default)]
    pub continue_optimizer: bool,
    /// Overrides `train.optimizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerKind>,
    /// Overrides `train.lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Overrides `train.momentum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// Overrides `train.beta1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// Overrides `train.beta2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// Overrides `train.eps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Overrides `train.weight_decay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Overrides `train.schedule` (the schedule runs over this stage's steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleKind>,
    /// Overrides `train.warmup_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Overrides `train.batch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Overrides `train.epochs` (and drops an inherited `max_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Overrides `train.max_steps` (and drops an inherited `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Overrides `train.max_grad_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Overrides `train.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Overrides `train.segments` (and drops inherited `segment_boundaries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// Overrides `train.checkpoints_per_segment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_per_segment: Option<usize>,
    /// Overrides `train.segment_boundaries`: interior ends in this stage's own steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_boundaries: Option<Vec<u64>>,
}

/// The most optimizer steps T a fine-tuning stage may have: the trajectory holds every step's
/// η (`trajectory.json`) and every visit, and the schedule is materialised per step, so a
/// larger T (e.g. `max_steps = 4294967295`) would fail allocating after the run had started.
/// 1,000,000 steps is far beyond a fine-tune (the demo takes 57) and keeps those in the tens
/// of MB. Checked at load for `max_steps` and `segment_boundaries`, and where the schedule is
/// built (`train::finetune::plan`) for T = epochs × ⌈N / batch_size⌉.
pub const MAX_TOTAL_STEPS: u64 = 1_000_000;

/// The ends of `segments` even segments of T steps (the l-th at ⌊l T / L⌋), as
/// `train::plan::plan_segments` cuts them.
fn even_ends(total: u64, segments: usize) -> impl Iterator<Item = u64> {
    (1..=segments as u64).map(move |l| ((l as u128 * total as u128) / segments as u128) as u64)
}

fn default_dataset() -> String {
    "train".into()
}
fn default_lr() -> f64 {
    5e-5
}
fn default_batch_size() -> usize {
    8
}
fn default_epochs() -> u32 {
    1
}
fn default_normalization() -> LossNormalization {
    LossNormalization::SumPerDocument
}
fn default_checkpoints() -> usize {
    2
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: default_dataset(),
            optimizer: OptimizerKind::default(),
            lr: default_lr(),
            momentum: None,
            beta1: None,
            beta2: None,
            eps: None,
            weight_decay: 0.0,
            schedule: ScheduleKind::default(),
            warmup_steps: 0,
            batch_size: default_batch_size(),
            epochs: default_epochs(),
            max_steps: None,
            max_grad_norm: None,
            seed: None,
            loss_normalization: default_normalization(),
            segments: None,
            checkpoints_per_segment: default_checkpoints(),
            segment_boundaries: None,
            import_from: None,
            lora: None,
            stages: None,
        }
    }
}

/// The declared learning-rate mass of the pretraining segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MassSpec {
    /// s: a non-negative number.
    Value(f64),
    /// `"converged"`: s → ∞; `"from_model"`: the mass recorded in the fetched model's
    /// `training/trajectory.json` (s = Σ η of its pretraining, with its optimizer).
    Word(String),
}

/// `[pretrain] lr_mass = "from_model"`: take s (and the optimizer) from the pretraining
/// trajectory the model ships in `training/trajectory.json`.
pub const FROM_MODEL: &str = "from_model";

/// `[pretrain]`: the pretrained model as the first segment of the trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// s of the pretraining segment: a number, `"converged"` (s → ∞), or `"from_model"`
    /// (the recorded trajectory shipped with the model). Default `"converged"`.
    #[serde(default = "default_mass")]
    pub lr_mass: MassSpec,
    /// The data role holding a sample of pretraining documents, so that they can be
    /// attributed to. Default `pretrain` when `[data.pretrain]` exists. Without one the
    /// segment has nothing to attribute to and is left out of the trajectory.
    #[serde(default)]
    pub dataset: Option<String>,
}

fn default_mass() -> MassSpec {
    MassSpec::Word("converged".into())
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            lr_mass: default_mass(),
            dataset: None,
        }
    }
}

impl TrainConfig {
    /// Fills in the defaults that depend on other keys (optimizer hyper-parameters, the
    /// seed, the number of segments), so the resolved config states every value used.
    pub(crate) fn resolve(&mut self, run_seed: u64) {
        if let Some(l) = &mut self.lora {
            l.seed.get_or_insert(run_seed);
        }
        match self.optimizer {
            OptimizerKind::Momentum => {
                self.momentum.get_or_insert(0.9);
            }
            OptimizerKind::AdamW => {
                self.beta1.get_or_insert(0.9);
                self.beta2.get_or_insert(0.999);
                self.eps.get_or_insert(1e-8);
            }
            OptimizerKind::Sgd => {}
        }
        self.seed.get_or_insert(run_seed);
        if self.segments.is_none() {
            self.segments = Some(self.segment_boundaries.as_ref().map_or(3, |b| b.len() + 1));
        }
    }

    /// Checks every value; `roles` are the data roles present. Errors are
    /// `(key under train., message saying what is allowed)`.
    pub(crate) fn check(&self, roles: &[&str]) -> std::result::Result<(), (String, String)> {
        let e = |k: &str, m: String| Err((format!("train.{k}"), m));
        if !roles.contains(&self.dataset.as_str()) || self.dataset == "query" {
            return e(
                "dataset",
                format!(
                    "`{}` is not a data set of this config; allowed: {} (a [data.NAME] other \
                     than query)",
                    self.dataset,
                    roles
                        .iter()
                        .filter(|r| **r != "query")
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return e(
                "lr",
                format!("{} is invalid; allowed: a number > 0", self.lr),
            );
        }
        let in_unit = |x: f64| (0.0..1.0).contains(&x);
        let wrong_opt = |k: &str, for_: &str| {
            e(
                k,
                format!(
                    "applies to `optimizer = \"{for_}\"`, but the optimizer is `{}`; remove it",
                    serde_json::to_value(self.optimizer)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            )
        };
        if self.optimizer != OptimizerKind::Momentum && self.momentum.is_some() {
            return wrong_opt("momentum", "momentum");
        }
        if self.optimizer != OptimizerKind::AdamW {
            for (k, v) in [
                ("beta1", self.beta1),
                ("beta2", self.beta2),
                ("eps", self.eps),
            ] {
                if v.is_some() {
                    return wrong_opt(k, "adamw");
                }
            }
        }
        for (k, v) in [
            ("momentum", self.momentum),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
        ] {
            if let Some(v) = v {
                if !in_unit(v) {
                    return e(k, format!("{v} is out of range; allowed: 0 ≤ β < 1"));
                }
            }
        }
        if let Some(eps) = self.eps {
            if !(eps.is_finite() && eps > 0.0) {
                return e("eps", format!("{eps} is invalid; allowed: a number > 0"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return e(
                "weight_decay",
                format!("{} is invalid; allowed: a number ≥ 0", self.weight_decay),
            );
        }
        if self.batch_size == 0 {
            return e("batch_size", "is 0; allowed: 1 or more documents".into());
        }
        if self.epochs == 0 {
            return e("epochs", "is 0; allowed: 1 or more".into());
        }
        if self.max_steps == Some(0) {
            return e(
                "max_steps",
                "is 0; allowed: 1 or more (remove it to train for `epochs`)".into(),
            );
        }
        if let Some(t) = self.max_steps {
            if t > MAX_TOTAL_STEPS {
                return e(
                    "max_steps",
                    format!(
                        "{t} is more steps than a trajectory holds; allowed: 1 ..= \
                         {MAX_TOTAL_STEPS} (docs/design.md §2)"
                    ),
                );
            }
        }
        if self.warmup_steps > MAX_TOTAL_STEPS {
            return e(
                "warmup_steps",
                format!(
                    "{} is more steps than a trajectory holds; allowed: 0 ..= the total \
                     steps T ≤ {MAX_TOTAL_STEPS}",
                    self.warmup_steps
                ),
            );
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return e(
                    "max_grad_norm",
                    format!("{m} is invalid; allowed: a number > 0 (remove it to not clip)"),
                );
            }
        }
        if self.segments == Some(0) {
            return e("segments", "is 0; allowed: 1 or more".into());
        }
        if self.checkpoints_per_segment == 0 {
            return e("checkpoints_per_segment", "is 0; allowed: 1 or more".into());
        }
        if let Some(b) = &self.segment_boundaries {
            if b.first() == Some(&0) || b.windows(2).any(|w| w[0] >= w[1]) {
                return e(
                    "segment_boundaries",
                    format!(
                        "{b:?} is not strictly increasing above 0; allowed: steps \
                         0 < b₁ < b₂ < … < T"
                    ),
                );
            }
            if let Some(&last) = b.last() {
                if last >= MAX_TOTAL_STEPS {
                    return e(
                        "segment_boundaries",
                        format!(
                            "ends at step {last}, beyond the {MAX_TOTAL_STEPS} steps a \
                             trajectory holds; allowed: steps 0 < b₁ < … < T ≤ {MAX_TOTAL_STEPS}"
                        ),
                    );
                }
            }
            if let Some(l) = self.segments {
                if l != b.len() + 1 {
                    return e(
                        "segments",
                        format!(
                            "{l} disagrees with the {} segment_boundaries (which make {} \
                             segments); remove `segments` or make them agree",
                            b.len(),
                            b.len() + 1
                        ),
                    );
                }
            }
        }
        if let Some(t) = self.max_steps {
            self.check_steps(t, "`max_steps`")
                .map_err(|(k, m)| (format!("train.{k}"), m))?;
        }
        if let Some(l) = &self.lora {
            l.check().map_err(|(k, m)| (format!("train.{k}"), m))?;
        }
        Ok(())
    }

    /// T ≤ [`MAX_TOTAL_STEPS`], the bound a trajectory holds; `source` says where T came from.
    /// Errors are `(key without the `train.` prefix, message)`.
    pub fn check_total(
        &self,
        total: u64,
        source: &str,
    ) -> std::result::Result<(), (String, String)> {
        if total <= MAX_TOTAL_STEPS {
            return Ok(());
        }
        let key = if self.max_steps.is_some() {
            "max_steps"
        } else {
            "epochs"
        };
        Err((
            key.to_string(),
            format!(
                "training would take T = {total} steps ({source}), more than the \
                 {MAX_TOTAL_STEPS} a trajectory holds; lower `epochs` or set `max_steps` \
                 (docs/design.md §2)"
            ),
        ))
    }

    /// The checks that need T, the total number of steps: warm-up, segments and checkpoints
    /// fit inside it. `source` says where T came from (for messages). Errors are `(key
    /// without the `train.` prefix, message)`. Called at load when `max_steps` gives T, and
    /// where the schedule is built (`train::finetune::plan`) when T = epochs × ⌈N / batch⌉.
    pub fn check_steps(
        &self,
        total: u64,
        source: &str,
    ) -> std::result::Result<(), (String, String)> {
        let e = |k: &str, m: String| Err((k.to_string(), m));
        self.check_total(total, source)?;
        if self.warmup_steps > total {
            return e(
                "warmup_steps",
                format!(
                    "{} is more than the T = {total} steps of training ({source}), so η would \
                     never reach `lr`; allowed: 0 ..= {total} (lower warmup_steps or train \
                     longer)",
                    self.warmup_steps
                ),
            );
        }
        let ends: Vec<u64> = match &self.segment_boundaries {
            Some(b) => {
                if let Some(&last) = b.last() {
                    if last >= total {
                        return e(
                            "segment_boundaries",
                            format!(
                                "ends at step {last}, but training has only T = {total} steps \
                                 ({source}); allowed: steps inside (0, {total})"
                            ),
                        );
                    }
                }
                b.iter().copied().chain(std::iter::once(total)).collect()
            }
            None => {
                let l = self.segments.unwrap_or(3);
                if l as u64 > total {
                    return e(
                        "segments",
                        format!(
                            "{l} is more than the T = {total} steps of training ({source}); \
                             allowed: 1 ..= {total} (lower segments or train longer)"
                        ),
                    );
                }
                even_ends(total, l).collect()
            }
        };
        let c = self.checkpoints_per_segment as u64;
        let mut start = 0;
        for (i, end) in ends.into_iter().enumerate() {
            let k = end - start;
            if c > k {
                return e(
                    "checkpoints_per_segment",
                    format!(
                        "{c} is more than the K = {k} steps of segment {i} (T = {total} steps \
                         {source}, cut into segments); allowed: 1 ..= {k} (lower \
                         checkpoints_per_segment, use fewer segments, or train longer)"
                    ),
                );
            }
            start = end;
        }
        Ok(())
    }
}

impl PretrainConfig {
    /// Checks the values; `roles` are the data roles present.
    pub(crate) fn check(&self, roles: &[&str]) -> std::result::Result<(), (String, String)> {
        match &self.lr_mass {
            MassSpec::Value(v) if !(v.is_finite() && *v >= 0.0) => {
                return Err((
                    "pretrain.lr_mass".into(),
                    format!(
                        "{v} is invalid; allowed: a number ≥ 0, \"converged\" or \"from_model\""
                    ),
                ))
            }
            MassSpec::Word(w) if w != "converged" && w != FROM_MODEL => {
                return Err((
                    "pretrain.lr_mass".into(),
                    format!(
                        "`{w}` is not allowed; allowed: a number ≥ 0, \"converged\" or \
                         \"from_model\" (the model's recorded training/trajectory.json)"
                    ),
                ))
            }
            _ => {}
        }
        if let Some(d) = &self.dataset {
            if !roles.contains(&d.as_str()) || d == "query" {
                return Err((
                    "pretrain.dataset".into(),
                    format!(
                        "`{d}` is not a data set of this config; allowed: `pretrain` (add \
                         [data.pretrain]) or `train`"
                    ),
                ));
            }
        }
        Ok(())
    }
}
