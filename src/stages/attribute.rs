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
        eigen_precision: config.attribution.eigendecomposition,
        capture_dir: None,
    }
}

/// Loads a checkpoint on the CPU with the default tracked layers.
pub fn load_model(dir: &Path) -> Result<Model> {
    Model::load(dir, &LoadOptions::default(), &Device::Cpu)
}

/// Loads a checkpoint on `device` (a backend's) with the default tracked layers.
pub fn load_model_on(dir: &Path, device: &Device) -> Result<Model> {
    Model::load(dir, &LoadOptions::default(), device)
}

/// The backend `[run] device` and `[run] precision` ask for (fails with what is missing when
/// `cuda` cannot be used).
pub fn open_backend(config: &Config) -> Result<Box<dyn crate::backend::Backend>> {
    crate::backend::open(config.run.device, config.run.precision)
}

/// `[run] device` and `precision` in a stage's config view and cache key, only when not the
/// CPU default (so that hashes of CPU runs stay what they were).
pub fn device_view(config: &Config, view: &mut serde_json::Value) {
    if !config.run.device.is_default() {
        view["device"] = config.run.device.name().into();
        view["precision"] = config.run.precision.name().into();
    }
}

/// Predicted peak memory (bytes) of fitting or scoring: one batch's forward + backward,
/// the weights and every layer's factors ([`crate::model::memory`] states the model).
pub fn memory_estimate(model: &Model, config: &Config) -> u64 {
    crate::model::memory::fit_peak_bytes(
        model,
        config.batching.token_budget,
        config.attribution.block_size,
        fit_options(config).fisher.labels(),
        // The fit stage keeps its captures for Λ on the CPU (`FitOptions::capture_dir`).
        model.device().is_cpu(),
    )
}

/// Bytes of a scoring pass over one batch (weights, the autograd graph, the head), from the
/// memory model in [`crate::model::memory`].
pub fn model_and_batch_bytes(model: &Model, config: &Config) -> u64 {
    crate::model::memory::capture_peak_bytes(
        model,
        config.batching.token_budget,
        crate::model::Labels::Data,
    )
}

/// How `score` loads factors (docs/design.md §8): the Source walk is block-diagonal per layer,
/// so u_ℓ is computed one group of consecutive layers at a time, with only that group's
/// factors of every segment in memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactorGroups {
    /// Layer index ranges [start, end), in layer order, covering every layer.
    pub groups: Vec<(usize, usize)>,
    /// Factor bytes of each group (all segments).
    pub group_bytes: Vec<u64>,
    /// The bytes a group may take.
    pub budget: u64,
}

impl FactorGroups {
    /// The largest group's layer count and bytes.
    pub fn largest(&self) -> (usize, u64) {
        let n = self.groups.iter().map(|(a, b)| b - a).max().unwrap_or(0);
        (n, self.group_bytes.iter().copied().max().unwrap_or(0))
    }

    /// A one-line description: `factors: 3 groups of ≤ 10 layers, ≤ 1.2 GiB each`.
    pub fn describe(&self) -> String {
        let (n, b) = self.largest();
        let h = crate::util::mem::human_bytes;
        if self.groups.len() == 1 {
            format!("factors: all {n} layers at once, {}", h(b))
        } else {
            format!(
                "factors: {} groups of ≤ {n} layers, ≤ {} each (budget {})",
                self.groups.len(),
                h(b),
                h(self.budget)
            )
        }
    }
}

