//! Owns the score stage's curvature diagnostic: `query_energy_shares`, `write_acting`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no
//! sibling.
//!
//! Where curvature acts for the queries (docs/design.md, Source): per segment, the share of
//! the queries' gradient energy in the eigen-directions with s·σ·p > 1, beside the fit
//! stage's share of curvature mass there, written to `score/acting.json` and said in one
//! sentence ("in this run Source differs from a preconditioned gradient sum in N% of the
//! query's energy").

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::attribution::acting::{acting_sentence, query_energy, share};
use crate::attribution::method::segment_p_bar;
use crate::attribution::plan::{AttributionPlan, FactorGroups};
use crate::config::MethodKind;
use crate::curvature::FactorFile;
use crate::error::Result;
use crate::pipeline::StageContext;

/// Per segment of a Source plan, the share of the queries' gradient energy Σ‖Π_S v‖² / Σ‖v‖²
/// in the directions where its curvature acts (s·σ·p > 1; [`crate::attribution::acting`]),
/// one layer group at a time; None for the other methods.
pub(super) fn query_energy_shares(
    ctx: &StageContext,
    p: &AttributionPlan,
    files: &[FactorFile],
    v: &[Tensor],
    layers: &[String],
    groups: &FactorGroups,
) -> Result<Vec<Option<f64>>> {
    if p.method != MethodKind::Source {
        return Ok(vec![None; p.segments.len()]);
    }
    let mut sums = vec![(0f64, 0f64); p.segments.len()];
    for &(start, end) in &groups.groups {
        for ((seg, file), sum) in p.segments.iter().zip(files).zip(sums.iter_mut()) {
            let f = file.load_layers(&layers[start..end], &Device::Cpu)?;
            let pbar = segment_p_bar(seg, &f, ctx.config.attribution.adam_response)?;
            let (a, b) = query_energy(&f, &v[start..end], seg.mass, pbar.as_deref())?;
            (sum.0, sum.1) = (sum.0 + a, sum.1 + b);
        }
    }
    Ok(sums.into_iter().map(|x| Some(share(x))).collect())
}

/// Writes `acting.json` (per segment: index, stage, the fit stage's `curvature_share` and the
/// queries' `query_energy_share`) and logs the report's sentence; returns the list.
pub(super) fn write_acting(
    ctx: &StageContext,
    p: &AttributionPlan,
    energy: &[Option<f64>],
) -> Result<serde_json::Value> {
    let fit: serde_json::Value =
        std::fs::read_to_string(ctx.run.stage_dir("fit").join("acting.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(json!({}));
    let list: Vec<serde_json::Value> = p
        .segments
        .iter()
        .zip(energy)
        .map(|(s, e)| {
            let c = fit["segments"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["segment"] == json!(s.index)))
                .map(|x| x["curvature_share"].clone())
                .unwrap_or(serde_json::Value::Null);
            json!({"index": s.index, "stage": s.stage, "curvature_share": c,
                   "query_energy_share": e})
        })
        .collect();
    let list = json!(list);
    crate::util::fsx::write_json_atomic(&ctx.out("acting.json"), &list)?;
    if let Some(line) = acting_sentence(&list) {
        tracing::info!("score: {line}");
    }
    Ok(list)
}
