//! Owns `plan_run`: the memory and disk plan of a config's heavy stages, from config.json alone.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `fetch`, `finetune`.
//!
//! `source-tda plan` answers, before anything is downloaded or trained, whether a config fits
//! the machine: the model is built from its `config.json` with zero weights that occupy no
//! memory ([`Model::shape_only`]), so the parameter and layer shapes are the ones the stages
//! will see, and each heavy stage's peak is the prediction that stage prints itself
//! ([`crate::model::memory`]): `finetune` (weights, gradients, optimizer state, one
//! micro-batch's forward + backward), `fit` (covariances, eigendecompositions, Λ), `query`
//! (one pass and the queries' gradients) and `score` (its layer groups under the memory
//! limit, [`plan_score_memory`]). Disk: the checkpoints `finetune` keeps (model and optimizer
//! state per checkpoint, ĝ after clipped one-step groups) and the factor files of every
//! segment (what `save_factors` writes, [`predicted_layer_bytes`]).
//!
//! With a memory limit (`attribution.memory_limit_gib` or `--memory-limit-gib`) a stage whose
//! peak exceeds it is refused with what to change.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::attribution::plan::{plan_score_memory, FactorGroups, ScoreNeeds};
use crate::config::{Config, MethodKind};
use crate::curvature::store::predicted_layer_bytes;
use crate::error::{Error, Result};
use crate::model::memory::{
    capture_peak_bytes, fit_peak_bytes, param_count, tracked_weight_floats,
};
use crate::model::{Labels, Model, ModelSpec};
use crate::pipeline::RunDir;
use crate::util::mem::human_bytes;

/// What the plan is computed for besides the config.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    /// Fine-tuning documents of each `[[train.stages]]` entry (or of `[train]`), in order.
    pub documents: Vec<usize>,
    /// Queries.
    pub queries: usize,
    /// The memory limit in GiB (`--memory-limit-gib`, else `attribution.memory_limit_gib`).
    pub memory_limit_gib: Option<f64>,
}

/// One heavy stage's predicted peak memory and the disk it leaves behind.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// The stage (`finetune`, `fit`, `query`, `score`).
    pub stage: &'static str,
    /// Predicted peak memory, bytes.
    pub peak_bytes: u64,
    /// Bytes the stage writes (0 where small).
    pub disk_bytes: u64,
    /// What the numbers are made of, one line.
    pub detail: String,
    /// What lowers the peak, for the refusal.
    pub advice: &'static str,
}

/// The plan of a config: the model's size and each heavy stage's memory and disk.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Family, parameters and tracked layers, one line.
    pub model: String,
    /// Trainable parameters P.
    pub params: u64,
    /// The heavy stages in pipeline order.
    pub stages: Vec<StagePlan>,
    /// The memory limit the plan was checked against, bytes.
    pub limit_bytes: Option<u64>,
}

/// What a run directory where `fetch` and `prepare` ran tells the plan: the fetched model's
/// config.json, the prepared documents of every fine-tuning stage's data role, and the
/// number of prepared queries (0 without a query role).
pub fn inputs_from_run(config: &Config, run: &RunDir) -> Result<(PathBuf, Vec<usize>, usize)> {
    let fetched = super::fetch::Fetched::load(run).map_err(|e| {
        Error::Pipeline(format!(
            "{e}; run `source-tda fetch` into {} first, or pass --model-config",
            run.path().display()
        ))
    })?;
    let model_config = super::finetune::base_model_dir(&fetched)?.join("config.json");
    let mut documents = Vec::new();
    for stage in config.train.stage_list() {
        documents.push(super::attribute::role_docs(run, &stage.train.dataset)?.len());
    }
    let queries = match config.data.query {
        Some(_) => super::attribute::role_docs(run, "query")?.len(),
        None => 0,
    };
    Ok((model_config, documents, queries))
}

