//! Owns `[[train.stages]]`: `TrainStage` and each stage's settings merged over `[train]`.
//! Layer: ground — may import error, util and, in this folder, data.rs, train.rs.
//!
//! `[[train.stages]]`: a sequence of fine-tuning stages (pretrain → fine-tune A → fine-tune
//! B). Each stage trains on its own data role from the previous stage's final weights, with
//! its own optimizer, schedule, steps and segments; every key it leaves out comes from
//! `[train]`.
//!
//! ```toml
//! [train]                      # shared defaults
//! optimizer = "adamw"
//! lr = 1e-4
//!
//! [[train.stages]]
//! name = "general"             # the trajectory's `stage` of its segments
//! dataset = "train"
//! epochs = 2
//!
//! [[train.stages]]
//! name = "domain"
//! dataset = "domain"           # [data.domain]
//! lr = 2e-5
//! segments = 1
//! ```
//!
//! The entries ([`StageConfig`]) are declared in `train.rs` beside `[train]`, which holds
//! them; this file merges them with `[train]` into [`TrainStage`]s and checks them.
//!
//! Inheritance is per key, except for keys that only make sense together: a stage that sets
//! `epochs` or `max_steps` inherits neither; one that sets `segments` or
//! `segment_boundaries` inherits neither; one that changes `optimizer` inherits none of
//! `momentum`, `beta1`, `beta2`, `eps`. Without `[[train.stages]]`, `[train]` itself is the
//! one stage, named `finetune`.

use super::data::is_role_name;
use super::train::{StageConfig, TrainConfig};

/// A fine-tuning stage with every value resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStage {
    /// Its name (`finetune` for the single-stage form).
    pub name: String,
    /// `[train]` merged with the stage's overrides, resolved (its `dataset` is the stage's).
    pub train: TrainConfig,
    /// Start from the previous stage's optimizer state.
    pub continue_optimizer: bool,
}

impl StageConfig {
    /// `base` (the resolved `[train]`) with this stage's overrides applied, resolved.
    pub fn merged(&self, base: &TrainConfig) -> TrainConfig {
        let mut t = base.clone();
        t.stages = None;
        t.import_from = None;
        if let Some(d) = &self.dataset {
            t.dataset = d.clone();
        }
        if let Some(o) = self.optimizer {
            if o != base.optimizer {
                (t.momentum, t.beta1, t.beta2, t.eps) = (None, None, None, None);
            }
            t.optimizer = o;
        }
        if self.epochs.is_some() || self.max_steps.is_some() {
            t.epochs = self.epochs.unwrap_or(1);
            t.max_steps = self.max_steps;
        }
        if self.segments.is_some() || self.segment_boundaries.is_some() {
            t.segments = self.segments;
            t.segment_boundaries = self.segment_boundaries.clone();
        }
        macro_rules! set {
            ($($k:ident),*) => {$(if let Some(v) = self.$k { t.$k = v; })*};
        }
        macro_rules! set_opt {
            ($($k:ident),*) => {$(if self.$k.is_some() { t.$k = self.$k; })*};
        }
        set!(
            lr,
            weight_decay,
            schedule,
            warmup_steps,
            batch_size,
            checkpoints_per_segment
        );
        set_opt!(momentum, beta1, beta2, eps, max_grad_norm, seed);
        let seed = t.seed.unwrap_or(0);
        t.resolve(seed);
        t
    }
}

impl TrainConfig {
    /// The fine-tuning stages in training order: `[[train.stages]]` merged with `[train]`,
    /// or `[train]` alone as the stage `finetune`.
    pub fn stage_list(&self) -> Vec<TrainStage> {
        match &self.stages {
            None => vec![TrainStage {
                name: "finetune".into(),
                train: self.clone(),
                continue_optimizer: false,
            }],
            Some(list) => list
                .iter()
                .map(|s| TrainStage {
                    name: s.name.clone(),
                    train: s.merged(self),
                    continue_optimizer: s.continue_optimizer,
                })
                .collect(),
        }
    }

    /// Checks `[[train.stages]]` (names, data roles, every merged value); errors are
    /// `(key, message)` like [`TrainConfig::check`].
    pub(crate) fn check_stages(&self, roles: &[&str]) -> std::result::Result<(), (String, String)> {
        let Some(list) = &self.stages else {
            return Ok(());
        };
        if list.is_empty() {
            return Err((
                "train.stages".into(),
                "is an empty list; remove it to fine-tune with [train] alone, or add \
                 [[train.stages]] entries"
                    .into(),
            ));
        }
        if self.import_from.is_some() {
            return Err((
                "train.import_from".into(),
                "cannot be combined with [[train.stages]]; import a single Trainer run, or \
                 remove import_from to train the stages"
                    .into(),
            ));
        }
        let stages = self.stage_list();
        for (i, (s, merged)) in list.iter().zip(&stages).enumerate() {
            let key = |k: &str| format!("train.stages[{i}].{k}");
            if !is_role_name(&s.name) || s.name == "pretrain" {
                return Err((
                    key("name"),
                    format!(
                        "`{}` is not allowed; allowed: letters, digits, `_`, `-`, and not \
                         `pretrain` (the declared pretraining segment's stage)",
                        s.name
                    ),
                ));
            }
            if list[..i].iter().any(|o| o.name == s.name) {
                return Err((
                    key("name"),
                    format!(
                        "`{}` is used by an earlier stage; names must be unique",
                        s.name
                    ),
                ));
            }
            if s.continue_optimizer {
                let prev = i.checked_sub(1).map(|j| stages[j].train.optimizer);
                if prev != Some(merged.train.optimizer) {
                    return Err((
                        key("continue_optimizer"),
                        "needs a previous stage with the same optimizer; set it to false (a \
                         fresh optimizer state) or use the previous stage's optimizer"
                            .into(),
                    ));
                }
            }
            merged.train.check(roles).map_err(|(k, m)| {
                (
                    key(k.strip_prefix("train.").unwrap_or(&k)),
                    format!("(stage `{}`) {m}", s.name),
                )
            })?;
        }
        Ok(())
    }
}
