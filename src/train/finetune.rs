//! Owns the fine-tuning loop: `train`, `TrainJob`, `step_gradients` and `train_in_memory`.
//! Layer: train — may import the ground, linalg, backend, model, data, hub and, in this folder,
//! checkpoint.rs, optim.rs, plan.rs, schedule.rs, trajectory.rs.
//!
//! The fine-tuning loop: deterministic, resumable, with gradient accumulation.
//!
//! Step k (1-based) visits the documents [`VisitOrder`] assigns it, splits them into
//! micro-batches under the token budget (in visit order), and accumulates the gradient of
//! J_k = (1/n_k) Σ_m L(z_m) (`sum_per_document`) or Σ_m L(z_m) / (loss tokens of the step)
//! (`mean_per_token`). The gradient is optionally clipped to a global norm, then the
//! optimizer steps with η_{k−1} of the schedule. Checkpoints are saved at the planned steps
//! into a work folder; a rerun resumes from the newest complete one whose checksums hold
//! (a damaged one is discarded with a warning) and, because the visit
//! order, schedule and arithmetic are fixed functions of the config, ends bitwise where an
//! uninterrupted run would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::{BatchingConfig, OptimizerKind, TrainConfig};
use crate::data::{plan_batches, BatchOrder, PreparedDoc};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LoraConfig, LoraInit, Model, TokenBatch};
use crate::util::progress;

use super::checkpoint::{
    latest_good_checkpoint, read_safetensors, read_state, remove_incomplete, save_checkpoint,
    CheckpointContent, CheckpointState, StepLog,
};
use super::optim::{clip_global_norm, global_norm, Optimizer};
use super::plan::{plan_segments, total_steps, SegmentPlan, VisitOrder};
use super::schedule::Schedule;
use super::trajectory::OptimizerInfo;
use crate::config::LossNormalization;

/// What a training run needs.
pub struct TrainJob<'a> {
    /// The base model folder (config.json, safetensors, tokenizer.json).
    pub base_dir: &'a Path,
    /// The documents trained on (N = `docs.len()`).
    pub docs: &'a [PreparedDoc],
    /// `[train]`, resolved.
    pub train: &'a TrainConfig,
    /// `[batching]`: the token budget of a micro-batch.
    pub batching: &'a BatchingConfig,
    /// Where checkpoints are written and resumed from (it must survive a crash).
    pub work_dir: &'a Path,
    /// The device to train on.
    pub device: &'a Device,
    /// Global optimizer steps taken before this job (by earlier fine-tuning stages): its
    /// steps, checkpoints and hook points are numbered from here. 0 for a single stage.
    pub step_offset: u64,
    /// Continue the optimizer state saved in this checkpoint folder (`resume.safetensors`,
    /// step count from `state.json`) instead of starting a fresh one.
    pub optimizer_from: Option<&'a Path>,
    /// Test hook called with `step-K` after every step, `in-checkpoint-K` before a
    /// checkpoint's rename and `after-checkpoint-K` after it.
    pub hook: &'a dyn Fn(&str) -> Result<()>,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The segments with their checkpoint steps, in global steps.
    pub segments: Vec<SegmentPlan>,
    /// The job's `step_offset`: global step = offset + the job's own step.
    pub step_offset: u64,
    /// η_k of every step of the job, k = 0 … T − 1 (its own steps).
    pub rates: Vec<f64>,
    /// Per-step log of the job's steps (numbered globally).
    pub log: Vec<StepLog>,
    /// Checkpoint folders by step, under the work folder.
    pub checkpoints: Vec<(u64, PathBuf)>,
    /// The optimizer and its hyper-parameters.
    pub optimizer: OptimizerInfo,
    /// The job's own step training resumed from (0 for a fresh start, T if complete).
    pub resumed_from: u64,
    /// (global step, document index) of every visit, in order.
    pub visits: Vec<(u64, u32)>,
    /// The trained model.
    pub model: Model,
}

/// How fine-tuning loads its starting model: with `[train.lora]`'s fresh adapter when set
/// (a LoRA checkpoint folder keeps its own adapter).
pub fn train_load_options(t: &TrainConfig) -> LoadOptions {
    LoadOptions {
        lora_init: t.lora.as_ref().map(|l| LoraInit {
            config: LoraConfig::from_train(l),
            seed: l.seed.unwrap_or(0),
        }),
        ..LoadOptions::default()
    }
}

