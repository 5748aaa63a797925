//! Owns the `finetune` stage: training (or a Trainer import) into checkpoints + trajectory.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `adapter_record`, `fetch`, `pretrain_record`.
//!
//! `finetune`: full fine-tuning of the fetched model on prepared data sets, recording the
//! trajectory Source attributes through.
//!
//! ```text
//! finetune/
//!   trajectory.json            segments (pretrain first when declared), rates, s, checkpoints
//!   loss.parquet               step, lr, loss, grad_norm, n_docs, n_tokens, micro_batches
//!   visit_order.parquet        step, doc_index, doc_id: the documents each step saw
//!                              (visit_order-STAGE.parquet per stage with [[train.stages]])
//!   checkpoints/step-N/        Hugging Face folders + optimizer.safetensors + state.json
//! ```
//!
//! With `[model] adapter` nothing is trained: the fetched adapter is recorded as the
//! fine-tuned model (`finetune/adapter/`, one converged segment; [`super::adapter_record`]).
//!
//! With `[[train.stages]]` the stages train one after another, each from the previous one's
//! final checkpoint, on its own data set; steps are numbered globally across stages, so
//! checkpoint folders stay unique and each segment's step range says where it lies.
//!
//! Checkpoints are written into the stage's resume folder (`RUN_DIR/.resume/finetune-KEY/`,
//! one sub-folder per training stage) as training goes, so that a killed run resumes from its
//! last checkpoint whose checksums hold (a damaged one is discarded with a warning, and
//! training falls back to the one before); on success they are hard-linked (or copied) into
//! the stage's output without the resume-only state.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{Config, MassSpec, FROM_MODEL};
use crate::data::{read_prepared, PreparedDoc};
use crate::error::{Error, IoContext, Result};
use crate::model::memory::finetune_peak_bytes;
use crate::pipeline::{Stage, StageContext};
use crate::train::import::import_trainer;
use crate::train::log::{epoch_means, write_loss_parquet, write_visits_parquet};
use crate::train::plan::steps_per_epoch;
use crate::train::{
    train, CheckpointRef, LrMass, OptimizerInfo, Segment, TrainJob, TrainOutcome, Trajectory,
    TRAJECTORY_VERSION,
};
use crate::util::num::{count, sig};

use super::fetch::Fetched;

/// The `finetune` stage.
pub struct FinetuneStage;

/// The prepared documents of `role` in the run.
fn prepared(ctx: &StageContext, role: &str) -> Result<Vec<PreparedDoc>> {
    let path = ctx.run.stage_dir("prepare").join(format!("{role}.parquet"));
    if !path.exists() {
        return Err(Error::Pipeline(format!(
            "{} is missing: data role `{role}` was not prepared; add [data.{role}] to the \
             config and rerun prepare",
            path.display()
        )));
    }
    Ok(read_prepared(&path)?.0)
}

/// Predicted peak memory of fine-tuning the model of `spec` under `config`
/// ([`finetune_peak_bytes`], for the stage whose optimizer keeps the most state); the model
/// is built from its shapes alone ([`crate::model::Model::shape_only`]).
pub fn finetune_peak(config: &Config, spec: &crate::model::ModelSpec) -> Result<u64> {
    let shapes = crate::model::Model::shape_only(spec, &crate::model::LoadOptions::default())?;
    let floats = (config.train.stage_list().iter())
        .map(|s| s.train.optimizer.state_floats())
        .max()
        .unwrap_or(0);
    Ok(finetune_peak_bytes(
        &shapes,
        config.batching.token_budget,
        floats,
    ))
}

/// Logs the predicted peak memory of fine-tuning and refuses when it exceeds
/// `attribution.memory_limit_gib`, before any step is taken.
fn check_finetune_memory(c: &Config, base_dir: &Path) -> Result<()> {
    let spec = crate::model::ModelSpec::from_file(&base_dir.join("config.json"))?;
    super::attribute::check_estimate(
        "finetune",
        finetune_peak(c, &spec)?,
        c,
        "lower batching.token_budget (micro-batches accumulate to the same step) or raise the \
         limit (`source-tda plan` shows every stage's need)",
    )?;
    Ok(())
}

