//! Owns the pretrain segment read from a model's shipped training record.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! sibling `fetch`.
//!
//! `[pretrain] lr_mass = "from_model"`: the pretrain segment built from the pretraining
//! trajectory a model ships, instead of a declared mass.
//!
//! ```text
//! MODEL/training/trajectory.json       the format of finetune/trajectory.json; its segments
//!                                      with stage `pretrain` give s = Σ η, the optimizer, N
//! MODEL/training/optimizer.safetensors AdamW's bias-corrected v̂ at the end (exp_avg_sq.NAME),
//!                                      required when that optimizer is AdamW
//! ```
//!
//! The segment's only checkpoint is the fetched model. Source's Adam variant reads a
//! checkpoint's v̂ from `optimizer.safetensors` beside its weights, so the model's files and
//! the recorded v̂ are linked into `finetune/pretrain-checkpoint/`.

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::train::{CheckpointRef, LrMass, OptimizerInfo, Segment, Trajectory};

use super::fetch::Fetched;

/// Where a model records its pretraining trajectory.
pub const TRAJECTORY_FILE: &str = "training/trajectory.json";
/// Where a model records AdamW's second moments at the end of pretraining.
pub const OPTIMIZER_FILE: &str = "training/optimizer.safetensors";
/// The pretrain segment's checkpoint folder inside the `finetune` stage folder.
const CHECKPOINT_DIR: &str = "pretrain-checkpoint";

/// The pretrain segment recorded by the fetched model, attributed to the documents of data
/// role `role`. `out_dir` is the `finetune` stage's output folder.
pub fn recorded_segment(fetched: &Fetched, role: &str, out_dir: &Path) -> Result<Segment> {
    let id = &fetched.model.id;
    let file = fetched.model.file(TRAJECTORY_FILE).ok_or_else(|| {
        Error::Pipeline(format!(
            "[pretrain] lr_mass = \"from_model\": model `{id}` ships no `{TRAJECTORY_FILE}` \
             (a pretraining trajectory); set [pretrain] lr_mass to a number or \"converged\""
        ))
    })?;
    let traj = Trajectory::load(&file.path)?;
    let at = file.path.display();
    let segs: Vec<&Segment> = traj
        .segments
        .iter()
        .filter(|s| s.stage == "pretrain")
        .collect();
    let last = *segs.last().ok_or_else(|| {
        Error::Pipeline(format!(
            "{at}: no segment has stage \"pretrain\"; [pretrain] lr_mass = \"from_model\" needs \
             one"
        ))
    })?;
    if segs.iter().any(|s| s.optimizer != last.optimizer) {
        return Err(Error::Pipeline(format!(
            "{at}: the pretrain segments used different optimizers; one segment of mass s \
             cannot stand for them (declare [pretrain] lr_mass as a number instead)"
        )));
    }
    let lr_mass = match segs.iter().any(|s| s.lr_mass == LrMass::Converged) {
        true => LrMass::Converged,
        false => LrMass::Finite(
            segs.iter()
                .map(|s| match s.lr_mass {
                    // With recorded clip factors, the mass the optimizer stepped with.
                    LrMass::Finite(_) if !s.clip_factors.is_empty() => s
                        .learning_rates
                        .iter()
                        .zip(&s.clip_factors)
                        .map(|(e, c)| e * c)
                        .sum(),
                    LrMass::Finite(m) => m,
                    LrMass::Converged => 0.0,
                })
                .sum(),
        ),
    };

    // The checkpoint: the model's own files, plus v̂ for AdamW.
    let dst = out_dir.join(CHECKPOINT_DIR);
    std::fs::create_dir_all(&dst).ctx("creating", &dst)?;
    for f in fetched.model.files.iter().filter(|f| !f.name.contains('/')) {
        link(&f.path, &dst.join(&f.name))?;
    }
    let optimizer_state = match &last.optimizer {
        OptimizerInfo::AdamW { .. } => {
            let v = fetched.model.file(OPTIMIZER_FILE).ok_or_else(|| {
                Error::Pipeline(format!(
                    "[pretrain] lr_mass = \"from_model\": {at} says pretraining used AdamW, but \
                     model `{id}` ships no `{OPTIMIZER_FILE}` \
                     (AdamW's second moments, which Source's Adam variant needs); add it to \
                     the model, or declare [pretrain] lr_mass as a number or \"converged\""
                ))
            })?;
            link(&v.path, &dst.join("optimizer.safetensors"))?;
            Some(format!("finetune/{CHECKPOINT_DIR}/optimizer.safetensors"))
        }
        _ => None,
    };
    Ok(Segment {
        stage: "pretrain".into(),
        step_start: 0,
        step_end: 0,
        learning_rates: Vec::new(),
        lr_mass,
        clip_factors: Vec::new(),
        optimizer: last.optimizer.clone(),
        dataset: role.to_string(),
        // N: the documents pretraining averaged over, not the size of the run's sample.
        n_docs: last.n_docs,
        checkpoints: vec![CheckpointRef {
            step: 0,
            path: format!("finetune/{CHECKPOINT_DIR}"),
            optimizer_state,
        }],
        visit_order: None,
    })
}

/// Hard-links `src` (following a cache symlink to its blob) to `dst`, or copies it.
fn link(src: &Path, dst: &Path) -> Result<()> {
    let real = std::fs::canonicalize(src).ctx("resolving", src)?;
    if std::fs::hard_link(&real, dst).is_err() {
        std::fs::copy(&real, dst).ctx("copying", &real)?;
    }
    Ok(())
}
