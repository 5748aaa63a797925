//! What the `fit`, `query` and `score` stages work on, derived from `[attribution] method`
//! and the trajectory the `finetune` stage recorded: which segments, their data, N, their
//! effective learning-rate mass and their checkpoints.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{Config, FisherKind, MethodKind};
use crate::curvature::{Fisher, FitOptions};
use crate::data::{read_prepared, PreparedDoc};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, Model};
use crate::pipeline::RunDir;
use crate::train::{LrMass, Trajectory};

/// One segment the attribution works on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedSegment {
    /// Position in the plan (and the factor file `fit/segment-K.safetensors`).
    pub index: usize,
    /// Stage name (`pretrain`, `finetune`, …).
    pub stage: String,
    /// Data role whose documents it trained on (`train`, `pretrain`, …).
    pub role: String,
    /// N_ℓ.
    pub n_docs: u64,
    /// Effective learning-rate mass (momentum folded in).
    pub mass: LrMass,
    /// Checkpoint folders (absolute), in step order.
    pub checkpoints: Vec<PathBuf>,
    /// AdamW's ε when the segment was trained with AdamW (its checkpoints then carry the
    /// bias-corrected second moments in `optimizer.safetensors`).
    #[serde(default)]
    pub adam_eps: Option<f64>,
}

/// The plan of an attribution run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributionPlan {
    /// The method.
    pub method: MethodKind,
    /// Segments in training order.
    pub segments: Vec<PlannedSegment>,
    /// The final model θ_T (absolute folder).
    pub final_checkpoint: PathBuf,
}

impl AttributionPlan {
    /// Whether the method needs EK-FAC factors.
    pub fn needs_factors(&self) -> bool {
        self.method != MethodKind::GradientDot
    }
}

/// Resolves a trajectory path (relative to the run directory, or absolute).
pub fn resolve_path(run: &RunDir, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        run.path().join(p)
    }
}

/// The prepared documents of a data role (`prepare/ROLE.parquet`).
pub fn role_docs(run: &RunDir, role: &str) -> Result<Vec<PreparedDoc>> {
    let path = run.stage_dir("prepare").join(format!("{role}.parquet"));
    if !path.exists() {
        return Err(Error::Pipeline(format!(
            "data role `{role}` was not prepared ({} is missing); add `[data.{role}]` to the \
             config",
            path.display()
        )));
    }
    Ok(read_prepared(&path)?.0)
}

/// Builds the plan from the config and `finetune/trajectory.json`.
pub fn plan(config: &Config, run: &RunDir) -> Result<AttributionPlan> {
    let traj = Trajectory::load(&run.stage_dir("finetune").join("trajectory.json"))?;
    let final_checkpoint = resolve_path(run, &traj.final_checkpoint().path);
    let method = config.attribution.method;
    let segments = match method {
        MethodKind::Source => {
            let prepared = |role: &str| {
                run.stage_dir("prepare")
                    .join(format!("{role}.parquet"))
                    .exists()
            };
            let mut out = Vec::new();
            for (i, s) in traj.segments.iter().enumerate() {
                if !prepared(&s.dataset) {
                    if i == 0 {
                        // A first segment without data contributes no scores and, being
                        // first, propagates nothing further back: it can be left out.
                        continue;
                    }
                    return Err(Error::Pipeline(format!(
                        "segment {i} (`{}`) trained on data role `{}`, which was not prepared; \
                         its curvature cannot be fitted without it",
                        s.stage, s.dataset
                    )));
                }
                out.push(PlannedSegment {
                    index: out.len(),
                    stage: s.stage.clone(),
                    role: s.dataset.clone(),
                    n_docs: s.n_docs,
                    mass: s.effective_mass(),
                    checkpoints: s
                        .checkpoints
                        .iter()
                        .map(|c| resolve_path(run, &c.path))
                        .collect(),
                    adam_eps: match &s.optimizer {
                        crate::train::OptimizerInfo::AdamW { eps, .. } => Some(*eps),
                        _ => None,
                    },
                });
            }
            out
        }
        MethodKind::Influence | MethodKind::GradientDot => {
            let n = role_docs(run, "train")?.len() as u64;
            vec![PlannedSegment {
                index: 0,
                stage: "final".into(),
                role: "train".into(),
                n_docs: n,
                mass: LrMass::Converged,
                checkpoints: vec![final_checkpoint.clone()],
                adam_eps: None,
            }]
        }
    };
    if segments.is_empty() {
        return Err(Error::Pipeline(
            "the trajectory has no segment with prepared data to attribute to".into(),
        ));
    }
    Ok(AttributionPlan {
        method,
        segments,
        final_checkpoint,
    })
}

/// Fit/score options from the config.
pub fn fit_options(config: &Config) -> FitOptions {
    FitOptions {
        fisher: match config.attribution.fisher {
            FisherKind::True => Fisher::True {
                seed: config.run.seed,
            },
            FisherKind::Empirical => Fisher::Empirical,
        },
        block_size: config.attribution.block_size,
        token_budget: config.batching.token_budget,
        max_batch_size: config.batching.max_batch_size,
        pad_id: 0,
    }
}

/// Loads a checkpoint on the CPU with the default tracked layers.
pub fn load_model(dir: &Path) -> Result<Model> {
    Model::load(dir, &LoadOptions::default(), &Device::Cpu)
}

/// Predicted peak memory (bytes) of fitting or scoring: one batch's forward + backward,
/// the weights and every layer's factors ([`crate::model::memory`] states the model).
pub fn memory_estimate(model: &Model, config: &Config) -> u64 {
    crate::model::memory::fit_peak_bytes(
        model,
        config.batching.token_budget,
        config.attribution.block_size,
    )
}

/// Prints the estimate and refuses when it exceeds `[attribution] memory_limit_gib`.
pub fn check_memory(stage: &str, model: &Model, config: &Config) -> Result<u64> {
    let est = memory_estimate(model, config);
    tracing::info!(
        "{stage}: estimated peak memory {}",
        crate::util::mem::human_bytes(est)
    );
    if let Some(limit) = config.attribution.memory_limit_gib {
        let limit_b = (limit * (1u64 << 30) as f64) as u64;
        if est > limit_b {
            return Err(Error::Pipeline(format!(
                "{stage}: the estimated peak memory {} exceeds attribution.memory_limit_gib = \
                 {limit}; lower batching.token_budget, set attribution.block_size for wide \
                 layers, or raise the limit",
                crate::util::mem::human_bytes(est)
            )));
        }
    }
    Ok(est)
}