/// The folder holding the fetched model's config.json.
pub fn base_model_dir(fetched: &Fetched) -> Result<PathBuf> {
    fetched
        .model
        .file("config.json")
        .and_then(|f| f.path.parent().map(Path::to_path_buf))
        .ok_or_else(|| Error::Pipeline("fetch/resolved.json lists no config.json".into()))
}

/// Links (or copies) `src/*` except `resume.safetensors` and `checksums.json` (which lists it;
/// the manifest records the published files' hashes) into `dst/`.
fn publish_checkpoint(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).ctx("creating", dst)?;
    for entry in std::fs::read_dir(src).ctx("listing", src)? {
        let entry = entry.ctx("listing", src)?;
        let name = entry.file_name();
        if name == "resume.safetensors" || name == crate::train::checkpoint::CHECKSUMS {
            continue;
        }
        let to = dst.join(&name);
        if std::fs::hard_link(entry.path(), &to).is_err() {
            std::fs::copy(entry.path(), &to).ctx("copying", entry.path())?;
        }
    }
    Ok(())
}

impl Stage for FinetuneStage {
    fn name(&self) -> &'static str {
        "finetune"
    }

    fn describe(&self) -> &'static str {
        "fine-tune the model, saving checkpoints and the trajectory (segments, learning rates)"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare"]
    }

    /// The queries are not read here: new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("fetch", "data/query.json"), ("prepare", "query.parquet")]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut view = json!({"train": c.train, "pretrain": c.pretrain, "batching": c.batching});
        // Only when set, so that the hashes of runs without an adapter stay what they were.
        if let Some(a) = &c.model.adapter {
            view["adapter"] = json!(a);
        }
        view
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let c = ctx.config;
        let fetched = Fetched::load(ctx.run)?;
        let base_dir = base_model_dir(&fetched)?;
        if c.model.adapter.is_some() {
            let n = prepared(ctx, &c.train.dataset)?.len() as u64;
            return super::adapter_record::record_adapter(ctx, &fetched, &base_dir, n);
        }
        if let Some(from) = &c.train.import_from {
            let docs = prepared(ctx, &c.train.dataset)?;
            let imported = import_trainer(
                from,
                &c.train,
                &c.train.dataset,
                docs.len() as u64,
                &base_dir,
                &ctx.out_dir,
                Path::new("finetune"),
            )?;
            let mut segments = pretrain_segment(ctx, &base_dir)?;
            segments.extend(imported.segments);
            let traj = Trajectory {
                version: TRAJECTORY_VERSION,
                base_model: fetched.model.id.clone(),
                base_commit: fetched.model.commit.clone(),
                loss_normalization: c.train.loss_normalization,
                segments,
            };
            traj.save(&ctx.out("trajectory.json"))?;
            tracing::info!(
                "imported {} checkpoints from {} into {} segments",
                imported.checkpoint_steps.len(),
                from.display(),
                traj.segments.len()
            );
            return Ok(
                json!({"imported_from": from, "checkpoints": imported.checkpoint_steps,
                             "segments": traj.segments.len()}),
            );
        }
        let stages = c.train.stage_list();
        check_finetune_memory(c, &base_dir)?;
        let single = c.train.stages.is_none();
        let resume = ctx.resume_dir()?;
        let hook = |p: &str| ctx.failpoint(p);
        let device = candle_core::Device::Cpu;
        let t0 = std::time::Instant::now();
        let mut segments = pretrain_segment(ctx, &base_dir)?;
        let mut log = Vec::new();
        let (mut offset, mut resumed_from) = (0u64, 0u64);
        let mut prev_final: Option<PathBuf> = None;
        let mut summary = Vec::new();
        for stage in &stages {
            let t = &stage.train;
            let docs = prepared(ctx, &t.dataset)?;
            // One resume folder per stage: a stage resumes only from its own checkpoints.
            let work = match single {
                true => resume.join("checkpoints"),
                false => resume.join(format!("checkpoints-{}", stage.name)),
            };
            let start_dir = prev_final.clone().unwrap_or_else(|| base_dir.clone());
            let out = train(&TrainJob {
                base_dir: &start_dir,
                docs: &docs,
                train: t,
                batching: &c.batching,
                work_dir: &work,
                device: &device,
                step_offset: offset,
                optimizer_from: prev_final.as_deref().filter(|_| stage.continue_optimizer),
                hook: &hook,
            })?;
            for (step, dir) in &out.checkpoints {
                publish_checkpoint(dir, &ctx.out(checkpoint_rel(*step)))?;
            }
            let visits_rel = match single {
                true => "visit_order.parquet".to_string(),
                false => format!("visit_order-{}.parquet", stage.name),
            };
            let ids: Vec<String> = docs.iter().map(|d| d.doc_id.clone()).collect();
            write_visits_parquet(&ctx.out(&visits_rel), &out.visits, &ids)?;
            segments.extend(stage_segments(
                ctx,
                &stage.name,
                t,
                &out,
                docs.len(),
                &visits_rel,
            ));
            let spe = steps_per_epoch(docs.len(), t.batch_size);
            summary.push(
                json!({"stage": stage.name, "dataset": t.dataset, "n_docs": docs.len(),
                "steps": out.log.len(), "first_step": offset + 1,
                "resumed_from_step": offset + out.resumed_from,
                "steps_per_epoch": spe, "epoch_mean_loss": epoch_means(&out.log, spe)}),
            );
            resumed_from += out.resumed_from;
            offset += out.log.len() as u64;
            log.extend(out.log);
            prev_final = out.checkpoints.last().map(|(_, d)| d.clone());
        }
        let secs = t0.elapsed().as_secs_f64();
        write_loss_parquet(&ctx.out("loss.parquet"), &log)?;
        let traj = Trajectory {
            version: TRAJECTORY_VERSION,
            base_model: fetched.model.id.clone(),
            base_commit: fetched.model.commit.clone(),
            loss_normalization: c.train.loss_normalization,
            segments,
        };
        traj.save(&ctx.out("trajectory.json"))?;

        let trained = log.len() as u64 - resumed_from;
        let tokens: u64 = log
            .iter()
            .filter(|r| r.step > resumed_from)
            .map(|r| r.n_tokens)
            .sum();
        let first = log.first().map(|r| r.loss).unwrap_or(f64::NAN);
        let last = log.last().map(|r| r.loss).unwrap_or(f64::NAN);
        tracing::info!(
            "fine-tuned {} steps in {} stage(s) ({} in this run, {} steps/s, {} tokens/s)",
            count(log.len() as u64),
            stages.len(),
            count(trained),
            sig(trained as f64 / secs.max(1e-9), 3),
            count((tokens as f64 / secs.max(1e-9)).round() as u64)
        );
        for s in &summary {
            let means: Vec<String> = s["epoch_mean_loss"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_f64())
                .map(|v| sig(v, 4))
                .collect();
            tracing::info!(
                "fine-tune `{}`: mean loss per epoch {}",
                s["stage"].as_str().unwrap_or_default(),
                means.join(" → ")
            );
        }
        Ok(json!({
            "steps": log.len(),
            "resumed_from_step": resumed_from,
            "segments": traj.segments.len(),
            "stages": summary,
            "first_loss": first,
            "last_loss": last,
            "steps_per_s": trained as f64 / secs.max(1e-9),
            "tokens_per_s": tokens as f64 / secs.max(1e-9),
        }))
    }
}