/// The optimizer a resolved `[train]` describes.
pub fn optimizer_info(t: &TrainConfig) -> OptimizerInfo {
    match t.optimizer {
        OptimizerKind::Sgd => OptimizerInfo::Sgd {
            weight_decay: t.weight_decay,
        },
        OptimizerKind::Momentum => OptimizerInfo::Momentum {
            beta: t.momentum.unwrap_or(0.9),
            weight_decay: t.weight_decay,
        },
        OptimizerKind::AdamW => OptimizerInfo::AdamW {
            beta1: t.beta1.unwrap_or(0.9),
            beta2: t.beta2.unwrap_or(0.999),
            eps: t.eps.unwrap_or(1e-8),
            weight_decay: t.weight_decay,
        },
    }
}

/// T, the schedule and the segment plan of `train` over N documents, after checking that T is
/// within [`crate::config::MAX_TOTAL_STEPS`] and that warm-up, segments and checkpoints fit in
/// it (errors name the key).
pub fn plan(train: &TrainConfig, n_docs: usize) -> Result<(Schedule, Vec<SegmentPlan>)> {
    // With `max_steps` the config's load checked these; with `epochs`, T is known only now
    // that N is, so they are checked here, before the first step.
    let total = checked_total(train, n_docs, TrainConfig::check_steps)?;
    let segments = plan_segments(
        total,
        train.segments.unwrap_or(3),
        train.segment_boundaries.as_deref(),
        train.checkpoints_per_segment,
    )
    .map_err(Error::Pipeline)?;
    Ok((schedule(train, total), segments))
}

/// A config check over T ([`TrainConfig::check_steps`] or [`TrainConfig::check_total`]).
type StepsCheck = fn(&TrainConfig, u64, &str) -> std::result::Result<(), (String, String)>;

/// T of `train` over N documents, passed through `check`; errors name the key.
fn checked_total(train: &TrainConfig, n_docs: usize, check: StepsCheck) -> Result<u64> {
    let total = total_steps(n_docs, train.batch_size, train.epochs, train.max_steps);
    let source = match train.max_steps {
        Some(_) => "`max_steps`".to_string(),
        None => format!(
            "{} epochs × ⌈{n_docs} documents / batch_size {}⌉",
            train.epochs, train.batch_size
        ),
    };
    check(train, total, &source).map_err(|(k, m)| {
        Error::Pipeline(format!(
            "key `train.{k}` (of [train], or of the [[train.stages]] entry training on \
             `{}`): {m}",
            train.dataset
        ))
    })?;
    Ok(total)
}

/// The learning-rate schedule of `train` over T = `total` steps.
fn schedule(train: &TrainConfig, total: u64) -> Schedule {
    Schedule {
        kind: train.schedule,
        peak: train.lr,
        warmup: train.warmup_steps,
        total,
    }
}

/// Gradients of one step's objective, accumulated over micro-batches, and its value.
pub fn step_gradients(
    model: &Model,
    docs: &[&PreparedDoc],
    norm: LossNormalization,
    batching: &BatchingConfig,
) -> Result<(Vec<Tensor>, f64, u32)> {
    let lengths: Vec<usize> = docs.iter().map(|d| d.n_tokens()).collect();
    let denom = match norm {
        LossNormalization::SumPerDocument => docs.len() as f64,
        LossNormalization::MeanPerToken => {
            docs.iter().map(|d| d.n_loss_tokens()).sum::<usize>() as f64
        }
    };
    let params = model.params();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut value = 0f64;
    let micro = plan_batches(
        &lengths,
        batching.token_budget,
        batching.max_batch_size,
        BatchOrder::AsGiven,
    );
    if denom == 0.0 {
        // No loss token in the whole step: the objective is 0 and so is its gradient.
        let zeros = params
            .iter()
            .map(|p| p.var.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        return Ok((zeros, 0.0, micro.len() as u32));
    }
    for mb in &micro {
        let rows: Vec<(&[u32], &[u8])> = mb
            .docs
            .iter()
            .map(|&i| (docs[i].input_ids.as_slice(), docs[i].loss_mask.as_slice()))
            .collect();
        let batch = TokenBatch::new(&rows, 0, None, model.device())?;
        let obj = model
            .loss_tensor(&batch)?
            .sum_all()?
            .affine(1.0 / denom, 0.0)?;
        value += obj.to_scalar::<f32>()? as f64;
        let grads = obj.backward()?;
        for (slot, p) in acc.iter_mut().zip(params) {
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) => g.clone(),
                None => p.var.zeros_like()?,
            };
            *slot = Some(match slot.take() {
                None => g,
                Some(a) => (a + g)?,
            });
        }
    }
    Ok((
        acc.into_iter()
            .map(|g| g.expect("≥ 1 micro-batch"))
            .collect(),
        value,
        micro.len() as u32,
    ))
}

