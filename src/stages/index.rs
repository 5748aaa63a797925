//! Owns the `index` stage: the candidate index of sketched document gradients.
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `attribute`.
//!
//! `index` (run once per fine-tuned run, before any query set is scored with
//! `[attribution.candidates]`): at every scoring model x_p of the attribution plan, each
//! document's gradient over every tracked layer count-sketched to D numbers,
//! row_p(m) = ŝ(W ⊙ Q_Sᵀ G(m; x_p) Q_A), whitened in the segment's EK-FAC eigenbasis
//! ([`crate::attribution::index`]). Writes `index/point-PPP.f32` (N × D f32 per
//! scoring model, the rows of that model's segment's data role in document order) and
//! `index/index.json` (layout, seed, checksums, the fit it whitened with). It does not read
//! the queries, so new query sets reuse it.

use serde_json::json;

use crate::attribution::index::{
    choose_exact, sketch_layers, sketches, write_point, IndexHeader, IndexPoint, Whitening,
    INDEX_FORMAT,
};
use crate::attribution::method::preconditioned;
use crate::attribution::plan::{plan_score_memory, AttributionPlan, ScoreNeeds};
use crate::attribution::query_gradients;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pipeline::{Stage, StageContext};
use crate::util::fsx::write_json_atomic;

use super::attribute::{
    fit_options, layers_view, load_model, model_and_batch_bytes, model_shapes, open_backend, plan,
    role_docs,
};
use super::score_queries::open_factor_files;

/// The `index` stage.
pub struct IndexStage;

/// How a scoring model is named in index.json: relative to the run directory when inside it.
pub(super) fn point_name(ctx: &StageContext, model: &std::path::Path) -> String {
    model
        .strip_prefix(ctx.run.path())
        .unwrap_or(model)
        .display()
        .to_string()
}

/// Training documents taken as queries to measure the preconditioned queries' energy per
/// eigenbasis coordinate: a typical query set's size, so that the walk's memory is a query
/// set's.
const PSEUDO_QUERIES: usize = 8;

/// Per scoring model and tracked layer, the whitening W² = √(c / Λ) of the index
/// ([`Whitening::from_energies`]): c measured on [`PSEUDO_QUERIES`] training documents (evenly
/// spaced) preconditioned exactly as `score` preconditions queries, with the `exact`
/// coordinates of largest √(c Λ) kept exactly ([`choose_exact`]); None for the gradient dot
/// product.
fn measure_whitening(
    ctx: &StageContext,
    p: &AttributionPlan,
    exact: usize,
) -> Result<Option<Vec<Vec<Whitening>>>> {
    if !p.needs_factors() {
        return Ok(None);
    }
    let model = load_model(&p.final_checkpoint, ctx.config)?;
    let layers: Vec<String> = model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let train = role_docs(ctx.run, "train")?;
    let k = PSEUDO_QUERIES.min(train.len()).max(1);
    let sample: Vec<_> = (0..k).map(|i| train[i * train.len() / k].clone()).collect();
    let v = query_gradients(&model, &sample, &fit_options(ctx.config))?.layers;
    let files = open_factor_files(ctx, p)?;
    let points = p.score_points();
    let needs = ScoreNeeds::of(&files, &layers, &v, points.len())?;
    let (_, groups) = plan_score_memory(
        model_and_batch_bytes(&model, ctx.config),
        ctx.config.attribution.memory_limit_gib,
        &layers,
        &needs,
    )?;
    drop(model);
    let backend = open_backend(ctx.config)?;
    let a = &ctx.config.attribution;
    let u = preconditioned(a, backend.as_ref(), p, &files, &v, None, &layers, &groups)?;
    let mut out = Vec::with_capacity(points.len());
    let mut factors: Option<(usize, Vec<crate::linalg::LayerFactors>)> = None;
    for (pt, u_pt) in points.iter().zip(&u) {
        if factors.as_ref().map(|(s, _)| *s) != Some(pt.segment) {
            let f = files[pt.segment].load_layers(&layers, &candle_core::Device::Cpu)?;
            factors = Some((pt.segment, f));
        }
        let f = &factors.as_ref().expect("loaded above").1;
        let mut w = Vec::with_capacity(f.len());
        let mut energy = Vec::with_capacity(f.len());
        for (lf, ul) in f.iter().zip(u_pt) {
            // c = mean over the pseudo-queries of (Q_Sᵀ U Q_A)².
            let u = ul
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            let c = lf.basis.rotate(&u)?.sqr()?.mean(0)?;
            let lambda = lf.lambda.to_dtype(candle_core::DType::F32)?;
            energy.push((&c * &lambda)?.sqrt()?);
            w.push(Whitening::from_energies(lf.basis.clone(), &lf.lambda, &c)?);
        }
        let w = choose_exact(w, &energy, exact)?;
        out.push(w);
    }
    Ok(Some(out))
}

