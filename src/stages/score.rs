//! Owns the `score` stage: preconditioned queries, scoring passes, and the score tables.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `fetch`, `score_acting`, `score_candidates`, `score_docs`, `score_gen`,
//! `score_queries`, `score_write`.
//!
//! `score`: the backwards walk over segments and the training passes that score every
//! document of every segment's data against every query, per document and per token, in
//! one pass per checkpoint (docs/design.md §2, §5; the passes in [`super::score_docs`], the
//! tables in [`super::score_write`]). Writes the scores dataset
//! (`query_set=NAME/shard=0/part-00000.parquet`, streamed a row group at a time, every
//! document or each query's top and bottom `keep_top_bottom`), `token_scores.parquet` (top-k
//! documents per query, or all), `queries.parquet` and `train_docs.parquet`; for generated
//! queries also the per-generated-token tables ([`super::score_gen`]).
//!
//! `score` is the raw Σ_ℓ ⟨u_ℓ, ḡ_ℓ(m)⟩ and `n_train` the N of the document's data set, so
//! τ = score / n_train; τ > 0 means the document helped the model produce the completion (a
//! proponent). Per-segment columns `segment_K_STAGE` add up to `score`.

use serde_json::json;

use crate::attribution::plan::AttributionPlan;
use crate::config::{Config, MethodKind};
use crate::error::{IoContext, Result};
use crate::pipeline::{Stage, StageContext};
use crate::train::{OptimizerInfo, Trajectory};
use crate::util::hash::sha256_json;

use super::attribute::{device_view, plan};
use super::fetch::Fetched;
use super::score_acting::write_acting;
use super::score_candidates::find_candidates;
use super::score_docs::score_segments;
use super::score_queries::{precondition_queries, Queries};
use super::score_write::write_outputs;

/// How τ's sign reads; stored in every output file.
pub const SIGN_CONVENTION: &str = "tau = score / n_train approximates f(trained without m) - \
    f(trained with m), f = -log p(completion | prompt); tau > 0: the document helped the model \
    produce the completion (proponent); tau < 0: opponent";

/// The `score` stage.
pub struct ScoreStage;

/// Key-value metadata every output table carries.
pub fn table_metadata(ctx: &StageContext, table: &str) -> Result<Vec<(String, String)>> {
    let fetched = Fetched::load(ctx.run)?;
    let p = plan(ctx.config, ctx.run)?;
    // The score stage's own tables carry where curvature acts (`acting.json`, written first).
    let acting: serde_json::Value = match table {
        "queries" => json!([]),
        _ => std::fs::read_to_string(ctx.out("acting.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(json!([])),
    };
    let segments: Vec<serde_json::Value> = p
        .segments
        .iter()
        .enumerate()
        .map(|(l, s)| {
            let mut j = json!({"index": s.index, "stage": s.stage, "role": s.role,
                "n": s.n_docs, "mass": s.mass, "checkpoints": s.checkpoints.len()});
            if let Some(a) = acting.get(l) {
                for k in ["curvature_share", "query_energy_share"] {
                    if let Some(x) = a.get(k).filter(|x| !x.is_null()) {
                        j[k] = x.clone();
                    }
                }
            }
            j
        })
        .collect();
    let mut meta: Vec<(String, String)> = vec![
        ("source_tda.version".into(), crate::VERSION.into()),
        ("source_tda.table".into(), table.into()),
        (
            "source_tda.config_hash".into(),
            sha256_json(&ctx.config.to_json()),
        ),
        ("source_tda.model_id".into(), fetched.model.id.clone()),
        (
            "source_tda.model_revision".into(),
            fetched.model.revision.clone().unwrap_or_default(),
        ),
        (
            "source_tda.model_commit".into(),
            fetched.model.commit.clone().unwrap_or_default(),
        ),
        (
            "source_tda.method".into(),
            format!("{:?}", p.method).to_lowercase(),
        ),
        ("source_tda.segments".into(), json!(segments).to_string()),
        (
            "source_tda.preconditioning".into(),
            preconditioning(ctx, p.method, table).to_string(),
        ),
        ("source_tda.sign_convention".into(), SIGN_CONVENTION.into()),
    ];
    if let Some(c) = &ctx.config.attribution.candidates {
        // Only candidates were scored: ranks are among them.
        meta.push(("source_tda.candidates".into(), json!(c).to_string()));
    }
    Ok(meta)
}

/// How the queries were preconditioned, for the tables' metadata: `none` (gradient dot
/// product), `ekfac`, or the refinement's method, iterations, document sample and largest
/// final relative residual (`refine.json`, written before the score tables).
fn preconditioning(ctx: &StageContext, method: MethodKind, table: &str) -> serde_json::Value {
    let refined: Option<serde_json::Value> = (table != "queries")
        .then(|| std::fs::read_to_string(ctx.out("refine.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    match (method, refined) {
        (MethodKind::GradientDot, _) => json!({"method": "none"}),
        (_, Some(r)) => json!({"method": "ekfac+cg", "iterations": r["iterations"],
            "tolerance": r["tolerance"], "documents": r["documents"],
            "final_residual_max": r["final_residual_max"]}),
        _ => json!({"method": "ekfac"}),
    }
}

impl Stage for ScoreStage {
    fn name(&self) -> &'static str {
        "score"
    }

    fn describe(&self) -> &'static str {
        "walk the query back through the segments and score documents and tokens to Parquet"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune", "fit", "query"]
    }

    /// The queries come from the `query` stage (or are not read at all): the query data set's
    /// files upstream are not inputs, so new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("fetch", "data/query.json"), ("prepare", "query.parquet")]
    }

    /// The candidate index, read with `[attribution.candidates]`.
    fn optional_inputs(&self) -> &'static [&'static str] {
        &["index"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"attribution": c.attribution, "batching": c.batching});
        device_view(c, &mut v);
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
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
        let mut roles = score_segments(ctx, &p, &queries, cands.as_ref(), scratch.path())?;
        let mut out = write_outputs(ctx, &p, &queries, &mut roles)?;
        drop(roles);
        drop(scratch);
        let meta = |table: &str| table_metadata(ctx, table);
        if let Some(g) =
            super::score_gen::score_generated(ctx, &p, queries.backend.as_ref(), &meta)?
        {
            out["generated_tokens"] = g;
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