/// Optimizer step k (0-based): the documents the visit order gives it, the accumulated
/// gradient of J_k, clipping, and the update with η_k. The one step both [`train`] and
/// [`train_stages_in_memory`] take. Its log entry numbers the step k + 1. With
/// `want_direction`, a clipped step also returns ĝ_k = g_k / ‖g_k‖ per parameter (the unit
/// batch gradient before clipping, in the parameters' own layout): the clip's derivative
/// c (I − ĝ ĝᵀ) needs it (docs/design.md §2).
#[allow(clippy::too_many_arguments)]
fn take_step(
    model: &Model,
    opt: &mut Optimizer,
    order: &mut VisitOrder,
    k: u64,
    all_docs: &[PreparedDoc],
    t: &TrainConfig,
    batching: &BatchingConfig,
    rates: &[f64],
    want_direction: bool,
) -> Result<(StepLog, Vec<(String, Tensor)>)> {
    let idx = order.step_docs(k);
    let docs: Vec<&PreparedDoc> = idx.iter().map(|&i| &all_docs[i]).collect();
    let (mut grads, loss, micro) = step_gradients(model, &docs, t.loss_normalization, batching)?;
    if !loss.is_finite() {
        return Err(Error::Numeric(format!(
            "step {}: the loss is {loss}; lower `train.lr` or set `train.max_grad_norm`",
            k + 1
        )));
    }
    let mut direction = Vec::new();
    if let (true, Some(m)) = (want_direction, t.max_grad_norm) {
        let norm = global_norm(&grads)?;
        if m / (norm + 1e-6) < 1.0 {
            for (p, g) in model.params().iter().zip(&grads) {
                direction.push((p.name.clone(), g.affine(1.0 / norm, 0.0)?));
            }
        }
    }
    let grad_norm = match t.max_grad_norm {
        Some(m) => clip_global_norm(&mut grads, m)?,
        None => global_norm(&grads)?,
    };
    let lr = rates[k as usize];
    opt.step(model.params(), &grads, lr)?;
    let entry = StepLog {
        step: k + 1,
        lr,
        loss,
        grad_norm,
        n_docs: docs.len() as u32,
        n_tokens: docs.iter().map(|d| d.n_tokens() as u64).sum(),
        micro_batches: micro,
    };
    Ok((entry, direction))
}

/// One fine-tuning stage of [`train_stages_in_memory`].
pub struct StageRun<'a> {
    /// The stage's resolved `[train]` (its schedule, optimizer, seed).
    pub train: &'a TrainConfig,
    /// The documents it trains on.
    pub docs: &'a [PreparedDoc],
    /// Start from the previous stage's optimizer state (moments and step count).
    pub continue_optimizer: bool,
}

/// Fine-tunes the model in `base_dir` on `docs` with `train` in memory — no checkpoints,
/// no resume — and returns the final model θ_T and the step log. The same steps, visit
/// order, schedule and arithmetic as [`train`] (a full run of both ends on bitwise equal
/// weights); used to retrain on data subsets for the linear datamodeling score.
pub fn train_in_memory(
    base_dir: &Path,
    docs: &[PreparedDoc],
    t: &TrainConfig,
    batching: &BatchingConfig,
    device: &Device,
) -> Result<(Model, Vec<StepLog>)> {
    let stage = StageRun {
        train: t,
        docs,
        continue_optimizer: false,
    };
    train_stages_in_memory(base_dir, &[stage], batching, device)
}

