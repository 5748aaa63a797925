//! Owns the `finetune` stage's record of a given PEFT adapter (`[model] adapter`): `record_adapter`.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! siblings `attribute`, `fetch`.
//!
//! An adapter trained elsewhere (fetched from the hub or a folder) is the fine-tuned model:
//! nothing is trained. Its files are written into `finetune/adapter/` with
//! `base_model_name_or_path` naming the fetched base folder (as the Trainer + PEFT import
//! writes its adapters), and the trajectory is one converged segment on `[train] dataset`
//! whose only checkpoint is that folder:
//!
//! ```text
//! finetune/
//!   adapter/          adapter_config.json (base: the fetched [model] folder),
//!                     adapter_model.safetensors (the fetched weights, byte for byte)
//!   trajectory.json   one segment `adapter`: s = converged, N = the prepared train documents
//! ```
//!
//! Without the fine-tune's checkpoints the history is unknown, so every method attributes at
//! that final model: the influence function and the gradient dot product as usual, Source
//! through its one converged segment (which is the influence function's form, design.md §2).

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::pipeline::StageContext;
use crate::train::{
    adapter_over_base, CheckpointRef, LrMass, OptimizerInfo, Segment, Trajectory,
    TRAJECTORY_VERSION,
};

use super::fetch::Fetched;

/// The adapter's folder inside the `finetune` stage folder.
pub const ADAPTER_DIR: &str = "adapter";

/// Writes `finetune/adapter/` and `finetune/trajectory.json` for the fetched adapter over
/// `base_dir`, with `n_docs` prepared documents in `[train] dataset`; returns the summary.
pub(super) fn record_adapter(
    ctx: &StageContext,
    fetched: &Fetched,
    base_dir: &Path,
    n_docs: u64,
) -> Result<serde_json::Value> {
    let c = ctx.config;
    let super::fetch::FetchedAdapter { repo, facts } =
        fetched.adapter.as_ref().ok_or_else(|| {
            Error::Pipeline(
                "model.adapter is set but fetch/model.json has no adapter; rerun the fetch stage \
             (`--force fetch`)"
                    .into(),
            )
        })?;
    let src = fetched.adapter_dir().ok_or_else(|| {
        Error::Pipeline(format!(
            "fetch/model.json lists no adapter_config.json for model.adapter `{}`; rerun the \
             fetch stage (`--force fetch`)",
            repo.id
        ))
    })?;
    let dst = ctx.out(ADAPTER_DIR);
    adapter_over_base(src, base_dir, &dst)?;
    // The adapter's targets must match modules of this base (checked on shapes alone: no
    // weights are read here).
    crate::model::Model::shapes_of(&dst, &super::attribute::load_options(c)).map_err(|e| {
        Error::Pipeline(format!(
            "model.adapter `{}` does not fit [model] `{}`: {e}",
            repo.id, fetched.model.id
        ))
    })?;
    let rel = Path::new("finetune")
        .join(ADAPTER_DIR)
        .display()
        .to_string();
    let segment = Segment {
        stage: "adapter".into(),
        step_start: 0,
        step_end: 0,
        learning_rates: Vec::new(),
        lr_mass: LrMass::Converged,
        clip_factors: Vec::new(),
        optimizer: OptimizerInfo::Unknown,
        dataset: c.train.dataset.clone(),
        n_docs,
        checkpoints: vec![CheckpointRef {
            step: 0,
            path: rel.clone(),
            optimizer_state: None,
        }],
        visit_order: None,
    };
    let traj = Trajectory {
        version: TRAJECTORY_VERSION,
        base_model: fetched.model.id.clone(),
        base_commit: fetched.model.commit.clone(),
        loss_normalization: c.train.loss_normalization,
        segments: vec![segment],
    };
    traj.save(&ctx.out("trajectory.json"))?;
    tracing::info!(
        "model.adapter {} (r = {}) is the fine-tuned model: recorded as {rel}, one converged \
         segment over {} `{}` documents; nothing is trained",
        repo.id,
        facts.r,
        n_docs,
        c.train.dataset
    );
    Ok(
        json!({"adapter": repo.id, "commit": repo.commit, "checkpoint": rel,
              "segments": 1, "n_docs": n_docs}),
    )
}
