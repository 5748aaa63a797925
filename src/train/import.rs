//! Owns `import_trainer`: a trajectory imported from a Hugging Face Trainer output folder.
//! Layer: train — may import the ground, linalg, backend, model, data, hub and, in this folder,
//! checkpoint.rs, finetune.rs, import_adapter.rs, schedule.rs, trajectory.rs.
//!
//! Importing a trajectory from a Hugging Face Trainer output folder (`[train] import_from`).
//!
//! The Trainer saves `checkpoint-N/` folders (config.json, model.safetensors, tokenizer
//! files, `trainer_state.json`, and `optimizer.pt`, a PyTorch pickle this tool does not
//! read). `trainer_state.json` gives the steps (`global_step`, `max_steps`) and the logged
//! learning rates (`log_history`), but not the schedule, the optimizer or its
//! hyper-parameters: those come from `[train]` (`lr`, `schedule`, `warmup_steps`,
//! `optimizer`, `beta1`, …), and every logged rate is checked against them. The Trainer
//! logs, at global step s, the rate after its scheduler stepped: λ(s), the rate of step
//! s + 1; step k (1-based) trains with η λ(k − 1).
//!
//! Adam's second moments come from `checkpoint-N/exp_avg_sq.safetensors`, a safetensors
//! export of `optimizer.pt` (tensors named by parameter, raw PyTorch `exp_avg_sq`; see
//! docs/import-trainer.md); they are bias-corrected here (v̂ = v / (1 − β₂ᴺ)) and written to
//! `OUT/optimizer/checkpoint-N.safetensors` as `exp_avg_sq.NAME`. The first moments, when
//! exported too (`checkpoint-N/exp_avg.safetensors`, raw `exp_avg`), become m̂ = m / (1 − β₁ᴺ)
//! as `exp_avg.NAME` in the same file (`[attribution] adam_response = "full"` reads them;
//! without them it falls back to v̂ alone). Momentum SGD reads
//! `momentum.safetensors` (`momentum_buffer`) the same way.
//!
//! PEFT runs (checkpoints holding `adapter_config.json` and `adapter_model.safetensors`)
//! are imported as adapters over the fetched base model ([`super::import_adapter`]).
//!
//! Gradient clipping: the Trainer clips at `max_grad_norm` (1.0 by default) and logs each
//! logged step's pre-clip norm as `grad_norm`. With `[train] max_grad_norm` declared and
//! every step logged (`logging_steps = 1`), the clip factors c_k = min(1, max / (‖g_k‖ +
//! 1e-6)) enter the trajectory; when a logged norm shows clipping but not every step is
//! logged, the import refuses and says what to log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::config::TrainConfig;
use crate::error::{Error, IoContext, Result};

use super::checkpoint::{read_safetensors, write_safetensors};
use super::finetune::optimizer_info;
use super::import_adapter::{adapter_checkpoint, peft_param_name};
use super::schedule::Schedule;
use super::trajectory::{CheckpointRef, LrMass, OptimizerInfo, Segment};
use crate::config::LossNormalization;

/// The fine-tuning segments built from a Trainer folder.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Segments in step order (paths absolute; optimizer states under the output folder).
    pub segments: Vec<Segment>,
    /// Steps of the checkpoints found.
    pub checkpoint_steps: Vec<u64>,
}

fn bad(dir: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Pipeline(format!("import from {}: {msg}", dir.display()))
}

fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).ctx("listing", dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(bad(
            dir,
            "no checkpoint-N folders; point `train.import_from` at the Trainer's output_dir \
             (trained with save_strategy = \"steps\" or \"epoch\")",
        ));
    }
    Ok(out)
}