/// [`train_in_memory`] over a sequence of fine-tuning stages (`[[train.stages]]`): each
/// stage trains the previous stage's final model on its own documents with its own
/// schedule, optimizer and visit order, its steps numbered on from the previous stage's,
/// exactly as the finetune stage chains [`train`] jobs (its checkpoints store f32 weights
/// and optimizer state, which restore bit for bit, so the two end on bitwise equal weights).
pub fn train_stages_in_memory(
    base_dir: &Path,
    stages: &[StageRun<'_>],
    batching: &BatchingConfig,
    device: &Device,
) -> Result<(Model, Vec<StepLog>)> {
    let opts = stages
        .first()
        .map_or_else(LoadOptions::default, |s| train_load_options(s.train));
    let model = Model::load(base_dir, &opts, device)?;
    let mut log: Vec<StepLog> = Vec::new();
    let mut previous: Option<Optimizer> = None;
    for stage in stages {
        let (t, docs) = (stage.train, stage.docs);
        if docs.is_empty() {
            return Err(Error::Pipeline(format!(
                "data set `{}` has no documents to fine-tune on",
                t.dataset
            )));
        }
        // A subset's T is shorter than the full run's, which [`plan`] checked: only the
        // bound applies here (warm-up may then outlast a subset's steps, as in the Trainer).
        let total = checked_total(t, docs.len(), TrainConfig::check_total)?;
        let schedule = schedule(t, total);
        let rates = schedule.rates();
        let mut opt = Optimizer::new(optimizer_info(t), model.params().len())?;
        if let (true, Some(prev)) = (stage.continue_optimizer, &previous) {
            let state = prev.resume_state(model.params()).into_iter().collect();
            opt.restore(model.params(), prev.steps(), state)?;
        }
        let mut order = VisitOrder::new(t.seed.unwrap_or(0), docs.len(), t.batch_size);
        let offset = log.len() as u64;
        for k in 0..schedule.total {
            let (entry, _) = take_step(
                &model, &mut opt, &mut order, k, docs, t, batching, &rates, false,
            )?;
            log.push(StepLog {
                step: offset + entry.step,
                ..entry
            });
        }
        previous = Some(opt);
    }
    Ok((model, log))
}

/// Runs (or resumes) the training job.
pub fn train(job: &TrainJob<'_>) -> Result<TrainOutcome> {
    let t = job.train;
    let n = job.docs.len();
    if n == 0 {
        return Err(Error::Pipeline(format!(
            "data set `{}` has no documents to fine-tune on",
            t.dataset
        )));
    }
    let (schedule, segments) = plan(t, n)?;
    let total = schedule.total;
    let rates = schedule.rates();
    let ckpt_steps: Vec<u64> = segments
        .iter()
        .flat_map(|s| s.checkpoints.clone())
        .collect();
    let info = optimizer_info(t);
    let mut ometa = HashMap::from([(
        "optimizer".to_string(),
        serde_json::to_string(&info).expect("serialises"),
    )]);
    ometa.insert(
        "exp_avg_sq".into(),
        "bias-corrected second moment v̂ = v / (1 − β₂ᵗ)".into(),
    );

    std::fs::create_dir_all(job.work_dir).map_err(|e| Error::io("creating", job.work_dir, e))?;
    let dropped = remove_incomplete(job.work_dir)?;
    if dropped > 0 {
        tracing::warn!("removed {dropped} half-written checkpoint(s) of an interrupted run");
    }
    let off = job.step_offset;
    // Restores the optimizer saved in checkpoint `dir` (whose state is `state`).
    let restore = |opt: &mut Optimizer, model: &Model, dir: &Path, state: &CheckpointState| {
        let resume = dir.join("resume.safetensors");
        let tensors = if resume.is_file() {
            read_safetensors(&resume, job.device)?
        } else {
            HashMap::new()
        };
        let t = state.optimizer_steps.unwrap_or(state.step);
        opt.restore(model.params(), t, tensors)
    };
    let (model, mut opt, mut log, start) = match latest_good_checkpoint(job.work_dir)? {
        Some((step, dir)) if step > off && step <= off + total => {
            let model = Model::load(&dir, &train_load_options(t), job.device)?;
            let state = read_state(&dir)?;
            let mut opt = Optimizer::new(info.clone(), model.params().len())?;
            restore(&mut opt, &model, &dir, &state)?;
            tracing::info!(
                "resuming from checkpoint {} (step {step} of {})",
                dir.display(),
                off + total
            );
            (model, opt, state.log, step - off)
        }
        _ => {
            let model = Model::load(job.base_dir, &train_load_options(t), job.device)?;
            let mut opt = Optimizer::new(info.clone(), model.params().len())?;
            if let Some(from) = job.optimizer_from {
                restore(&mut opt, &model, from, &read_state(from)?)?;
            }
            (model, opt, Vec::new(), 0)
        }
    };
    if log.len() as u64 != start {
        return Err(Error::Pipeline(format!(
            "checkpoint at step {start} logs {} steps; delete {} to restart",
            log.len(),
            job.work_dir.display()
        )));
    }
    tracing::info!(
        "fine-tuning: N = {n} documents, {} per step, T = {total} steps, {} segments, \
         {} schedule peak η = {}",
        t.batch_size,
        segments.len(),
        format!("{:?}", schedule.kind).to_lowercase(),
        crate::util::num::sig(schedule.peak, 3)
    );

    let mut order = VisitOrder::new(t.seed.unwrap_or(0), n, t.batch_size);
    let pb = progress::bar(total, "finetune");
    pb.set_position(start);
    for k in start..total {
        // ĝ_k is kept where step k alone lies between two saved models (a one-step group,
        // scored exactly; docs/design.md §2): a checkpoint after it and one (or the start)
        // before it.
        let one_step_group = ckpt_steps.contains(&(k + 1)) && (k == 0 || ckpt_steps.contains(&k));
        let (entry, clip_direction) = take_step(
            &model,
            &mut opt,
            &mut order,
            k,
            job.docs,
            t,
            job.batching,
            &rates,
            one_step_group,
        )?;
        let (step, loss) = (off + entry.step, entry.loss);
        log.push(StepLog { step, ..entry });
        pb.set_message(format!("loss {loss:.4}"));
        pb.inc(1);
        if ckpt_steps.contains(&(k + 1)) {
            let state = CheckpointState {
                step,
                log: log.clone(),
                optimizer_steps: (opt.steps() != step).then_some(opt.steps()),
            };
            let content = CheckpointContent {
                model: &model,
                optimizer: opt.attribution_state(model.params())?,
                resume: opt.resume_state(model.params()),
                optimizer_metadata: ometa.clone(),
                clip_direction,
                state: &state,
            };
            let hook = || (job.hook)(&format!("in-checkpoint-{step}"));
            save_checkpoint(job.work_dir, job.base_dir, &content, &hook)?;
            (job.hook)(&format!("after-checkpoint-{step}"))?;
        }
        (job.hook)(&format!("step-{step}"))?;
    }
    pb.finish_and_clear();

    let checkpoints = ckpt_steps
        .iter()
        .map(|&s| {
            let g = off + s;
            (g, job.work_dir.join(super::checkpoint::checkpoint_name(g)))
        })
        .collect::<Vec<_>>();
    for (s, dir) in &checkpoints {
        if !dir.join("state.json").is_file() {
            return Err(Error::Pipeline(format!(
                "checkpoint of step {s} is missing from {}; delete that folder to retrain",
                job.work_dir.display()
            )));
        }
    }
    let mut visits = Vec::new();
    let mut order = VisitOrder::new(t.seed.unwrap_or(0), n, t.batch_size);
    for k in 0..total {
        visits.extend(
            order
                .step_docs(k)
                .into_iter()
                .map(|i| (off + k + 1, i as u32)),
        );
    }
    let segments = segments
        .into_iter()
        .map(|s| SegmentPlan {
            start: off + s.start,
            end: off + s.end,
            checkpoints: s.checkpoints.iter().map(|c| off + c).collect(),
        })
        .collect();
    Ok(TrainOutcome {
        segments,
        step_offset: off,
        rates,
        log,
        checkpoints,
        optimizer: info,
        resumed_from: start,
        visits,
        model,
    })
}