/// Writes one scoring model's whitening (`w.LAYER` per layer) to `path`; returns its SHA-256.
fn save_whitening(path: &std::path::Path, names: &[String], w: &[Whitening]) -> Result<String> {
    let mut map: std::collections::HashMap<String, candle_core::Tensor> = names
        .iter()
        .zip(w)
        .map(|(n, w)| (format!("w.{n}"), w.weights().clone()))
        .collect();
    for (n, w) in names.iter().zip(w) {
        if !w.exact().is_empty() {
            let e = candle_core::Tensor::new(w.exact(), &candle_core::Device::Cpu)?;
            map.insert(format!("exact.{n}"), e);
        }
    }
    candle_core::safetensors::save(&map, path)?;
    crate::util::hash::sha256_file(path)
}

/// The whitening of index point `pt` (None for raw gradients): W read from its file (checked
/// against its SHA-256), the eigenbasis from `factors`, its segment's fitted factors of the
/// layers `names`.
pub(super) fn load_whitening(
    ctx: &StageContext,
    pt: &IndexPoint,
    factors: &[crate::linalg::LayerFactors],
    names: &[String],
) -> Result<Option<Vec<Whitening>>> {
    let Some((file, sha)) = &pt.whitening else {
        return Ok(None);
    };
    let path = ctx.run.stage_dir("index").join(file);
    let got = crate::util::hash::sha256_file(&path)?;
    if &got != sha {
        return Err(Error::Pipeline(format!(
            "{}: SHA-256 {got} differs from index.json's {sha}; the file is damaged, rerun \
             the index stage",
            path.display()
        )));
    }
    if factors.len() != names.len() {
        return Err(Error::Pipeline(format!(
            "{}: {} layers, but {} layers' factors to whiten them with; rerun the index stage",
            path.display(),
            names.len(),
            factors.len()
        )));
    }
    let map = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let mut offset = 0;
    names
        .iter()
        .zip(factors)
        .map(|(n, f)| {
            let w = map.get(&format!("w.{n}")).cloned().ok_or_else(|| {
                Error::Pipeline(format!(
                    "{}: no tensor `w.{n}`; rerun the index stage",
                    path.display()
                ))
            })?;
            let exact: Vec<u32> = match map.get(&format!("exact.{n}")) {
                Some(e) => e.to_vec1()?,
                None => Vec::new(),
            };
            let k = exact.len();
            let wh = Whitening::new(f.basis.clone(), w)?.with_exact(exact, offset)?;
            offset += k;
            Ok(wh)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The `fit` stage's outputs hash (None before a fit completed).
pub(super) fn fit_outputs(ctx: &StageContext) -> Result<Option<String>> {
    Ok(ctx
        .run
        .manifest()?
        .stages
        .get("fit")
        .map(|r| r.outputs_hash()))
}

/// The `[attribution.candidates]` this stage and `score` read, or advice when it is unset.
fn candidates(c: &Config) -> Result<crate::config::CandidatesConfig> {
    c.attribution.candidates.ok_or_else(|| {
        Error::Pipeline(
            "the index stage sketches documents for `[attribution.candidates]`, which the \
             config does not set; add e.g. `candidates = { per_query = 100 }` under \
             [attribution], or leave `index` out of the pipeline's stages"
                .into(),
        )
    })
}

impl Stage for IndexStage {
    fn name(&self) -> &'static str {
        "index"
    }

    fn describe(&self) -> &'static str {
        "sketch every document's gradient at each scoring model, for candidate search"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["prepare", "finetune", "fit"]
    }

    /// The queries are not read here: new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("prepare", "query.parquet")]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let cand = c.attribution.candidates;
        let mut v = json!({
            "method": c.attribution.method, "batching": c.batching,
            "damping": c.attribution.damping, "damping_factor": c.attribution.damping_factor,
            "adam_response": c.attribution.adam_response,
            "dims": cand.map(|x| x.dims), "seed": cand.map(|x| x.seed),
        });
        layers_view(c, &mut v);
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let cand = candidates(ctx.config)?;
        let p = plan(ctx.config, ctx.run)?;
        let points = p.score_points();
        let first = points.first().ok_or_else(|| {
            Error::Pipeline("the attribution plan has no scoring model; nothing to index".into())
        })?;
        let layers = sketch_layers(&model_shapes(&first.model, ctx.config)?);
        let d = cand.dims;
        let white = measure_whitening(ctx, &p, d / 2)?;
        let r = white
            .as_ref()
            .and_then(|w| w.first())
            .map_or(0, |w| w.iter().map(|x| x.exact().len()).sum());
        let sk = sketches(&layers, cand.seed, d - r)?;
        let opts = fit_options(ctx.config);
        tracing::info!(
            "index: {} scoring models, {} layers, {d} numbers per document",
            points.len(),
            layers.len()
        );
        let mut out = Vec::new();
        let names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
        let mut docs_cache: Option<(String, Vec<crate::data::PreparedDoc>)> = None;
        for (i, pt) in points.iter().enumerate() {
            crate::util::progress::set_part(format!("model {}/{}", i + 1, points.len()));
            let role = &p.segments[pt.segment].role;
            if docs_cache.as_ref().map(|(r, _)| r) != Some(role) {
                docs_cache = Some((role.clone(), role_docs(ctx.run, role)?));
            }
            let docs = &docs_cache.as_ref().expect("loaded above").1;
            let w = white.as_ref().map(|w| &w[i][..]);
            let model = load_model(&pt.model, ctx.config)?;
            let file = format!("point-{i:03}.f32");
            let sha256 = write_point(&model, docs, &sk, w, &opts, &ctx.out(&file))?;
            let whitening = match w {
                Some(w) => {
                    let wf = format!("whiten-{i:03}.safetensors");
                    let sha = save_whitening(&ctx.out(&wf), &names, w)?;
                    Some((wf, sha))
                }
                None => None,
            };
            out.push(IndexPoint {
                segment: pt.segment,
                model: point_name(ctx, &pt.model),
                role: role.clone(),
                documents: docs.len(),
                file,
                sha256,
                whitening,
            });
            ctx.failpoint(&format!("after-point-{i}"))?;
        }
        let header = IndexHeader {
            format: INDEX_FORMAT,
            seed: cand.seed,
            dims: cand.dims,
            exact: r,
            fit_outputs: if p.needs_factors() {
                fit_outputs(ctx)?
            } else {
                None
            },
            layers,
            points: out,
        };
        write_json_atomic(&ctx.out("index.json"), &header)?;
        let bytes: usize = header.points.iter().map(|p| p.documents * d * 4).sum();
        Ok(json!({
            "points": header.points.len(), "width": d, "layers": header.layers.len(),
            "bytes": bytes,
        }))
    }
}
