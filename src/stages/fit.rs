//! Owns the `fit` stage: EK-FAC factors per planned segment, from the factor cache or fitted.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! sibling `attribute`.
//!
//! `fit`: EK-FAC factors per segment (docs/design.md §3): for each segment of the attribution plan,
//! covariances over its data at each of its checkpoints (averaged), one f64
//! eigendecomposition, and the eigenvalue correction Λ per checkpoint in that basis
//! (averaged). Writes `fit/segment-K.safetensors` and `fit/plan.json`. With
//! `[attribution] factor_cache`, a segment whose inputs were fitted before (by any run) is
//! copied from the cache instead of fitted again. For Source, each segment's summary carries
//! `curvature_share`: the share of its curvature mass where s·σ·p > 1 (logged, and written
//! with the summary to `fit/acting.json`).

use serde_json::json;

use candle_core::Device;

use crate::attribution::acting::{curvature_mass, share};
use crate::attribution::method::segment_p_bar;
use crate::attribution::plan::{AttributionPlan, PlannedSegment};
use crate::config::Config;
use crate::config::MethodKind;
use crate::curvature::{
    checkpoint_hash, docs_hash, factor_key, fit_factors_on, save_factors, FactorCache, FactorFile,
    Lookup,
};
use crate::data::PreparedDoc;
use crate::error::{IoContext, Result};
use crate::pipeline::{Stage, StageContext};
use crate::util::fsx::write_json_atomic;

use super::attribute::{
    check_memory, device_view, fit_options, layers_view, load_model_on, open_backend, plan,
    role_docs,
};

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

    /// The queries are not read here: new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("prepare", "query.parquet")]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({
            "method": c.attribution.method, "fisher": c.attribution.fisher,
            "block_size": c.attribution.block_size, "seed": c.run.seed,
            "batching": c.batching,
        });
        device_view(c, &mut v);
        layers_view(c, &mut v);
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        write_json_atomic(&ctx.out("plan.json"), &p)?;
        if !p.needs_factors() {
            tracing::info!("fit: method gradient_dot needs no curvature");
            return Ok(json!({"segments": 0}));
        }
        let mut opts = fit_options(ctx.config);
        // The covariance pass keeps its captures for Λ in an unnamed file here.
        opts.capture_dir = Some(ctx.out_dir.clone());
        let backend = open_backend(ctx.config)?;
        let cache = ctx
            .config
            .attribution
            .factor_cache
            .as_deref()
            .map(FactorCache::new);
        let mut summary = Vec::new();
        // A sharded fit's merged bases and Λ shards (`merge fit`), assembled instead of fitted.
        let sharded = super::fit_shard::merged_shards(ctx)?;
        for (k, seg) in p.segments.iter().enumerate() {
            crate::util::progress::set_part(format!("segment {}/{}", k + 1, p.segments.len()));
            let docs = role_docs(ctx.run, &seg.role)?;
            let out = ctx.out(format!("segment-{}.safetensors", seg.index));
            let inputs = key_inputs(ctx.config, seg, &docs)?;
            let key = factor_key(&inputs);
            let what = format!("segment {} (`{}`)", seg.index, seg.stage);
            if let Some(m) = &sharded {
                let (cov, lam) = m.counts();
                tracing::info!("fit: {what}: factors merged from {cov} + {lam} shards");
                let factors = m.factors(seg)?;
                let shards = json!({"covariance": cov, "lambda": lam});
                let info = json!({"cache_key": key, "inputs": inputs, "shards": shards});
                save_factors(&out, &factors, &info)?;
                let share = curvature_share(ctx, &p, seg, &out)?;
                summary.push(json!({
                    "segment": seg.index, "stage": seg.stage, "role": seg.role,
                    "documents": docs.len(), "checkpoints": seg.checkpoints.len(),
                    "layers": factors.len(), "cache_key": key, "reused": false,
                    "shards": shards, "curvature_share": share,
                }));
                continue;
            }
            if let Some(cache) = &cache {
                match cache.lookup(&key)? {
                    Lookup::Hit(file) => {
                        std::fs::copy(&file, &out).ctx("copying cached factors", &file)?;
                        tracing::info!(
                            "fit: {what}: factors reused from the cache ({}), no fit pass",
                            cache.entry_dir(&key).display()
                        );
                        let share = curvature_share(ctx, &p, seg, &out)?;
                        summary.push(json!({
                            "segment": seg.index, "stage": seg.stage, "role": seg.role,
                            "documents": docs.len(), "checkpoints": seg.checkpoints.len(),
                            "cache_key": key, "reused": true, "curvature_share": share,
                        }));
                        continue;
                    }
                    Lookup::Corrupt(why) => tracing::warn!(
                        "fit: {what}: the cache entry {} is corrupt ({why}); removed, fitting again",
                        cache.entry_dir(&key).display()
                    ),
                    Lookup::OtherFormat(why) => tracing::warn!(
                        "fit: {what}: the cache entry {} is not used ({why}); removed, fitting \
                         again and storing this build's format in its place",
                        cache.entry_dir(&key).display()
                    ),
                    Lookup::Miss => {}
                }
            }
            let models = seg
                .checkpoints
                .iter()
                .map(|c| load_model_on(c, backend.device(), ctx.config))
                .collect::<Result<Vec<_>>>()?;
            let estimate = check_memory("fit", &models[0], ctx.config)?;
            tracing::info!(
                "fit: {what}: {} documents of `{}`, {} checkpoint(s), on {}",
                docs.len(),
                seg.role,
                models.len(),
                backend.name()
            );
            let refs: Vec<&_> = models.iter().collect();
            let factors = fit_factors_on(backend.as_ref(), &refs, &docs, &opts, &what)?;
            let layers = factors.len();
            // Only what determines the factors (no segment index or run-directory paths),
            // so that the same inputs give the same bytes in every run and cache entry.
            let info = json!({"cache_key": key, "inputs": inputs});
            save_factors(&out, &factors, &info)?;
            if let Some(cache) = &cache {
                let stored = cache.store(&key, &out, &inputs)?;
                tracing::info!(
                    "fit: {what}: factors stored in the cache ({})",
                    stored.display()
                );
            }
            ctx.failpoint(&format!("after-segment-{}", seg.index))?;
            drop(factors);
            let share = curvature_share(ctx, &p, seg, &out)?;
            summary.push(json!({
                "segment": seg.index, "stage": seg.stage, "role": seg.role,
                "documents": docs.len(), "checkpoints": seg.checkpoints.len(),
                "layers": layers, "estimated_peak_bytes": estimate,
                "cache_key": key, "reused": false, "device": backend.name(),
                "curvature_share": share,
            }));
        }
        let summary = json!({ "segments": summary });
        // What `score` and the report read back (the segments with their curvature_share).
        write_json_atomic(&ctx.out("acting.json"), &summary)?;
        Ok(summary)
    }
}

