//! Owns the key-value metadata of the score stage's tables (`table_metadata`) and the sign
//! convention they state.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `fetch`.

use serde_json::json;

use crate::config::MethodKind;
use crate::error::Result;
use crate::pipeline::StageContext;
use crate::util::hash::sha256_json;

use super::attribute::plan;
use super::fetch::Fetched;

/// How τ's sign reads; stored in every output file.
pub const SIGN_CONVENTION: &str = "tau = score / n_train approximates f(trained without m) - \
    f(trained with m), f = -log p(completion | prompt); tau > 0: the document helped the model \
    produce the completion (proponent); tau < 0: opponent";

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
