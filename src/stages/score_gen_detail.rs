//! Owns the per-training-token scores of generated tokens: `pair_token_scores`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `score_gen_out` (the role scores).
//!
//! The score of training position t of document m for generated token j is
//! Σ_ℓ δ_{m,t}ᵀ U_{j,ℓ} a_{m,t} (docs/design.md §2, token level). Only the pairs (j, m) shown
//! in detail are wanted, a few documents per token: each scoring point captures (a, δ) of the
//! pairs' documents once, and each document is contracted with the preconditioned queries of
//! only the tokens that show it, so the work is that of the pairs, not of every token against
//! every shown document.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::attribution::plan::AttributionPlan;
use crate::backend::Backend;
use crate::data::PreparedDoc;
use crate::error::Result;
use crate::linalg::{LayerQuery, LowRankQuery};
use crate::model::Labels;
use crate::passes::for_each_batch;
use crate::pipeline::StageContext;

use super::attribute::{fit_options, load_model_on};
use super::score_gen_out::GenRole;

/// (generated token, role, document index within the role) → its per-token scores.
pub(super) type PairScores = BTreeMap<(usize, String, usize), Vec<f32>>;

/// Per-training-token scores of every (token, document) pair in `picked` whose token is in
/// `part`; row i of `u` (per scoring point and layer) is token `part[i]`. Summed over the
/// scoring points of each document's role.
pub(super) fn pair_token_scores(
    ctx: &StageContext,
    p: &AttributionPlan,
    backend: &dyn Backend,
    u: &[Vec<LayerQuery>],
    part: &[usize],
    picked: &BTreeMap<usize, Vec<(String, usize)>>,
    roles: &BTreeMap<String, GenRole>,
) -> Result<PairScores> {
    // Per role and document, the rows of `u` that show it.
    let mut need: BTreeMap<&str, BTreeMap<usize, Vec<u32>>> = BTreeMap::new();
    for (row, t) in part.iter().enumerate() {
        for (role, m) in picked.get(t).into_iter().flatten() {
            need.entry(role.as_str())
                .or_default()
                .entry(*m)
                .or_default()
                .push(row as u32);
        }
    }
    let opts = fit_options(ctx.config);
    let mut out = PairScores::new();
    for (pt, u_pt) in p.score_points().iter().zip(u) {
        let role = p.segments[pt.segment].role.as_str();
        let Some(docs_rows) = need.get(role) else {
            continue;
        };
        let ms: Vec<usize> = docs_rows.keys().copied().collect();
        let docs: Vec<PreparedDoc> = ms.iter().map(|&m| roles[role].docs[m].clone()).collect();
        let model = load_model_on(&pt.model, backend.device(), ctx.config)?;
        let label = "per-token scores of generated tokens";
        for_each_batch(&model, &docs, &opts, label, |batch, idx| {
            let cap = model.capture(batch, Labels::Data)?;
            for (k, &i) in idx.iter().enumerate() {
                let (m, len) = (ms[i], batch.lengths[k]);
                let rows = &docs_rows[&m];
                let mask = cap.attention_mask.narrow(0, k, 1)?;
                let mut total: Option<Tensor> = None; // [R, 1, T]
                for (layer, ul) in cap.layers.iter().zip(u_pt) {
                    let sub = select(ul, rows)?;
                    let a = layer.a.narrow(0, k, 1)?;
                    let d = layer.delta.narrow(0, k, 1)?;
                    let s = backend.token_scores(&sub, &a, &d, &mask)?;
                    total = Some(match total {
                        None => s,
                        Some(t) => (t + s)?,
                    });
                }
                backend.release();
                let Some(total) = total else { continue };
                let v: Vec<Vec<Vec<f32>>> = total.to_vec3()?;
                for (r, &row) in rows.iter().enumerate() {
                    let e = out
                        .entry((part[row as usize], role.to_string(), m))
                        .or_insert_with(|| vec![0f32; len]);
                    for (x, y) in e.iter_mut().zip(&v[r][0][..len]) {
                        *x += y;
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// The queries `rows` of a layer's preconditioned queries, in the same form.
fn select(ul: &LayerQuery, rows: &[u32]) -> Result<LayerQuery> {
    Ok(match ul {
        LayerQuery::Dense(u) => {
            let idx = Tensor::new(rows, u.device())?;
            LayerQuery::Dense(u.index_select(&idx, 0)?.contiguous()?)
        }
        LayerQuery::LowRank(l) => {
            let idx = Tensor::new(rows, l.r.device())?;
            LayerQuery::LowRank(LowRankQuery {
                p_scaled: l.p_scaled.index_select(&idx, 0)?,
                r: l.r.index_select(&idx, 0)?,
                singular_values: rows
                    .iter()
                    .map(|&i| l.singular_values[i as usize].clone())
                    .collect(),
            })
        }
    })
}
