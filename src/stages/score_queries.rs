//! Owns the score stage's query side: the query stage's gradients read back (dense and as
//! token factors) and preconditioned per segment ([`Queries`]).
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `score_acting`, `score_refine`.
//!
//! u_ℓ for every scoring pass (docs/design.md §2): the influence function's inverse, the Source
//! walk, or (with `[attribution] refine`) the refined inverse, in the form `[attribution]
//! query_rank` asks for, under the memory plan that decides how many layers' factors are
//! read at once.

use candle_core::{Device, Tensor};

use crate::attribution::method::{preconditioned, query_forms};
use crate::attribution::plan::{plan_score_memory, AttributionPlan, FactorGroups, ScoreNeeds};
use crate::backend::Backend;
use crate::config::MethodKind;
use crate::curvature::FactorFile;
use crate::error::{Error, IoContext, Result};
use crate::linalg::{LayerQuery, TokenFactors};
use crate::pipeline::StageContext;

use super::attribute::{load_model, model_and_batch_bytes, open_backend};
use super::score_acting::query_energy_shares;
use super::score_refine::refined_influence;

/// The preconditioned queries in the form the scoring pass contracts with, the backend that
/// computed them (and runs the scoring passes), and the memory plan they were computed under.
pub(super) struct Queries {
    /// Q.
    pub(super) q: usize,
    /// u per scoring pass ([`AttributionPlan::score_points`]) and layer.
    pub(super) u: Vec<Vec<LayerQuery>>,
    /// The mean fraction of ‖u‖² a low-rank form kept.
    pub(super) kept_energy: Option<f64>,
    pub(super) backend: Box<dyn Backend>,
    /// Per segment, the share of the queries' gradient energy where curvature acts (Source).
    pub(super) acting: Vec<Option<f64>>,
    /// The estimated peak, the needs it came from and the layer groups.
    pub(super) estimate: u64,
    pub(super) needs: ScoreNeeds,
    pub(super) groups: FactorGroups,
}

/// Query gradients written by the `query` stage, per layer in `layers` order.
fn load_query_gradients(ctx: &StageContext, layers: &[String]) -> Result<Vec<Tensor>> {
    load_gradients(
        &ctx.input_dir("query").join("gradients.safetensors"),
        layers,
    )
}

/// Per-layer gradients [K, d_out, d_in(+1)] stored by name in `path` (the query stage's
/// query or generated-token gradients), in `layers` order.
pub(super) fn load_gradients(path: &std::path::Path, layers: &[String]) -> Result<Vec<Tensor>> {
    let bytes = std::fs::read(path).ctx("reading", path)?;
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    layers
        .iter()
        .map(|l| {
            map.get(l).cloned().ok_or_else(|| {
                Error::Pipeline(format!(
                    "{}: no gradient for layer `{l}`; rerun the query stage",
                    path.display()
                ))
            })
        })
        .collect()
}

/// The query gradients as token factors (`query/token_factors.safetensors`), per layer; None
/// for a query stage that wrote none.
fn load_query_factors(ctx: &StageContext, layers: &[String]) -> Result<Option<Vec<TokenFactors>>> {
    let path = ctx.input_dir("query").join("token_factors.safetensors");
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).ctx("reading", &path)?;
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let get = |k: String| {
        map.get(&k).cloned().ok_or_else(|| {
            Error::Pipeline(format!(
                "{}: no tensor `{k}`; rerun the query stage",
                path.display()
            ))
        })
    };
    layers
        .iter()
        .map(|l| TokenFactors::new(get(format!("delta.{l}"))?, get(format!("a.{l}"))?))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The fitted factor files of the plan's segments (none when the method needs no factors).
pub(super) fn open_factor_files(
    ctx: &StageContext,
    p: &AttributionPlan,
) -> Result<Vec<FactorFile>> {
    if !p.needs_factors() {
        return Ok(Vec::new());
    }
    p.segments
        .iter()
        .map(|s| {
            FactorFile::open(
                &ctx.run
                    .stage_dir("fit")
                    .join(format!("segment-{}.safetensors", s.index)),
            )
        })
        .collect()
}

/// Reads the query gradients, plans memory (refusing what does not fit), opens the backend,
/// and computes u per segment in the form `[attribution] query_rank` asks for.
pub(super) fn precondition_queries(ctx: &StageContext, p: &AttributionPlan) -> Result<Queries> {
    let final_model = load_model(&p.final_checkpoint, ctx.config)?;
    let layers: Vec<String> = final_model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let v = load_query_gradients(ctx, &layers)?;
    let q = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    let files = open_factor_files(ctx, p)?;
    let needs = ScoreNeeds::of(&files, &layers, &v, p.score_points().len())?;
    let (estimate, groups) = plan_score_memory(
        model_and_batch_bytes(&final_model, ctx.config),
        ctx.config.attribution.memory_limit_gib,
        &layers,
        &needs,
    )?;
    let acting = query_energy_shares(ctx, p, &files, &v, &layers, &groups)?;
    let backend = open_backend(ctx.config)?;
    let a = &ctx.config.attribution;
    // Only the influence function's inverse (refined or not) reads the token factors.
    let tokens = match p.method {
        MethodKind::Influence => load_query_factors(ctx, &layers)?,
        MethodKind::Source | MethodKind::GradientDot => None,
    };
    let tokens = tokens.as_deref();
    let refined = refined_influence(
        ctx,
        p,
        &final_model,
        &files,
        &v,
        tokens,
        &layers,
        backend.as_ref(),
    )?;
    drop(final_model);
    let u = match refined {
        Some(u) => vec![u],
        None => preconditioned(a, backend.as_ref(), p, &files, &v, tokens, &layers, &groups)?,
    };
    drop(files);
    let (u, kept_energy) = query_forms(u, a.query_rank)?;
    if let (Some(r), Some(e)) = (a.query_rank, kept_energy) {
        tracing::info!(
            "score: preconditioned queries in rank-{r} form ({:.4}% of ‖u‖² kept on average)",
            100.0 * e
        );
    }
    Ok(Queries {
        q,
        u,
        kept_energy,
        acting,
        backend,
        estimate,
        needs,
        groups,
    })
}