/// The share of segment `seg`'s curvature mass where it acts, Σ_{sσp > 1} Λ / Σ Λ
/// ([`crate::attribution::acting`]), from its factor file `path`, one layer at a time (with
/// Adam's p̄ for an AdamW segment); logged. None for a method other than Source.
fn curvature_share(
    ctx: &StageContext,
    p: &AttributionPlan,
    seg: &PlannedSegment,
    path: &std::path::Path,
) -> Result<Option<f64>> {
    if p.method != MethodKind::Source {
        return Ok(None);
    }
    let file = FactorFile::open(path)?;
    let names: Vec<String> = file.layer_names().map(String::from).collect();
    let (mut a, mut b) = (0f64, 0f64);
    for name in names {
        let f = file.load_layers(std::slice::from_ref(&name), &Device::Cpu)?;
        let pbar = segment_p_bar(seg, &f, ctx.config.attribution.adam_response)?;
        let (x, y) = curvature_mass(&f, seg.mass, pbar.as_deref())?;
        (a, b) = (a + x, b + y);
    }
    let s = share((a, b));
    tracing::info!(
        "fit: segment {} (`{}`): curvature acts (s·σ·p > 1) on {:.2}% of its curvature mass",
        seg.index,
        seg.stage,
        100.0 * s
    );
    Ok(Some(s))
}

/// Everything that determines a segment's factors: the checkpoints' weights, the documents
/// (token ids and masks, in order), the Fisher (and the seed of its sampled labels), the
/// block size, the batching (it changes the summation order), the padding token and the tool
/// version. Its sha256 is the factor cache's key.
fn key_inputs(
    config: &Config,
    seg: &PlannedSegment,
    docs: &[PreparedDoc],
) -> Result<serde_json::Value> {
    let a = &config.attribution;
    let opts = fit_options(config);
    let mut key = json!({
        "format": "source-tda factors 1",
        "tool_version": crate::VERSION,
        "checkpoints": seg.checkpoints.iter().map(|c| checkpoint_hash(c)).collect::<Result<Vec<_>>>()?,
        "documents": docs_hash(docs),
        "n_documents": docs.len(),
        "fisher": a.fisher,
        "seed": matches!(a.fisher, crate::config::FisherKind::True).then_some(config.run.seed),
        "block_size": a.block_size,
        "token_budget": opts.token_budget,
        "max_batch_size": opts.max_batch_size,
        "pad_id": opts.pad_id,
    });
    // The device and precision change the summation order and rounding of the factors.
    device_view(config, &mut key);
    layers_view(config, &mut key);
    // So does an f32 eigendecomposition (absent from the key when f64, as before the option).
    if !a.eigendecomposition.is_default() {
        key["eigendecomposition"] = json!(a.eigendecomposition.name());
    }
    Ok(key)
}
