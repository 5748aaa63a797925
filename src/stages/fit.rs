//! `fit`: EK-FAC factors per segment (DESIGN.md §3): for each segment of the attribution plan,
//! covariances over its data at each of its checkpoints (averaged), one f64
//! eigendecomposition, and the eigenvalue correction Λ per checkpoint in that basis
//! (averaged). Writes `fit/segment-K.safetensors` and `fit/plan.json`.

use serde_json::json;

use crate::config::Config;
use crate::curvature::{fit_factors, save_factors};
use crate::error::Result;
use crate::pipeline::{Stage, StageContext};
use crate::util::fsx::write_json_atomic;

use super::attribute::{check_memory, fit_options, load_model, plan, role_docs};

/// The `fit` stage.
pub struct FitStage;

impl Stage for FitStage {
    fn name(&self) -> &'static str {
        "fit"
    }

    fn describe(&self) -> &'static str {
        "fit EK-FAC curvature per segment (covariances, eigenbasis, eigenvalue correction)"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["prepare", "finetune"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        json!({
            "method": c.attribution.method, "fisher": c.attribution.fisher,
            "block_size": c.attribution.block_size, "seed": c.run.seed,
            "batching": c.batching,
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        write_json_atomic(&ctx.out("plan.json"), &p)?;
        if !p.needs_factors() {
            tracing::info!("fit: method gradient_dot needs no curvature");
            return Ok(json!({"segments": 0}));
        }
        let opts = fit_options(ctx.config);
        let mut summary = Vec::new();
        for seg in &p.segments {
            let docs = role_docs(ctx.run, &seg.role)?;
            let models = seg
                .checkpoints
                .iter()
                .map(|c| load_model(c))
                .collect::<Result<Vec<_>>>()?;
            let estimate = check_memory("fit", &models[0], ctx.config)?;
            tracing::info!(
                "fit: segment {} (`{}`): {} documents of `{}`, {} checkpoint(s)",
                seg.index,
                seg.stage,
                docs.len(),
                seg.role,
                models.len()
            );
            let refs: Vec<&_> = models.iter().collect();
            let what = format!("segment {} (`{}`)", seg.index, seg.stage);
            let factors = fit_factors(&refs, &docs, &opts, &what)?;
            let info = json!({
                "segment": seg.index, "stage": seg.stage, "role": seg.role,
                "n_docs": seg.n_docs, "checkpoints": seg.checkpoints,
                "fisher": ctx.config.attribution.fisher,
            });
            save_factors(
                &ctx.out(format!("segment-{}.safetensors", seg.index)),
                &factors,
                &info,
            )?;
            ctx.failpoint(&format!("after-segment-{}", seg.index))?;
            summary.push(json!({
                "segment": seg.index, "stage": seg.stage, "role": seg.role,
                "documents": docs.len(), "checkpoints": seg.checkpoints.len(),
                "layers": factors.len(), "estimated_peak_bytes": estimate,
            }));
        }
        Ok(json!({ "segments": summary }))
    }
}
