//! Owns the `score` stage's per-generated-token scores: `score_generated`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `query_tokens`, `score_gen_detail`, `score_gen_out`, `score_queries`.
//!
//! Each generated token's gradient ∇f_j (`query/gen_gradients.safetensors`) is preconditioned
//! like a query (the method's u_ℓ, [`preconditioned`], in the form `query_rank` asks for) and
//! scored against every training document of every segment's data, per document: one
//! scoring pass per scoring point for all generated tokens at once (in chunks that fit in
//! memory). Then the top documents of the generated tokens picked within
//! `[attribution.generated] detail_budget` are scored again per training token, each
//! document against only the tokens that show it ([`super::score_gen_detail`]). The preconditioning is linear in the gradient (exact dense u),
//! so the tokens' document scores add up to the whole completion's (Σ_j f_j = f); with
//! `query_rank` (a truncated SVD per query) or `refine` (conjugate gradients, whose
//! iterations depend on the right-hand side) they do only approximately, and the refinement
//! is not applied to the tokens (EK-FAC's u; a warning says so).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::attribution::method::{preconditioned, query_forms};
use crate::attribution::plan::{plan_score_memory, AttributionPlan, ScoreNeeds};
use crate::attribution::{score_pass_on, TrainScores};
use crate::backend::Backend;
use crate::config::MethodKind;
use crate::curvature::FactorFile;
use crate::error::Result;
use crate::linalg::LayerQuery;
use crate::pipeline::StageContext;

use super::attribute::{
    fit_options, load_model_on, model_and_batch_bytes, model_shapes, role_docs,
};
use super::query_tokens::GEN_GRADIENTS;
use super::score_gen_detail::pair_token_scores;
use super::score_gen_out::{write_gen_outputs, GenRole, GenScores, Metadata};
use super::score_queries::{load_gradients, open_factor_files};

/// Scores the query stage's generated tokens (when it wrote their gradients and
/// `[attribution.generated] enabled`) and writes `gen_tokens.parquet`, `gen_scores.parquet`
/// and `gen_token_scores.parquet` (with the key-value `metadata` of each table); returns the
/// stage summary's part.
pub(super) fn score_generated(
    ctx: &StageContext,
    p: &AttributionPlan,
    backend: &dyn Backend,
    metadata: &Metadata,
) -> Result<Option<serde_json::Value>> {
    let g = &ctx.config.attribution.generated;
    let path = ctx.input_dir("query").join(GEN_GRADIENTS);
    if !g.enabled || !path.exists() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let a = &ctx.config.attribution;
    if a.refine.is_some() && p.method == MethodKind::Influence {
        tracing::warn!(
            "score: generated tokens use EK-FAC's inverse, not the refined one; their scores \
             add up to the whole completion's only approximately"
        );
    }
    let final_model = model_shapes(&p.final_checkpoint, ctx.config)?;
    let layers: Vec<String> = final_model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let model_bytes = model_and_batch_bytes(&final_model, ctx.config);
    drop(final_model);
    let v = load_gradients(&path, &layers)?;
    let k = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    let files = open_factor_files(ctx, p)?;
    let chunk = chunk_size(&files, &layers, &v, p, model_bytes, a.memory_limit_gib)?;
    if chunk < k {
        tracing::warn!(
            "score: the preconditioned queries of the {k} generated tokens do not fit in memory \
             at once: {} scoring passes over the training data, {chunk} tokens each (set \
             attribution.generated.enabled = false, lower query.max_new_tokens, or raise \
             attribution.memory_limit_gib)",
            k.div_ceil(chunk)
        );
    }
    let mut roles: BTreeMap<String, GenRole> = BTreeMap::new();
    for seg in &p.segments {
        if !roles.contains_key(&seg.role) {
            let docs = role_docs(ctx.run, &seg.role)?;
            let n = docs.len();
            roles.insert(
                seg.role.clone(),
                GenRole {
                    docs,
                    n_train: seg.n_docs,
                    scores: vec![vec![0f64; n]; k],
                },
            );
        }
    }
    // Document scores of every generated token, a chunk of tokens at a time.
    let all: Vec<usize> = (0..k).collect();
    let mut seconds = [0f64; 3]; // preconditioning, document scores, per-token details
    let mut timed = |i: usize, t: std::time::Instant| seconds[i] += t.elapsed().as_secs_f64();
    // With one chunk, its u serves the per-token details too.
    let mut kept: Option<Forms> = None;
    for part in all.chunks(chunk) {
        let t = std::time::Instant::now();
        let u = precondition(ctx, p, backend, &files, &v, part, &layers, model_bytes)?;
        timed(0, t);
        let t = std::time::Instant::now();
        let passes = score_at_points(ctx, p, backend, &u, &roles)?;
        timed(1, t);
        for (role, s) in passes {
            let r = roles.get_mut(&role).expect("every segment's role");
            for (i, &t) in part.iter().enumerate() {
                for (m, x) in s.docs[i].iter().enumerate() {
                    r.scores[t][m] += x;
                }
            }
        }
        if part.len() == k {
            kept = Some(u);
        }
    }
    let mut scores = GenScores::new(ctx, roles)?;
    // Per-training-token scores of the picked tokens' top documents.
    let picked = scores.pick_detail(g.detail_docs, g.detail_budget);
    let picked_tokens: Vec<usize> = picked.keys().copied().collect();
    let parts: Vec<(Vec<usize>, Option<Forms>)> = match kept {
        Some(u) if !picked.is_empty() => vec![(all.clone(), Some(u))],
        _ => picked_tokens
            .chunks(chunk)
            .map(|c| (c.to_vec(), None))
            .collect(),
    };
    for (part, u) in parts {
        let u = match u {
            Some(u) => u,
            None => {
                let t = std::time::Instant::now();
                let u = precondition(ctx, p, backend, &files, &v, &part, &layers, model_bytes)?;
                timed(0, t);
                u
            }
        };
        let t = std::time::Instant::now();
        let d = pair_token_scores(ctx, p, backend, &u, &part, &picked, &scores.roles)?;
        timed(2, t);
        for ((t, role, m), x) in d {
            scores.add_detail(t, &role, m, &x);
        }
    }
    drop(files);
    let mut out = write_gen_outputs(ctx, &scores, g.top_k, metadata)?;
    out["chunks"] = json!(k.div_ceil(chunk));
    out["seconds"] = json!(started.elapsed().as_secs_f64());
    out["seconds_precondition"] = json!(seconds[0]);
    out["seconds_document_scores"] = json!(seconds[1]);
    out["seconds_token_scores"] = json!(seconds[2]);
    out["seconds_per_token"] = json!(started.elapsed().as_secs_f64() / k.max(1) as f64);
    Ok(Some(out))
}

