//! Owns the score stage's candidate search (`find_candidates`, `Candidates`).
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `index`, `score_queries`.
//!
//! With `[attribution.candidates]`, the preconditioned queries u_p (one per scoring model) are
//! sketched like the `index` stage's documents, every document's sketched score
//! ŝ(q, m) = Σ_p ⟨û_p(q), row_p(m)⟩ is read from the index, and only the documents at either
//! end of some query's ŝ ranking are scored exactly ([`crate::attribution::index`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::attribution::index::{
    add_sketched_scores, select, sketch_layers, sketch_queries, sketches, IndexHeader, INDEX_FORMAT,
};
use crate::attribution::plan::AttributionPlan;
use crate::error::{Error, IoContext, Result};
use crate::pipeline::StageContext;

use super::attribute::{model_shapes, role_count};
use super::index::{fit_outputs, load_whitening, point_name};
use super::score_queries::{open_factor_files, Queries};

/// The documents to score exactly, per data role (document positions in the role's prepared
/// table), and what the search saw.
pub(super) struct Candidates {
    keep: BTreeMap<String, BTreeSet<usize>>,
    /// The summary written to the stage's record.
    pub(super) summary: serde_json::Value,
}

impl Candidates {
    /// The positions of a role's candidates in its prepared table (none for a role the
    /// search did not see).
    pub(super) fn picked(&self, role: &str) -> BTreeSet<usize> {
        self.keep.get(role).cloned().unwrap_or_default()
    }
}

/// The candidates for `queries`, or None without `[attribution.candidates]`.
pub(super) fn find_candidates(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
) -> Result<Option<Candidates>> {
    let Some(cand) = ctx.config.attribution.candidates else {
        return Ok(None);
    };
    let dir = ctx.run.stage_dir("index");
    let path = dir.join("index.json");
    let rerun = "rerun the index stage (`source-tda index --config C --run-dir R`, or `run` \
                 with \"index\" among the pipeline's stages)";
    if !path.exists() {
        return Err(Error::Pipeline(format!(
            "`[attribution.candidates]` needs the index stage's sketches, and {} is missing: \
             add \"index\" to the pipeline's stages (after \"fit\"), or run `source-tda index \
             --config C --run-dir R` first",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&path).ctx("reading", &path)?;
    let header: IndexHeader = serde_json::from_str(&text)
        .map_err(|e| Error::Pipeline(format!("{}: {e}; {rerun}", path.display())))?;
    let stale = |what: String| Error::Pipeline(format!("{}: {what}; {rerun}", path.display()));
    if header.format != INDEX_FORMAT {
        return Err(stale(format!(
            "format {} (this build reads {INDEX_FORMAT})",
            header.format
        )));
    }
    if (header.seed, header.dims) != (cand.seed, cand.dims) {
        return Err(stale(format!(
            "built with seed {} and dims {}, the config asks for seed {} and dims {}",
            header.seed, header.dims, cand.seed, cand.dims
        )));
    }
    let points = p.score_points();
    let names: Vec<(usize, String)> = points
        .iter()
        .map(|pt| (pt.segment, point_name(ctx, &pt.model)))
        .collect();
    let built: Vec<(usize, String)> = header
        .points
        .iter()
        .map(|pt| (pt.segment, pt.model.clone()))
        .collect();
    if names != built {
        return Err(stale(format!(
            "sketched at {} scoring models that are not this plan's {}",
            built.len(),
            names.len()
        )));
    }
    let first = &points[0].model;
    if sketch_layers(&model_shapes(first, ctx.config)?) != header.layers {
        return Err(stale(
            "its layers are not the model's tracked layers".into(),
        ));
    }
    let want_fit = if p.needs_factors() {
        fit_outputs(ctx)?
    } else {
        None
    };
    if header.fit_outputs != want_fit {
        return Err(stale("it was whitened with another fit's factors".into()));
    }
    let width = header.dims;
    if header.exact > width {
        return Err(stale(format!(
            "{} exact coordinates in rows of {width}",
            header.exact
        )));
    }
    let sk = sketches(&header.layers, header.seed, width - header.exact)?;
    let names: Vec<String> = header.layers.iter().map(|l| l.name.clone()).collect();
    // Each segment's factors, read once for the points of that segment.
    let files = open_factor_files(ctx, p)?;
    let mut factors: Option<(usize, Vec<crate::linalg::LayerFactors>)> = None;
    let mut sketched: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    let mut n_docs: BTreeMap<String, usize> = BTreeMap::new();
    for (pt, u) in header.points.iter().zip(&queries.u) {
        if !n_docs.contains_key(&pt.role) {
            let n = role_count(ctx.run, &pt.role)?;
            n_docs.insert(pt.role.clone(), n);
        }
        if n_docs[&pt.role] != pt.documents {
            return Err(stale(format!(
                "{} rows of `{}` documents, the prepared data has {}",
                pt.documents, pt.role, n_docs[&pt.role]
            )));
        }
        if pt.whitening.is_some() && factors.as_ref().map(|(s, _)| *s) != Some(pt.segment) {
            let f = files[pt.segment].load_layers(&names, &candle_core::Device::Cpu)?;
            factors = Some((pt.segment, f));
        }
        let f = factors.as_ref().map_or(&[][..], |(_, f)| &f[..]);
        let w = load_whitening(ctx, pt, f, &names)?;
        let uq = sketch_queries(&sk, w.as_deref(), u)?;
        let acc = sketched
            .entry(pt.role.clone())
            .or_insert_with(|| vec![vec![0f32; pt.documents]; queries.q]);
        add_sketched_scores(&dir, pt, width, &uq, acc)?;
    }
    let keep = select(&sketched, cand.per_query);
    let scored: usize = keep.values().map(BTreeSet::len).sum();
    let total: usize = n_docs.values().sum();
    tracing::info!(
        "score: candidates: {scored} of {total} documents to score exactly ({} per query at \
         each end of the sketched ranking, {width} sketched numbers per document)",
        cand.per_query
    );
    let summary = json!({"per_query": cand.per_query, "dims": cand.dims, "width": width,
        "seed": cand.seed, "scored_documents": scored, "documents": total});
    Ok(Some(Candidates { keep, summary }))
}
