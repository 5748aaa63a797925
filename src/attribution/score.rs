//! Owns query gradients (`query_gradients`) and the scoring pass (`score_pass*`, `TrainScores`).
//! Layer: attribution — may import every floor from the ground up to curvature; no sibling.
//!
//! Query gradients and the training pass that scores documents against preconditioned
//! queries, per document, per layer and per token, in one pass (docs/design.md §2).

use candle_core::{DType, Tensor, D};

use crate::backend::{Backend, CpuBackend};
use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::linalg::{LayerQuery, TokenFactors};
use crate::model::{Labels, Model};
use crate::passes::{for_each_batch, PassOptions};
use crate::util::phase;

/// Per-layer query gradients ∇_W f(q) = Σ_t δ_t a_tᵀ, each [Q, d_out, d_in] in query order,
/// the same gradients as their token factors (Δ, A), and the measurements
/// f(q) = −log p(completion | prompt).
#[derive(Debug, Clone)]
pub struct QueryGradients {
    /// One tensor per tracked layer: [Q, d_out, d_in(+1)].
    pub layers: Vec<Tensor>,
    /// Per tracked layer, Δ [Q, T, d_out] and A [Q, T, d_in(+1)] with T the longest query
    /// (rows past a query's length are zero): `layers[l] = Δᵀ A` per query.
    pub factors: Vec<TokenFactors>,
    /// f(q) per query.
    pub measurements: Vec<f32>,
}

/// Computes the query gradients at `model` (the data labels: the query measurement).
pub fn query_gradients(
    model: &Model,
    queries: &[PreparedDoc],
    opts: &PassOptions,
) -> Result<QueryGradients> {
    let q = queries.len();
    let n_layers = model.tracked_layers().len();
    let mut parts: Vec<Vec<(usize, Tensor)>> = vec![Vec::new(); n_layers];
    // Per layer, (query, δ rows, a rows) of the query's own tokens.
    let mut rows: Vec<Vec<(usize, Tensor, Tensor)>> = vec![Vec::new(); n_layers];
    let mut measurements = vec![0f32; q];
    for_each_batch(model, queries, opts, "queries", |batch, idx| {
        let _t = phase::timer("query gradients");
        let cap = model.capture(batch, Labels::Data)?;
        for (k, &i) in idx.iter().enumerate() {
            measurements[i] = cap.losses[k];
        }
        for (l, layer) in cap.layers.iter().enumerate() {
            // [B, d_out, T] × [B, T, d_in] → [B, d_out, d_in]
            let g = layer
                .delta
                .transpose(1, 2)?
                .contiguous()?
                .matmul(&layer.a.contiguous()?)?;
            for (k, &i) in idx.iter().enumerate() {
                parts[l].push((i, g.get(k)?));
                // Padding sits after a document's tokens, and its a and δ are zero.
                let n = queries[i].n_tokens();
                rows[l].push((
                    i,
                    layer.delta.get(k)?.narrow(0, 0, n)?.to_dtype(DType::F32)?,
                    layer.a.get(k)?.narrow(0, 0, n)?.to_dtype(DType::F32)?,
                ));
            }
        }
        Ok(())
    })?;
    let layers = parts
        .into_iter()
        .map(|mut p| {
            p.sort_by_key(|(i, _)| *i);
            let ts: Vec<Tensor> = p.into_iter().map(|(_, t)| t).collect();
            Ok(Tensor::stack(&ts, 0)?)
        })
        .collect::<Result<_>>()?;
    let t_max = queries.iter().map(|d| d.n_tokens()).max().unwrap_or(0);
    let factors = rows
        .into_iter()
        .map(|mut r| {
            r.sort_by_key(|(i, _, _)| *i);
            let pad = |t: &Tensor| -> Result<Tensor> {
                let n = t.dim(0)?;
                Ok(if n < t_max {
                    t.pad_with_zeros(0, 0, t_max - n)?
                } else {
                    t.clone()
                })
            };
            let (d, a): (Vec<Tensor>, Vec<Tensor>) = r
                .iter()
                .map(|(_, d, a)| Ok((pad(d)?, pad(a)?)))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            TokenFactors::new(Tensor::stack(&d, 0)?, Tensor::stack(&a, 0)?)
        })
        .collect::<Result<_>>()?;
    Ok(QueryGradients {
        layers,
        factors,
        measurements,
    })
}

/// Scores of every training document against every query.
#[derive(Debug, Clone)]
pub struct TrainScores {
    /// ⟨U_q, G_m⟩ summed over layers: `[Q][N]` (f64 sums of f32 terms).
    pub docs: Vec<Vec<f64>>,
    /// The same per layer: `[L][Q][N]` (empty when not asked, [`ScoreParts::per_layer`]).
    pub per_layer: Vec<Vec<Vec<f64>>>,
    /// Per-token scores δ_tᵀ U_q a_t summed over layers, when asked: `[N][Q][T_m]`, where
    /// T_m is document m's length.
    pub tokens: Option<Vec<Vec<Vec<f32>>>>,
}

/// Runs `model` over `train` and contracts each batch's (a, δ) with the preconditioned
/// queries `u` (per layer [Q, d_out, d_in]); per-token gradients are never formed.
pub fn score_pass(
    model: &Model,
    train: &[PreparedDoc],
    u: &[Tensor],
    opts: &PassOptions,
    keep_tokens: bool,
) -> Result<TrainScores> {
    let forms: Vec<LayerQuery> = u.iter().cloned().map(LayerQuery::Dense).collect();
    score_pass_queries(model, train, &forms, opts, keep_tokens)
}