/// `checkpoints/step-N` inside the stage folder (N global, so unique across stages).
fn checkpoint_rel(step: u64) -> PathBuf {
    Path::new("checkpoints").join(crate::train::checkpoint::checkpoint_name(step))
}

/// The trajectory segments of one trained fine-tuning stage.
fn stage_segments(
    ctx: &StageContext,
    name: &str,
    t: &crate::config::TrainConfig,
    out: &TrainOutcome,
    n_docs: usize,
    visits_rel: &str,
) -> Vec<Segment> {
    let stage_rel = |rel: PathBuf| Path::new("finetune").join(rel).display().to_string();
    let mut segments = Vec::new();
    for plan in &out.segments {
        let (a, b) = (plan.start - out.step_offset, plan.end - out.step_offset);
        let rates = out.rates[a as usize..b as usize].to_vec();
        let mass: f64 = rates.iter().sum();
        // c_k = PyTorch's clip_grad_norm_ factor, from each step's logged pre-clip norm.
        let clip_factors: Vec<f64> = match t.max_grad_norm {
            Some(max) => out.log[a as usize..b as usize]
                .iter()
                .map(|l| (max / (l.grad_norm + 1e-6)).min(1.0))
                .collect(),
            None => Vec::new(),
        };
        let checkpoints = plan
            .checkpoints
            .iter()
            .map(|&s| CheckpointRef {
                step: s,
                path: stage_rel(checkpoint_rel(s)),
                optimizer_state: ctx
                    .out(checkpoint_rel(s))
                    .join("optimizer.safetensors")
                    .exists()
                    .then(|| stage_rel(checkpoint_rel(s).join("optimizer.safetensors"))),
            })
            .collect();
        segments.push(Segment {
            stage: name.to_string(),
            step_start: plan.start,
            step_end: plan.end,
            learning_rates: rates,
            lr_mass: LrMass::Finite(mass),
            clip_factors,
            optimizer: out.optimizer.clone(),
            dataset: t.dataset.clone(),
            n_docs: n_docs as u64,
            checkpoints,
            visit_order: Some(format!("finetune/{visits_rel}")),
        });
    }
    segments
}

