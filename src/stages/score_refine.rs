//! Owns the score stage's refined influence query: `refined_influence`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `attribute`.
//!
//! With `[attribution] refine` and the influence function, u = (G + λ)⁻¹ v by conjugate
//! gradients with exact Gauss–Newton products at the final model over a seeded sample of the
//! fine-tuning documents, preconditioned by EK-FAC's (H̄ + λ)⁻¹ and started at its answer
//! (docs/design.md §9). Writes `score/refine.json` (settings, λ per layer, every query's
//! residual after each iteration, products and seconds) and `score/refined_queries.safetensors`
//! (u per layer [Q, d_out, d_in(+1)]), and logs the residuals.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::attribution::plan::AttributionPlan;
use crate::attribution::{layer_dampings, refine_inverse, Damping, GaussNewtonSample, OnBackend};
use crate::backend::Backend;
use crate::config::{MethodKind, RefineMethod};
use crate::curvature::FactorFile;
use crate::error::Result;
use crate::linalg::{CgOptions, TokenFactors};
use crate::model::Model;
use crate::pipeline::StageContext;

use super::attribute::{fit_options, role_docs};

/// The refined u of the influence function's one scoring point (per layer) with G at `model`
/// (the final checkpoint), started at EK-FAC's answer from the query's token factors
/// `tokens` when given (as the unrefined influence function computes it), or None when
/// refinement is off or does not apply (then a note is logged for Source).
#[allow(clippy::too_many_arguments)]
pub(super) fn refined_influence(
    ctx: &StageContext,
    p: &AttributionPlan,
    model: &Model,
    files: &[FactorFile],
    v: &[Tensor],
    tokens: Option<&[TokenFactors]>,
    layers: &[String],
    backend: &dyn Backend,
) -> Result<Option<Vec<Tensor>>> {
    let a = &ctx.config.attribution;
    let Some(cfg) = a.refine else {
        return Ok(None);
    };
    match p.method {
        MethodKind::Influence => {}
        MethodKind::Source => {
            tracing::warn!(
                "score: `[attribution] refine` applies to the influence function only; Source's \
                 segment functions use EK-FAC as they are (docs/design.md §9)"
            );
            return Ok(None);
        }
        MethodKind::GradientDot => return Ok(None),
    }
    let RefineMethod::Cg = cfg.method;
    let started = Instant::now();
    let docs = role_docs(ctx.run, &p.segments[0].role)?;
    let opts = fit_options(ctx.config);
    let ggn = GaussNewtonSample::new(model, &docs, cfg.documents, ctx.config.run.seed, &opts)?;
    let factors = files[0].load_layers(layers, &Device::Cpu)?;
    let damping = match a.damping {
        Some(d) => Damping::Absolute(d),
        None => Damping::MeanLambda(a.damping_factor),
    };
    let lambdas = layer_dampings(&factors, damping)?;
    let on = OnBackend {
        factors: &factors,
        backend,
    };
    let q = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
    tracing::info!(
        "score: refining {q} influence queries by conjugate gradients (at most {} Gauss–Newton \
         products each over {} of {} documents, tolerance {:e})",
        cfg.iterations,
        ggn.len(),
        docs.len(),
        cfg.tolerance
    );
    let out = refine_inverse(
        &on,
        &lambdas,
        damping,
        &ggn,
        v,
        tokens,
        CgOptions {
            iterations: cfg.iterations,
            tolerance: cfg.tolerance,
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let finals: Vec<f64> = out
        .residuals
        .iter()
        .filter_map(|r| r.last().copied())
        .collect();
    let first: Vec<f64> = out
        .residuals
        .iter()
        .filter_map(|r| r.first().copied())
        .collect();
    let iterations: Vec<usize> = out
        .residuals
        .iter()
        .map(|r| r.len().saturating_sub(1))
        .collect();
    let worst = finals.iter().copied().fold(0.0, f64::max);
    tracing::info!(
        "score: refined in {seconds:.1} s ({:.2} s per query, {} products): relative residual \
         at EK-FAC's answer {} → {} (largest {worst:.3e}), iterations {iterations:?}",
        seconds / q.max(1) as f64,
        out.products,
        list(&first),
        list(&finals),
    );
    crate::util::fsx::write_json_atomic(
        &ctx.out("refine.json"),
        &json!({
            "method": "cg", "iterations": cfg.iterations, "tolerance": cfg.tolerance,
            "documents": ggn.len(), "documents_available": docs.len(),
            "layer_damping": lambdas, "products": out.products, "seconds": seconds,
            "seconds_per_query": seconds / q.max(1) as f64,
            "final_residual_max": worst, "iterations_run": iterations,
            "residuals": out.residuals,
        }),
    )?;
    let entries: Vec<(String, Tensor)> = layers.iter().cloned().zip(out.x.clone()).collect();
    crate::util::tensors::save_tensors(
        &ctx.out("refined_queries.safetensors"),
        &entries,
        HashMap::new(),
    )?;
    Ok(Some(out.x))
}

/// "[0.12, 3.4e-3]": values to 3 significant digits.
fn list(xs: &[f64]) -> String {
    let parts: Vec<String> = xs.iter().map(|&x| crate::util::num::sig(x, 3)).collect();
    format!("[{}]", parts.join(", "))
}