/// Cuts `layers` (names, with the factor bytes each needs over all segments) into
/// consecutive groups of at most `budget` bytes. `limit` says where the budget came from, for
/// the refusal when one layer alone does not fit.
pub fn plan_factor_groups(
    layers: &[String],
    layer_bytes: &[u64],
    budget: u64,
    limit: &str,
) -> Result<FactorGroups> {
    let h = crate::util::mem::human_bytes;
    let (mut groups, mut group_bytes) = (Vec::new(), Vec::new());
    let (mut start, mut acc) = (0usize, 0u64);
    for (i, (name, &b)) in layers.iter().zip(layer_bytes).enumerate() {
        if b > budget {
            return Err(Error::Pipeline(format!(
                "score: the factors of layer `{name}` alone need {} (all segments), more than \
                 the {} left for factors under {limit}; raise the limit, lower \
                 batching.token_budget, or set attribution.block_size to store smaller \
                 eigenvector blocks",
                h(b),
                h(budget)
            )));
        }
        if i > start && acc + b > budget {
            groups.push((start, i));
            group_bytes.push(acc);
            (start, acc) = (i, 0);
        }
        acc += b;
    }
    if start < layers.len() {
        groups.push((start, layers.len()));
        group_bytes.push(acc);
    }
    Ok(FactorGroups {
        groups,
        group_bytes,
        budget,
    })
}

/// The `score` stage's memory plan: prints the estimate and the layer groups, and refuses
/// when the model pass and the queries alone exceed `[attribution] memory_limit_gib`, or when
/// one layer's factors do not fit in what is left. Without a limit, groups are sized to half
/// the available memory. `layer_bytes`: factor bytes per layer over all segments;
/// `query_bytes`: the query gradients and the preconditioned queries.
pub fn plan_score_memory(
    model: &Model,
    config: &Config,
    layers: &[String],
    layer_bytes: &[u64],
    query_bytes: u64,
) -> Result<(u64, FactorGroups)> {
    let h = crate::util::mem::human_bytes;
    let base = model_and_batch_bytes(model, config) + query_bytes;
    let (total, limit) = match config.attribution.memory_limit_gib {
        Some(l) => (
            (l * (1u64 << 30) as f64) as u64,
            format!("attribution.memory_limit_gib = {l}"),
        ),
        None => {
            let avail = crate::util::mem::available_memory_bytes().unwrap_or(8 << 30);
            (
                avail / 2,
                format!("half the available memory ({})", h(avail)),
            )
        }
    };
    if base > total && config.attribution.memory_limit_gib.is_some() {
        return Err(Error::Pipeline(format!(
            "score: the model pass and the queries alone are estimated at {} (before any \
             factors), more than {limit}; lower batching.token_budget, use fewer queries or \
             attribution.query_rank, or raise the limit",
            h(base)
        )));
    }
    // Without a configured limit, never plan below one layer per group.
    let max_layer = layer_bytes.iter().copied().max().unwrap_or(0);
    let budget = match config.attribution.memory_limit_gib {
        Some(_) => total - base,
        None => total.saturating_sub(base).max(max_layer),
    };
    let groups = plan_factor_groups(layers, layer_bytes, budget, &limit)?;
    let est = base + groups.largest().1;
    tracing::info!(
        "score: estimated peak memory {} (model pass {}, queries {}, {})",
        h(est),
        h(model_and_batch_bytes(model, config)),
        h(query_bytes),
        groups.describe()
    );
    Ok((est, groups))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_groups_fill_the_budget_in_order_and_refuse_a_layer_that_cannot_fit() {
        let names: Vec<String> = (0..5).map(|i| format!("l{i}")).collect();
        let g = plan_factor_groups(&names, &[3, 3, 3, 1, 5], 6, "the test limit").unwrap();
        assert_eq!(g.groups, vec![(0, 2), (2, 4), (4, 5)]);
        assert_eq!(g.group_bytes, vec![6, 4, 5]);
        assert!(
            g.describe().starts_with("factors: 3 groups of ≤ 2 layers"),
            "{}",
            g.describe()
        );
        let one = plan_factor_groups(&names, &[1; 5], 100, "x").unwrap();
        assert_eq!(one.groups, vec![(0, 5)]);
        let e = plan_factor_groups(&names, &[3, 3, 9, 1, 5], 6, "the test limit")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer `l2`") && e.contains("the test limit"),
            "{e}"
        );
    }
}