/// Builds the fine-tuning segments of a Trainer run in `dir`; `t` declares what
/// `trainer_state.json` does not record; `dataset`/`n_docs` name the data trained on;
/// optimizer states (and PEFT adapters, over `base_dir`) are written under `out`, whose path
/// inside the run directory is `out_rel`.
pub fn import_trainer(
    dir: &Path,
    t: &TrainConfig,
    dataset: &str,
    n_docs: u64,
    base_dir: &Path,
    out: &Path,
    out_rel: &Path,
) -> Result<Imported> {
    if t.loss_normalization != LossNormalization::MeanPerToken {
        return Err(bad(
            dir,
            "the Hugging Face Trainer averages the loss over tokens; set \
             `train.loss_normalization = \"mean_per_token\"` (or keep it only if your Trainer \
             subclass summed per document and averaged over documents, which this import \
             cannot check)",
        ));
    }
    let ckpts = checkpoints(dir)?;
    let (last_step, last_dir) = ckpts.last().cloned().expect("non-empty");
    let state_path = [
        last_dir.join("trainer_state.json"),
        dir.join("trainer_state.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        bad(
            dir,
            format!("{} has no trainer_state.json", last_dir.display()),
        )
    })?;
    let text = std::fs::read_to_string(&state_path).ctx("reading", &state_path)?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(dir, format!("{}: not JSON ({e})", state_path.display())))?;
    let global = state["global_step"].as_u64().ok_or_else(|| {
        bad(
            dir,
            format!("{}: no integer `global_step`", state_path.display()),
        )
    })?;
    if global != last_step {
        return Err(bad(
            dir,
            format!(
                "{}: global_step = {global}, but the folder is checkpoint-{last_step}; the \
                 folder was renamed or copied from another run",
                state_path.display()
            ),
        ));
    }
    let total = match (state["max_steps"].as_u64(), t.max_steps) {
        (_, Some(m)) => m,
        (Some(m), None) if m > 0 => m,
        _ => {
            return Err(bad(
                dir,
                "trainer_state.json has no `max_steps` (the schedule's length); set \
                 `train.max_steps` to the Trainer's total number of optimizer steps",
            ))
        }
    };
    if total < last_step {
        return Err(bad(
            dir,
            format!("max_steps = {total} is less than the last checkpoint's step {last_step}"),
        ));
    }
    let sched = Schedule {
        kind: t.schedule,
        peak: t.lr,
        warmup: t.warmup_steps,
        total,
    };
    let logs = state["log_history"].as_array().cloned().unwrap_or_default();
    let mut checked = 0;
    for entry in &logs {
        let (Some(s), Some(lr)) = (entry["step"].as_u64(), entry["learning_rate"].as_f64()) else {
            continue;
        };
        let want = sched.lr(s);
        if (lr - want).abs() > 1e-6 * want.abs().max(lr.abs()) + 1e-15 {
            return Err(bad(
                dir,
                format!(
                    "trainer_state.json logs learning_rate {lr} at step {s}, but [train] \
                     (lr = {}, schedule = {:?}, warmup_steps = {}, T = {total}) gives {want}; \
                     set them to the Trainer's learning_rate, lr_scheduler_type and warmup_steps",
                    t.lr, t.schedule, t.warmup_steps
                ),
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        tracing::warn!(
            "{}: no learning rate logged; trusting the declared schedule unchecked",
            state_path.display()
        );
    }

    let clip = clip_factors(dir, &logs, t.max_grad_norm, last_step)?;

    // Segment ends: explicit boundaries (each must be a checkpoint), else the checkpoints
    // split evenly by count into L groups.
    let steps: Vec<u64> = ckpts.iter().map(|c| c.0).collect();
    let ends: Vec<u64> = match &t.segment_boundaries {
        Some(b) => {
            for s in b {
                if !steps.contains(s) {
                    return Err(bad(
                        dir,
                        format!(
                            "train.segment_boundaries has step {s}, but there is no \
                             checkpoint-{s}; boundaries must be checkpoint steps ({steps:?})"
                        ),
                    ));
                }
            }
            b.iter().copied().chain([last_step]).collect()
        }
        None => {
            let l = t.segments.unwrap_or(3);
            if l > steps.len() {
                return Err(bad(
                    dir,
                    format!(
                        "{} checkpoint folders cannot end {l} segments; set train.segments ≤ \
                         {} or save more checkpoints (save_steps)",
                        steps.len(),
                        steps.len()
                    ),
                ));
            }
            (1..=l)
                .map(|i| steps[(i * steps.len()).div_ceil(l) - 1])
                .collect()
        }
    };
    let info = optimizer_info(t);
    let opt_dir = out.join("optimizer");
    let mut segments = Vec::new();
    let mut start = 0u64;
    for end in ends {
        let mut refs = Vec::new();
        for (s, cdir) in ckpts.iter().filter(|c| c.0 > start && c.0 <= end) {
            let adapter = adapter_checkpoint(cdir, *s, base_dir, out)?;
            if adapter.is_none()
                && !(cdir.join("model.safetensors").is_file()
                    || cdir.join("model.safetensors.index.json").is_file())
            {
                return Err(bad(
                    dir,
                    format!(
                        "{} has no model.safetensors; save with save_safetensors = True (the \
                         default since transformers 4.35)",
                        cdir.display()
                    ),
                ));
            }
            let opt_file = convert_state(dir, cdir, *s, &info, &opt_dir)?;
            refs.push(CheckpointRef {
                step: *s,
                path: adapter.as_deref().unwrap_or(cdir).display().to_string(),
                optimizer_state: opt_file
                    .map(|f| out_rel.join("optimizer").join(f).display().to_string()),
            });
        }
        let rates: Vec<f64> = (start..end).map(|k| sched.lr(k)).collect();
        segments.push(Segment {
            stage: "finetune".into(),
            step_start: start,
            step_end: end,
            lr_mass: LrMass::Finite(rates.iter().sum()),
            clip_factors: clip
                .as_ref()
                .map(|c| c[start as usize..end as usize].to_vec())
                .unwrap_or_default(),
            learning_rates: rates,
            optimizer: info.clone(),
            dataset: dataset.to_string(),
            n_docs,
            checkpoints: refs,
            visit_order: None,
        });
        start = end;
    }
    Ok(Imported {
        segments,
        checkpoint_steps: steps,
    })
}

/// The Trainer's default `max_grad_norm`.
const TRAINER_DEFAULT_MAX_GRAD_NORM: f64 = 1.0;

/// c_k for steps 1 … `last` from `log_history`'s `grad_norm` (the pre-clip ‖g‖ of the step it
/// is logged at) and `max_grad_norm`: c_k = min(1, max / (‖g_k‖ + 1e-6)), as the Trainer's
/// `clip_grad_norm_`. None when no step was clipped. Refuses when a logged norm shows that
/// clipping happened but some step's norm is not logged (or `max_grad_norm` is undeclared).
fn clip_factors(
    dir: &Path,
    logs: &[serde_json::Value],
    max: Option<f64>,
    last: u64,
) -> Result<Option<Vec<f64>>> {
    let norms: HashMap<u64, f64> = logs
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e["grad_norm"].as_f64()?)))
        .collect();
    let Some(max) = max else {
        if let Some((s, g)) = norms
            .iter()
            .filter(|(_, g)| **g > TRAINER_DEFAULT_MAX_GRAD_NORM)
            .min_by_key(|(s, _)| **s)
        {
            return Err(bad(
                dir,
                format!(
                    "trainer_state.json logs grad_norm {g} at step {s}, above the Trainer's \
                     default max_grad_norm = 1.0, so the Trainer clipped that step; set \
                     `train.max_grad_norm` to the run's max_grad_norm so the clip factors are \
                     attributed through"
                ),
            ));
        }
        if norms.is_empty() {
            tracing::warn!(
                "{}: no grad_norm logged and train.max_grad_norm unset: assuming no step was \
                 clipped (the Trainer clips at max_grad_norm = 1.0 by default; declare it and \
                 log every step to attribute through clipping)",
                dir.display()
            );
        }
        return Ok(None);
    };
    let missing: Vec<u64> = (1..=last).filter(|k| !norms.contains_key(k)).collect();
    let clipped = norms
        .iter()
        .filter(|(s, g)| **s <= last && **g + 1e-6 > max);
    if let Some((s, g)) = clipped.clone().min_by_key(|(s, _)| **s) {
        if !missing.is_empty() {
            return Err(bad(
                dir,
                format!(
                    "the Trainer clipped step {s} (grad_norm {g} > max_grad_norm {max}), but \
                     log_history has no grad_norm for {} of the {last} steps (first: step {}); \
                     each clipped step's factor max_grad_norm / ‖g‖ is needed: rerun with \
                     logging_steps = 1 (transformers ≥ 4.38 logs grad_norm), or set \
                     train.max_grad_norm to none only if clipping was off",
                    missing.len(),
                    missing[0]
                ),
            ));
        }
    } else {
        if norms.is_empty() {
            return Err(bad(
                dir,
                format!(
                    "train.max_grad_norm = {max}, but log_history records no grad_norm, so \
                     whether and how much the Trainer clipped is unknown; rerun with \
                     logging_steps = 1 (transformers ≥ 4.38 logs grad_norm), or remove \
                     train.max_grad_norm if clipping was off"
                ),
            ));
        }
        if !missing.is_empty() {
            tracing::warn!(
                "{}: no logged grad_norm exceeds max_grad_norm {max}, but {} of {last} steps are \
                 not logged; assuming they were not clipped",
                dir.display(),
                missing.len()
            );
        }
        return Ok(None);
    }
    Ok(Some(
        (1..=last)
            .map(|k| (max / (norms[&k] + 1e-6)).min(1.0))
            .collect(),
    ))
}

