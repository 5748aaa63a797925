//! Owns the score stage's work (`score_stage`): the queries preconditioned, the documents
//! scored ([`super::score_docs`]) and the tables written ([`super::score_write`]), for the
//! whole stage or one `--shard i/n`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `query_tokens`, `score_acting`, `score_candidates`, `score_docs`, `score_gen`,
//! `score_meta`, `score_queries`, `score_write`.

use serde_json::json;

use crate::attribution::plan::AttributionPlan;
use crate::config::MethodKind;
use crate::error::{Error, IoContext, Result};
use crate::pipeline::StageContext;
use crate::train::{OptimizerInfo, Trajectory};
use crate::util::shard::Shard;

use super::attribute::plan;
use super::query_tokens::GEN_GRADIENTS;
use super::score_acting::write_acting;
use super::score_candidates::find_candidates;
use super::score_docs::score_segments;
use super::score_meta::table_metadata;
use super::score_queries::{precondition_queries, Queries};
use super::score_write::write_outputs;

/// The stage's work: everything, or with `shard` the partial tables of its documents
/// (`score --shard`, [`super::score_shard`]). Returns the stage's summary.
pub(super) fn score_stage(ctx: &StageContext, shard: Option<Shard>) -> Result<serde_json::Value> {
    let p = plan(ctx.config, ctx.run)?;
    let g = &ctx.config.attribution.generated;
    if shard.is_some() && g.enabled && ctx.input_dir("query").join(GEN_GRADIENTS).exists() {
        return Err(Error::Pipeline(
            "score --shard does not shard the attribution of generated tokens \
             ([attribution.generated]); set attribution.generated.enabled = false, or run \
             `score` without --shard"
                .into(),
        ));
    }
    log_adam_variant(ctx, &p)?;
    let queries = precondition_queries(ctx, &p)?;
    let acting = write_acting(ctx, &p, &queries.acting)?;
    let cands = find_candidates(ctx, &p, &queries)?;
    // The documents' token ids and the segments' scores [N][Q] wait on disk here
    // (score_docs), removed when the stage ends.
    let scratch = tempfile::Builder::new()
        .prefix(".scratch-")
        .tempdir_in(&ctx.out_dir)
        .ctx("creating a scratch folder in", &ctx.out_dir)?;
    let mut roles = score_segments(ctx, &p, &queries, cands.as_ref(), (scratch.path(), shard))?;
    let mut out = write_outputs(ctx, &p, &queries, &mut roles, shard)?;
    drop(roles);
    drop(scratch);
    let meta = |table: &str| table_metadata(ctx, table);
    if shard.is_none() {
        if let Some(g) =
            super::score_gen::score_generated(ctx, &p, queries.backend.as_ref(), &meta)?
        {
            out["generated_tokens"] = g;
        }
    }
    let Queries {
        estimate,
        needs,
        groups,
        ..
    } = &queries;
    out["memory"] = json!({
        "estimated_peak_bytes": estimate, "model_pass_bytes": estimate
            - needs.query_bytes - groups.largest().1, "query_bytes": needs.query_bytes,
        "layer_factor_bytes": needs.layer_bytes, "groups": groups.groups,
        "group_bytes": groups.group_bytes, "group_budget": groups.budget,
    });
    out["query_rank"] = json!(ctx.config.attribution.query_rank);
    out["device"] = json!(queries.backend.name());
    out["query_rank_kept_energy"] = json!(queries.kept_energy);
    out["acting"] = acting;
    if let Some(c) = cands {
        out["candidates"] = c.summary;
    }
    Ok(out)
}

/// Says so when Source's Adam variant applies (a segment of the trajectory used AdamW).
fn log_adam_variant(ctx: &StageContext, p: &AttributionPlan) -> Result<()> {
    let traj = Trajectory::load(&ctx.run.stage_dir("finetune").join("trajectory.json"))?;
    let adam = traj
        .segments
        .iter()
        .any(|s| matches!(s.optimizer, OptimizerInfo::AdamW { .. }));
    if adam && p.method == MethodKind::Source {
        tracing::info!("score: AdamW segments use Source's Adam variant (saved second moments)");
    }
    Ok(())
}