/// u per scoring point and layer, in the form the scoring pass takes.
type Forms = Vec<Vec<LayerQuery>>;

/// u of the generated tokens `part` per scoring point, in the form the scoring pass takes.
#[allow(clippy::too_many_arguments)]
fn precondition(
    ctx: &StageContext,
    p: &AttributionPlan,
    backend: &dyn Backend,
    files: &[FactorFile],
    v: &[Tensor],
    part: &[usize],
    layers: &[String],
    model_bytes: u64,
) -> Result<Vec<Vec<LayerQuery>>> {
    let a = &ctx.config.attribution;
    let idx = Tensor::new(
        part.iter().map(|&t| t as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let vp: Vec<Tensor> = v
        .iter()
        .map(|t| t.index_select(&idx, 0))
        .collect::<candle_core::Result<_>>()?;
    let needs = ScoreNeeds::of(files, layers, &vp, p.score_points().len())?;
    let (_, groups) = plan_score_memory(model_bytes, a.memory_limit_gib, layers, &needs)?;
    let u = preconditioned(a, backend, p, files, &vp, None, layers, &groups)?;
    Ok(query_forms(u, a.query_rank)?.0)
}

/// Scores the documents of every segment's role against `u` (per scoring point), per
/// document, summing the passes of each role.
fn score_at_points(
    ctx: &StageContext,
    p: &AttributionPlan,
    backend: &dyn Backend,
    u: &[Vec<LayerQuery>],
    roles: &BTreeMap<String, GenRole>,
) -> Result<Vec<(String, TrainScores)>> {
    let opts = fit_options(ctx.config);
    let mut out: Vec<(String, TrainScores)> = Vec::new();
    for (pt, u_pt) in p.score_points().iter().zip(u) {
        let role = &p.segments[pt.segment].role;
        let model = load_model_on(&pt.model, backend.device(), ctx.config)?;
        let s = score_pass_on(backend, &model, &roles[role].docs, u_pt, &opts, false)?;
        match out.iter_mut().find(|(r, _)| r == role) {
            Some((_, acc)) => {
                for (a, b) in acc.docs.iter_mut().zip(&s.docs) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                }
            }
            None => out.push((role.clone(), s)),
        }
    }
    Ok(out)
}

/// How many generated tokens are preconditioned and scored at once: as many as a quarter of
/// the memory budget (`memory_limit_gib`, else the available memory) holds after the model
/// pass, at least one.
fn chunk_size(
    files: &[FactorFile],
    layers: &[String],
    v: &[Tensor],
    p: &AttributionPlan,
    model_bytes: u64,
    limit_gib: Option<f64>,
) -> Result<usize> {
    let k = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    if k == 0 {
        return Ok(1);
    }
    let one: Vec<Tensor> = v
        .iter()
        .map(|t| t.narrow(0, 0, 1))
        .collect::<candle_core::Result<_>>()?;
    let per_token = ScoreNeeds::of(files, layers, &one, p.score_points().len())?
        .query_bytes
        .max(1);
    let total = match limit_gib {
        Some(l) => (l * (1u64 << 30) as f64) as u64,
        None => crate::util::mem::available_memory_bytes().unwrap_or(8 << 30),
    };
    let room = total.saturating_sub(model_bytes) / 4;
    Ok(((room / per_token) as usize).clamp(1, k))
}