/// [`score_pass`] with each layer's query in either form (dense U, or its truncated SVD).
pub fn score_pass_queries(
    model: &Model,
    train: &[PreparedDoc],
    u: &[LayerQuery],
    opts: &PassOptions,
    keep_tokens: bool,
) -> Result<TrainScores> {
    score_pass_on(&CpuBackend::new(), model, train, u, opts, keep_tokens)
}

/// [`score_pass_queries`] with the token contraction done by `backend` (the model loaded on
/// its device), per layer as well.
pub fn score_pass_on(
    backend: &dyn Backend,
    model: &Model,
    train: &[PreparedDoc],
    u: &[LayerQuery],
    opts: &PassOptions,
    keep_tokens: bool,
) -> Result<TrainScores> {
    let parts = ScoreParts {
        tokens: keep_tokens,
        per_layer: true,
    };
    score_pass_parts(backend, model, train, u, opts, parts)
}

/// What a scoring pass keeps beside the document scores [Q][N].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreParts {
    /// Per-token scores of every document ([N][Q][T_m]).
    pub tokens: bool,
    /// Per-layer document scores ([L][Q][N], 8·L·Q bytes per document).
    pub per_layer: bool,
}

/// [`score_pass_on`] keeping only `parts`: the stage keeps neither per-layer scores nor, for
/// most documents, per-token scores, so that its memory per document is the Q document
/// scores. The document scores are the same f64 sums either way (layer by layer in order).
pub fn score_pass_parts(
    backend: &dyn Backend,
    model: &Model,
    train: &[PreparedDoc],
    u: &[LayerQuery],
    opts: &PassOptions,
    parts: ScoreParts,
) -> Result<TrainScores> {
    let out = score_pass_inner(backend, model, train, u, opts, parts);
    backend.release();
    out
}

/// The queries `u` are one per tracked layer of `model`, each of its layer's shape: a
/// model with other tracked layers (e.g. a LoRA run's base model without its adapter) would
/// otherwise be contracted layer by layer with the wrong queries, silently where the products
/// of the dimensions agree.
fn check_layers(model: &Model, u: &[LayerQuery]) -> Result<()> {
    let layers = model.tracked_layers();
    let mismatch = |what: String| {
        Error::Pipeline(format!(
            "scoring: the model tracks {} layers and the preconditioned queries are for {}: \
             {what}; the model scored at must be the one the queries were formed for (same \
             `[attribution] layers`, same adapter)",
            layers.len(),
            u.len()
        ))
    };
    if layers.len() != u.len() {
        return Err(mismatch("the counts differ".into()));
    }
    for (info, ul) in layers.iter().zip(u) {
        if let LayerQuery::Dense(t) = ul {
            let (_, d_out, d_in) = t.dims3()?;
            let want = (info.d_out, info.d_in + usize::from(info.has_bias));
            if (d_out, d_in) != want {
                return Err(mismatch(format!(
                    "layer `{}` is {want:?}, its query {:?}",
                    info.name,
                    (d_out, d_in)
                )));
            }
        }
    }
    Ok(())
}

fn score_pass_inner(
    backend: &dyn Backend,
    model: &Model,
    train: &[PreparedDoc],
    u: &[LayerQuery],
    opts: &PassOptions,
    parts: ScoreParts,
) -> Result<TrainScores> {
    let keep_tokens = parts.tokens;
    check_layers(model, u)?;
    let u: Vec<LayerQuery> = u
        .iter()
        .map(LayerQuery::contiguous)
        .collect::<Result<_>>()?;
    let n = train.len();
    let q = u.first().map(|t| t.queries()).transpose()?.unwrap_or(0);
    let mut docs = vec![vec![0f64; n]; q];
    let mut per_layer = if parts.per_layer {
        vec![vec![vec![0f64; n]; q]; u.len()]
    } else {
        Vec::new()
    };
    let mut tokens: Option<Vec<Vec<Vec<f32>>>> = keep_tokens.then(|| vec![Vec::new(); n]);
    for_each_batch(model, train, opts, "scoring", |batch, idx| {
        let cap = {
            let _t = phase::timer("score: capture");
            model.capture(batch, Labels::Data)?
        };
        let _t = phase::timer("score: contraction");
        let mut total: Option<Tensor> = None;
        for (l, (layer, ul)) in cap.layers.iter().zip(&u).enumerate() {
            // Per token only when asked: per document is (T + Q)/(T·Q) of the work.
            let s: Option<Tensor> = keep_tokens // [Q, B, T]
                .then(|| backend.token_scores(ul, &layer.a, &layer.delta, &cap.attention_mask))
                .transpose()?;
            let per_doc: Vec<Vec<f32>> = match &s {
                Some(s) => s.sum(D::Minus1)?.to_vec2()?,
                None => backend
                    .doc_scores(ul, &layer.a, &layer.delta, &cap.attention_mask)?
                    .to_vec2()?,
            };
            // Each document is in one batch: its sum over layers, in layer order, is the
            // same whether or not the per-layer values are kept.
            for (qi, row) in per_doc.iter().enumerate() {
                for (k, &i) in idx.iter().enumerate() {
                    docs[qi][i] += row[k] as f64;
                    if let Some(pl) = per_layer.get_mut(l) {
                        pl[qi][i] += row[k] as f64;
                    }
                }
            }
            if let Some(s) = s {
                total = Some(match total {
                    None => s,
                    Some(t) => (t + s)?,
                });
            }
        }
        if let Some(tok) = tokens.as_mut() {
            if let Some(total) = total {
                let all: Vec<Vec<Vec<f32>>> = total.to_vec3()?; // [Q][B][T]
                for (k, &i) in idx.iter().enumerate() {
                    let len = batch.lengths[k];
                    tok[i] = all.iter().map(|qrow| qrow[k][..len].to_vec()).collect();
                }
            }
        }
        Ok(())
    })?;
    Ok(TrainScores {
        docs,
        per_layer,
        tokens,
    })
}
