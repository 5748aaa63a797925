//! Owns what `fit`, `query`, `score` read from the run: the plan, role documents, models.
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `fetch`.
//!
//! What the `fit`, `query` and `score` stages read from the run directory: the trajectory
//! the `finetune` stage recorded and the prepared data roles, from which
//! [`crate::attribution::plan`] derives the segment plan; the models at its checkpoints, the
//! backend, the fit options, and the memory checks before a pass.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::attribution::plan::{plan_segments, AttributionPlan, PlanSource};
use crate::config::{Config, FisherKind};
use crate::data::{count_prepared, for_each_prepared, read_prepared, PreparedDoc};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, Model, Tracking};
use crate::passes::{Fisher, PassOptions};
use crate::pipeline::RunDir;
use crate::train::Trajectory;

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
    Ok(read_prepared(&prepared_path(run, role)?)?.0)
}

/// The prepared table of data role `role` (`prepare/ROLE.parquet`); an error says how to
/// prepare it when it is missing.
pub fn prepared_path(run: &RunDir, role: &str) -> Result<std::path::PathBuf> {
    let path = run.stage_dir("prepare").join(format!("{role}.parquet"));
    if !path.exists() {
        return Err(Error::Pipeline(format!(
            "data role `{role}` was not prepared ({} is missing); add `[data.{role}]` to the \
             config",
            path.display()
        )));
    }
    Ok(path)
}

/// The number of prepared documents of data role `role`, from the table's footer.
pub fn role_count(run: &RunDir, role: &str) -> Result<usize> {
    count_prepared(&prepared_path(run, role)?)
}

/// Builds the plan from the config, `finetune/trajectory.json` and the prepared data roles.
pub fn plan(config: &Config, run: &RunDir) -> Result<AttributionPlan> {
    let traj = Trajectory::load(&run.stage_dir("finetune").join("trajectory.json"))?;
    plan_segments(
        config.attribution.method,
        &PlanSource {
            trajectory: &traj,
            resolve: &|p| resolve_path(run, p),
            prepared: &|role| {
                run.stage_dir("prepare")
                    .join(format!("{role}.parquet"))
                    .exists()
            },
            n_train: &|| Ok(role_count(run, "train")? as u64),
            base: &|| {
                let fetched = super::fetch::Fetched::load(run)?;
                fetched
                    .model
                    .file("config.json")
                    .and_then(|f| f.path.parent().map(Path::to_path_buf))
                    .ok_or_else(|| {
                        Error::Pipeline(
                            "fetch/resolved.json lists no config.json; rerun the fetch stage"
                                .into(),
                        )
                    })
            },
            tokens_per_doc: &|role| {
                // Streamed: the plan is built by stages that must not hold every document.
                let (mut t, mut n) = (0usize, 0usize);
                for_each_prepared(&prepared_path(run, role)?, |_, docs| {
                    t += docs.iter().map(|d| d.n_loss_tokens()).sum::<usize>();
                    n += docs.len();
                    Ok(())
                })?;
                Ok(t as f64 / n.max(1) as f64)
            },
        },
    )
}

/// Fit/score options from the config.
pub fn fit_options(config: &Config) -> PassOptions {
    PassOptions {
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

/// The tracked layers `[attribution] layers` asks for (every linear layer of the blocks
/// without it).
pub fn load_options(config: &Config) -> LoadOptions {
    LoadOptions {
        tracking: match &config.attribution.layers {
            Some(p) => Tracking::Patterns(p.clone()),
            None => Tracking::BlockLinears,
        },
        lora_track: config.attribution.lora_layers,
        // A LoRA run's start θ₀ is the base model with the fresh adapter the fine-tune
        // began from (an adapter folder keeps its own).
        lora_init: crate::train::finetune::train_load_options(&config.train).lora_init,
        ..LoadOptions::default()
    }
}

/// The model at `dir` with the config's tracked layers and zero weights that occupy no memory
/// ([`Model::shape_only`]): its layer names and sizes, for planning, without reading weights.
pub fn model_shapes(dir: &Path, config: &Config) -> Result<Model> {
    Model::shapes_of(dir, &load_options(config))
}

/// Loads a checkpoint on the CPU with the config's tracked layers.
pub fn load_model(dir: &Path, config: &Config) -> Result<Model> {
    Model::load(dir, &load_options(config), &Device::Cpu)
}

/// Loads a checkpoint on `device` (a backend's) with the config's tracked layers.
pub fn load_model_on(dir: &Path, device: &Device, config: &Config) -> Result<Model> {
    Model::load(dir, &load_options(config), device)
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

/// `[attribution] layers` in a stage's config view and cache key, only when set (so that
/// hashes of runs tracking every block layer stay what they were).
pub fn layers_view(config: &Config, view: &mut serde_json::Value) {
    if let Some(l) = &config.attribution.layers {
        view["layers"] = serde_json::json!(l);
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
        // The fit stage keeps its captures for Λ on the CPU (`PassOptions::capture_dir`).
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

/// Prints the estimate and refuses when it exceeds `[attribution] memory_limit_gib`.
pub fn check_memory(stage: &str, model: &Model, config: &Config) -> Result<u64> {
    check_estimate(
        stage,
        memory_estimate(model, config),
        config,
        "lower batching.token_budget, set attribution.block_size for wide layers, or raise the \
         limit",
    )
}

/// Prints `stage`'s estimated peak `est` and refuses, with `advice`, when it exceeds
/// `[attribution] memory_limit_gib`.
pub fn check_estimate(stage: &str, est: u64, config: &Config, advice: &str) -> Result<u64> {
    let h = crate::util::mem::human_bytes;
    tracing::info!("{stage}: estimated peak memory {}", h(est));
    if let Some(limit) = config.attribution.memory_limit_gib {
        if est as f64 > limit * (1u64 << 30) as f64 {
            return Err(Error::Resource(format!(
                "{stage}: the estimated peak memory {} exceeds attribution.memory_limit_gib = \
                 {limit}; {advice}",
                h(est)
            )));
        }
    }
    Ok(est)
}