/// The plan of `config` for the model described by `model_config` (a config.json).
pub fn plan_run(config: &Config, model_config: &Path, inputs: &PlanInputs) -> Result<RunPlan> {
    let spec = ModelSpec::from_file(model_config)?;
    let tracked = Model::shape_only(&spec, &super::attribute::load_options(config))?;
    let p = param_count(&tracked);
    let tokens = config.batching.token_budget;
    let block = config.attribution.block_size;
    let layers = tracked.tracked_layers();
    let mut stages = Vec::new();

    // finetune: every stage's checkpoints; the peak of the stage with the most state.
    let train_stages = config.train.stage_list();
    if inputs.documents.len() != train_stages.len() {
        return Err(Error::Pipeline(format!(
            "the plan needs one document count per fine-tuning stage ({} stages: {}), got {}",
            train_stages.len(),
            (train_stages.iter().map(|s| s.name.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            inputs.documents.len()
        )));
    }
    let (mut n_segments, mut checkpoints, mut clip_dirs, mut floats) = (0usize, 0u64, 0u64, 0u64);
    let mut ckpt_bytes = 0u64;
    if config.train.import_from.is_none() && config.model.adapter.is_none() {
        for (stage, &n) in train_stages.iter().zip(&inputs.documents) {
            let t = &stage.train;
            let (_, segs) = crate::train::finetune::plan(t, n)?;
            n_segments += segs.len();
            let f = t.optimizer.state_floats();
            floats = floats.max(f);
            for s in &segs {
                let c = s.checkpoints.len() as u64;
                checkpoints += c;
                // ĝ after a clipped step scored alone: at most one per checkpoint whose step
                // follows the previous checkpoint directly.
                let one_step = (s
                    .checkpoints
                    .windows(2)
                    .filter(|w| w[1] == w[0] + 1)
                    .count()
                    + usize::from(s.checkpoints.first() == Some(&(s.start + 1))))
                    as u64;
                let clip = if t.max_grad_norm.is_some() {
                    one_step
                } else {
                    0
                };
                clip_dirs += clip;
                ckpt_bytes += 4 * p * ((1 + f) * c + clip);
            }
        }
        stages.push(StagePlan {
            stage: "finetune",
            peak_bytes: super::finetune::finetune_peak(config, &spec)?,
            disk_bytes: ckpt_bytes,
            detail: format!(
                "{checkpoints} checkpoint(s) of {} (model{}){}",
                human_bytes(4 * p * (1 + floats)),
                if floats > 0 { " + optimizer state" } else { "" },
                match clip_dirs {
                    0 => String::new(),
                    n => format!(", ĝ after up to {n} clipped one-step groups"),
                }
            ),
            advice: "lower batching.token_budget (micro-batches accumulate to the same step), \
                     or fine-tune with an optimizer that keeps less state",
        });
    } else {
        n_segments = 1;
    }
    n_segments = match config.attribution.method {
        MethodKind::Source => n_segments + usize::from(config.pretrain.is_some()),
        MethodKind::Influence | MethodKind::GradientDot => 1,
    };

    // fit: the passes' peak; one factor file per segment.
    let factor_layer: Vec<u64> = (layers.iter())
        .map(|l| predicted_layer_bytes(l.d_in + l.has_bias as usize, l.d_out, block))
        .collect();
    let factors: u64 = factor_layer.iter().sum();
    let labels = super::attribute::fit_options(config).fisher.labels();
    if config.attribution.method != MethodKind::GradientDot {
        stages.push(StagePlan {
            stage: "fit",
            peak_bytes: fit_peak_bytes(&tracked, tokens, block, labels, true),
            disk_bytes: factors * n_segments as u64,
            detail: format!(
                "{n_segments} segment(s) × {} of factors ({} layers)",
                human_bytes(factors),
                layers.len()
            ),
            advice: "lower batching.token_budget, or set attribution.block_size for wide layers",
        });
    }

    // query: one pass and the queries' gradients.
    let q = inputs.queries as u64;
    let grads = 4 * q * tracked_weight_floats(&tracked);
    stages.push(StagePlan {
        stage: "query",
        peak_bytes: capture_peak_bytes(&tracked, tokens, Labels::Data) + grads,
        disk_bytes: grads,
        detail: format!("{q} queries' gradients, {}", human_bytes(grads)),
        advice: "use fewer queries per set (`source-tda ask` adds sets to a finished run)",
    });

    // score: the queries, the walk's copies and the factors in groups under the limit.
    let limit = inputs.memory_limit_gib;
    let needs = ScoreNeeds {
        layer_bytes: (layers.iter().zip(&factor_layer))
            .map(|(l, &b)| {
                n_segments as u64 * (b + 12 * ((l.d_in + l.has_bias as usize) * l.d_out) as u64)
            })
            .collect(),
        query_bytes: grads * (n_segments as u64 + 2),
    };
    let names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
    let model_pass = capture_peak_bytes(&tracked, tokens, Labels::Data);
    let (score_peak, groups): (u64, Option<FactorGroups>) =
        match plan_score_memory(model_pass, limit, &names, &needs) {
            Ok((est, g)) => (est, Some(g)),
            // Over the limit: report the unsplit need; the refusal below names it.
            Err(_) => (
                model_pass + needs.query_bytes + needs.layer_bytes.iter().max().unwrap_or(&0),
                None,
            ),
        };
    stages.push(StagePlan {
        stage: "score",
        peak_bytes: score_peak,
        disk_bytes: 0,
        detail: match &groups {
            Some(g) => g.describe(),
            None => "no layer grouping fits the limit".into(),
        },
        advice: "use fewer queries or attribution.query_rank, lower batching.token_budget, or \
                 set attribution.block_size",
    });

    let model = format!(
        "{} ({} layers): {} parameters, {} tracked linear layers",
        match &spec {
            ModelSpec::Llama(s) => s.model_type.as_str(),
            ModelSpec::Gpt2(_) => "gpt2",
        },
        spec.num_layers(),
        group_digits(p),
        layers.len()
    );
    Ok(RunPlan {
        model,
        params: p,
        stages,
        limit_bytes: limit.map(|l| (l * (1u64 << 30) as f64) as u64),
    })
}

/// 1234567 → "1,234,567".
fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl RunPlan {
    /// Refuses, naming every stage over the limit and what to change, when a limit is set.
    pub fn check(&self) -> Result<()> {
        let Some(limit) = self.limit_bytes else {
            return Ok(());
        };
        let over: Vec<String> = (self.stages.iter())
            .filter(|s| s.peak_bytes > limit)
            .map(|s| {
                format!(
                    "  {}: {} predicted; {}",
                    s.stage,
                    human_bytes(s.peak_bytes),
                    s.advice
                )
            })
            .collect();
        if over.is_empty() {
            return Ok(());
        }
        Err(Error::Resource(format!(
            "{} stage(s) do not fit the memory limit of {}:\n{}",
            over.len(),
            human_bytes(limit),
            over.join("\n")
        )))
    }

    /// The plan as JSON (`source-tda plan --json`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "model": self.model,
            "params": self.params,
            "limit_bytes": self.limit_bytes,
            "stages": self.stages.iter().map(|s| json!({
                "stage": s.stage, "peak_bytes": s.peak_bytes, "disk_bytes": s.disk_bytes,
                "detail": s.detail,
            })).collect::<Vec<_>>(),
        })
    }

    /// The plan as a table, one line per stage.
    pub fn to_table(&self) -> String {
        let mut out = format!("model: {}\n", self.model);
        out.push_str(&format!(
            "{:<9} {:>12} {:>12}  {}\n",
            "stage", "peak memory", "disk", "what"
        ));
        for s in &self.stages {
            let fits = match self.limit_bytes {
                Some(l) if s.peak_bytes > l => "  OVER THE LIMIT",
                _ => "",
            };
            out.push_str(&format!(
                "{:<9} {:>12} {:>12}  {}{fits}\n",
                s.stage,
                human_bytes(s.peak_bytes),
                if s.disk_bytes > 0 {
                    human_bytes(s.disk_bytes)
                } else {
                    "-".into()
                },
                s.detail
            ));
        }
        if let Some(l) = self.limit_bytes {
            out.push_str(&format!("memory limit: {}\n", human_bytes(l)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped_by_thousands() {
        assert_eq!(group_digits(1_235_814_400), "1,235,814,400");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
    }
}