/// The declared `pretrain` segment (the base model as its only checkpoint), when it has a
/// data set to attribute to: `[pretrain]`, or `[data.pretrain]` alone (then s = converged).
fn pretrain_segment(ctx: &StageContext, base_dir: &Path) -> Result<Vec<Segment>> {
    let c = ctx.config;
    let mut segments = Vec::new();
    let pretrain = c.pretrain.clone().or_else(|| {
        c.data
            .pretrain
            .as_ref()
            .map(|_| crate::config::PretrainConfig {
                dataset: Some("pretrain".into()),
                ..Default::default()
            })
    });
    if let Some(p) = pretrain {
        match &p.dataset {
            Some(role) if p.lr_mass == MassSpec::Word(FROM_MODEL.into()) => {
                let fetched = Fetched::load(ctx.run)?;
                let seg = super::pretrain_record::recorded_segment(&fetched, role, &ctx.out_dir)?;
                tracing::info!(
                    "pretrain segment from the model's recorded trajectory: s = {}, {}, N = {}",
                    lr_mass_text(seg.lr_mass),
                    optimizer_text(&seg.optimizer),
                    count(seg.n_docs)
                );
                segments.push(seg);
            }
            Some(role) => {
                let n = prepared(ctx, role)?.len() as u64;
                segments.push(Segment {
                    stage: "pretrain".into(),
                    step_start: 0,
                    step_end: 0,
                    learning_rates: Vec::new(),
                    lr_mass: match p.lr_mass {
                        MassSpec::Value(v) => LrMass::Finite(v),
                        MassSpec::Word(_) => LrMass::Converged,
                    },
                    clip_factors: Vec::new(),
                    optimizer: OptimizerInfo::Unknown,
                    dataset: role.clone(),
                    n_docs: n,
                    checkpoints: vec![CheckpointRef {
                        step: 0,
                        path: base_dir.display().to_string(),
                        optimizer_state: None,
                    }],
                    visit_order: None,
                });
            }
            None => tracing::info!(
                "[pretrain] names no data set of pretraining documents: the pretrain segment \
                 has nothing to attribute to and is left out of the trajectory"
            ),
        }
    }
    Ok(segments)
}

/// s as people read it: a number, or ∞ for a converged segment.
fn lr_mass_text(s: LrMass) -> String {
    match s {
        LrMass::Finite(v) => sig(v, 4),
        LrMass::Converged => "∞ (converged)".into(),
    }
}

/// The optimizer and its hyper-parameters in one short phrase.
fn optimizer_text(o: &OptimizerInfo) -> String {
    match o {
        OptimizerInfo::Sgd { weight_decay } => {
            format!("SGD (weight decay {})", sig(*weight_decay, 3))
        }
        OptimizerInfo::Momentum { beta, weight_decay } => format!(
            "momentum SGD (β = {}, weight decay {})",
            sig(*beta, 3),
            sig(*weight_decay, 3)
        ),
        OptimizerInfo::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => format!(
            "AdamW (β₁ = {}, β₂ = {}, ε = {}, weight decay {})",
            sig(*beta1, 4),
            sig(*beta2, 4),
            sig(*eps, 2),
            sig(*weight_decay, 3)
        ),
        OptimizerInfo::Unknown => "optimizer unknown".into(),
    }
}