/// The tensors of an exported optimizer state file as `PREFIX.NAME`, divided by 1 − βᵗ
/// (β = 0: as they are).
fn bias_corrected(
    dir: &Path,
    src: &Path,
    prefix: &str,
    beta: f64,
    step: u64,
) -> Result<Vec<(String, candle_core::Tensor)>> {
    let tensors = read_safetensors(src, &Device::Cpu)?;
    if tensors.is_empty() {
        return Err(bad(dir, format!("{} holds no tensors", src.display())));
    }
    let correction = if beta > 0.0 {
        1.0 / (1.0 - beta.powi(step as i32))
    } else {
        1.0
    };
    tensors
        .into_iter()
        .map(|(name, t)| {
            let name = name.strip_prefix(&format!("{prefix}.")).unwrap_or(&name);
            let name = peft_param_name(name);
            Ok((format!("{prefix}.{name}"), t.affine(correction, 0.0)?))
        })
        .collect()
}

/// Converts a checkpoint's exported optimizer state into the attribution's format; returns
/// the file name written under `opt_dir`, or None for SGD.
fn convert_state(
    dir: &Path,
    cdir: &Path,
    step: u64,
    info: &OptimizerInfo,
    opt_dir: &Path,
) -> Result<Option<String>> {
    let (file, prefix, beta2) = match info {
        OptimizerInfo::AdamW { beta2, .. } => ("exp_avg_sq.safetensors", "exp_avg_sq", *beta2),
        OptimizerInfo::Momentum { .. } => ("momentum.safetensors", "momentum", 0.0),
        _ => return Ok(None),
    };
    let src = cdir.join(file);
    if !src.is_file() {
        return Err(bad(
            dir,
            format!(
                "{} is missing: export the optimizer's `{prefix}` from optimizer.pt with the \
                 command in docs/import-trainer.md, or set train.optimizer = \"sgd\" to \
                 attribute without optimizer state",
                src.display()
            ),
        ));
    }
    let mut named = bias_corrected(dir, &src, prefix, beta2, step)?;
    // Adam's first moments, when exported too (`adam_response = "full"` reads them).
    if let OptimizerInfo::AdamW { beta1, .. } = info {
        let m_src = cdir.join("exp_avg.safetensors");
        if m_src.is_file() {
            named.extend(bias_corrected(dir, &m_src, "exp_avg", *beta1, step)?);
        } else {
            tracing::debug!(
                "{}: no exp_avg.safetensors (Adam's m̂); `adam_response = \"full\"` will use \
                 v̂ alone for this checkpoint",
                cdir.display()
            );
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(opt_dir).ctx("creating", opt_dir)?;
    let out_name = format!("checkpoint-{step}.safetensors");
    let meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("source".to_string(), src.display().to_string()),
    ]);
    write_safetensors(&opt_dir.join(&out_name), &named, meta)?;
    Ok(Some(out_name))
}
