//! Owns the sharded `fit`'s commands: `fit --shard i/n` (the covariance pass, or the Λ pass
//! once the covariances are merged), `merge fit`, and the assembly of the merged factors.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! siblings `attribute`, `fit_parts`.
//!
//! docs/design.md §11. The fit is two passes, so a sharded fit is four steps, each a command:
//!
//! 1. `fit --shard i/n` for i = 1..n: the covariance pass over the batches shard i owns
//!    (`curvature::covariance_shard`) → `covariance/shard-I-of-N.{safetensors,json}`;
//! 2. `merge fit`: adds the covariance sums, eigendecomposes → `bases.{safetensors,json}`;
//! 3. `fit --shard i/n` again (the bases exist now, so this is the Λ pass) →
//!    `lambda/shard-I-of-N.{safetensors,json}`;
//! 4. `merge fit`: runs the `fit` stage through the runner, which assembles the factors from
//!    the bases and the Λ shards ([`merged_shards`]) instead of fitting, so that the run
//!    directory ends exactly as an unsharded fit leaves it; then `shards/fit/` is removed.
//!
//! Every partial file has a record beside it (`.json`, written after the data, so a killed
//! shard leaves no record): stage, pass, shard i/n, the fit stage's key (its config and
//! inputs, [`StageKey::resume_key`]), the tool version, per segment what was added (layers,
//! tokens, documents, batches), and the data file's sha256. A merge refuses a missing shard, a
//! duplicated one, shards of different counts, of another key or version, and changed files,
//! naming what to rerun; rerunning a merge changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::attribution::plan::PlannedSegment;
use crate::backend::Backend;
use crate::config::Config;
use crate::curvature::{
    bases_from_tensors, basis_tensors, covariance_shard, factors_from_shards, lambda_shard,
    PartialCovariances, PartialLambda,
};
use crate::error::{Error, Result};
use crate::linalg::{EigenBasis, LayerFactors};
use crate::model::Model;
use crate::passes::shard_batches;
use crate::pipeline::{run_stages, Registry, RunDir, RunOptions, StageContext};
use crate::util::fsx::remove_dir_if_exists;
use crate::util::shard::Shard;

use super::attribute::{check_memory, fit_options, load_model_on, open_backend, plan, role_docs};
pub use super::fit_parts::FitPass;
use super::fit_parts::{
    bases_record_path, check_counts, complete_set, file_name, load_bases, prefix, read_data,
    record_path, segment_info, shards_root, write_part, Context, PartRecord, SegmentPart,
};

/// What `fit --shard` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FitShardOutcome {
    /// Wrote its partial sums of `pass` to `path`.
    Wrote {
        /// Which pass ran.
        pass: FitPass,
        /// The record written.
        path: PathBuf,
    },
    /// The fit stage is complete and current: nothing to do.
    Complete,
    /// The method needs no curvature: `fit` itself is cheap, nothing to shard.
    NoCurvature,
}

/// What `merge fit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FitMergeOutcome {
    /// Merged `shards` covariance shards into the bases; the Λ shards come next.
    Bases {
        /// Covariance shards merged.
        shards: usize,
    },
    /// The bases of these covariance shards exist already, and no Λ shard yet.
    BasesPresent,
    /// Assembled the factors: the `fit` stage is complete.
    Factors {
        /// Λ shards merged.
        shards: usize,
    },
    /// The fit stage is complete and current: nothing to do.
    Complete,
}

impl FitShardOutcome {
    /// What to tell the user (`run_dir` as they gave it), with the next command.
    pub fn message(&self, shard: Shard, run_dir: &Path) -> String {
        let merge = format!("source-tda merge fit --run-dir {}", run_dir.display());
        match self {
            FitShardOutcome::Wrote { pass, path } => format!(
                "fit: shard {shard}: its {} written to {}; when every shard is done: {merge}",
                pass.describe(),
                path.display()
            ),
            FitShardOutcome::Complete => "fit: complete and up to date; nothing to do".into(),
            FitShardOutcome::NoCurvature => format!(
                "fit: this method needs no curvature; nothing to shard (run `{merge}` or `fit`)"
            ),
        }
    }
}

impl FitMergeOutcome {
    /// What to tell the user (`run_dir` as they gave it), with the next command.
    pub fn message(&self, run_dir: &Path) -> String {
        let shards = format!("source-tda fit --shard I/N --run-dir {}", run_dir.display());
        match self {
            FitMergeOutcome::Bases { shards: n } => format!(
                "merge fit: {n} covariance shards merged into the eigenbases; next, the Λ \
                 pass: `{shards}` for I = 1..N, then merge again"
            ),
            FitMergeOutcome::BasesPresent => format!(
                "merge fit: the eigenbases are merged already; next, the Λ pass: `{shards}` \
                 for I = 1..N, then merge again"
            ),
            FitMergeOutcome::Factors { shards: n } => {
                format!("merge fit: {n} Λ shards merged; fit: done")
            }
            FitMergeOutcome::Complete => {
                "merge fit: fit is complete and up to date; nothing to merge".into()
            }
        }
    }
}

/// A segment's checkpoints loaded on `backend`'s device, checked against the memory limit.
fn segment_models(
    backend: &dyn Backend,
    seg: &PlannedSegment,
    config: &Config,
) -> Result<Vec<Model>> {
    let models = (seg.checkpoints.iter())
        .map(|c| load_model_on(c, backend.device(), config))
        .collect::<Result<Vec<_>>>()?;
    if let Some(m) = models.first() {
        check_memory("fit", m, config)?;
    }
    Ok(models)
}

/// `source-tda fit --shard i/n`: this shard's part of the pass that is due (the covariance
/// pass, or the Λ pass once `merge fit` wrote the bases of this config), written to
/// `RUN_DIR/shards/fit/PASS/shard-I-of-N.*`. Runs without locking the run directory, so the
/// shards may run at the same time (on several machines sharing it). `config` must be the
/// run's.
pub fn fit_shard(
    registry: &Registry,
    config: &Config,
    run: &RunDir,
    shard: Shard,
) -> Result<FitShardOutcome> {
    let cx = Context::new(registry, config, run)?;
    if cx.complete {
        return Ok(FitShardOutcome::Complete);
    }
    let p = plan(config, run)?;
    if !p.needs_factors() {
        return Ok(FitShardOutcome::NoCurvature);
    }
    if let Some(dir) = &config.attribution.factor_cache {
        tracing::info!(
            "fit: a sharded fit neither reads nor stores the factor cache ({}): its factors \
             differ from an unsharded fit's by rounding",
            dir.display()
        );
    }
    let bases = load_bases(&cx)?;
    let pass = match bases {
        Some(_) => FitPass::Lambda,
        None => FitPass::Covariance,
    };
    let path = record_path(run, pass, shard);
    // No record while the data is rewritten: a kill leaves this shard missing, never stale.
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| Error::io("removing", &path, e))?;
    }
    let opts = fit_options(config);
    let backend = open_backend(config)?;
    let mut entries = Vec::new();
    let mut segments = Vec::new();
    for seg in &p.segments {
        let docs = role_docs(run, &seg.role)?;
        let models = segment_models(backend.as_ref(), seg, config)?;
        let refs: Vec<&Model> = models.iter().collect();
        let what = format!("segment {} (`{}`)", seg.index, seg.stage);
        tracing::info!(
            "fit: shard {shard}, {}: {what}, {} of the plan's {} batches, {} checkpoint(s)",
            pass.describe(),
            shard_batches(&docs, &opts, Some(shard)).len(),
            shard_batches(&docs, &opts, None).len(),
            refs.len()
        );
        let info = match &bases {
            None => {
                let sums = covariance_shard(backend.as_ref(), &refs, &docs, &opts, &what, shard)?;
                entries.extend(sums.tensors(&prefix(seg))?);
                sums.info
            }
            Some((rec, map)) => {
                let mut info = segment_info(rec, seg.index)?;
                let b = bases_from_tensors(&info, map, &prefix(seg))?;
                let lam = lambda_shard(backend.as_ref(), &refs, &docs, &opts, (&b, &info), shard)?;
                entries.extend(lam.tensors(&info, &prefix(seg))?);
                (info.tokens, info.documents, info.batches) = (0, lam.documents, lam.batches);
                info
            }
        };
        segments.push(SegmentPart {
            segment: seg.index,
            info,
        });
    }
    let data = path.with_extension("safetensors");
    let rec = PartRecord {
        stage: "fit".into(),
        pass: Some(pass),
        shard: Some(shard),
        merged: None,
        key: cx.key.clone(),
        tool_version: crate::VERSION.into(),
        file: file_name(&data),
        sha256: String::new(),
        bytes: 0,
        bases_sha256: bases.as_ref().map(|(r, _)| r.sha256.clone()),
        segments,
        finished_at: String::new(),
    };
    write_part(run, (&path, &data), rec, &entries)?;
    Ok(FitShardOutcome::Wrote { pass, path })
}

/// `source-tda merge fit`: the covariance shards into the bases, or (once the Λ shards are
/// all there) the factors, by running the `fit` stage, which assembles them; idempotent.
pub fn merge_fit(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
) -> Result<FitMergeOutcome> {
    let cx = Context::new(registry, config, run)?;
    if cx.complete {
        return Ok(FitMergeOutcome::Complete);
    }
    let p = plan(config, run)?;
    let fit = |cx: &Context| -> Result<()> {
        let opts = RunOptions::default();
        run_stages(
            cx.registry,
            cx.config,
            config_file,
            cx.run,
            &["fit".into()],
            &opts,
        )?;
        Ok(())
    };
    if !p.needs_factors() {
        fit(&cx)?;
        return Ok(FitMergeOutcome::Factors { shards: 0 });
    }
    if let Some((rec, _)) = load_bases(&cx)? {
        let lambda_dir = shards_root(run).join(FitPass::Lambda.dir());
        let any = lambda_dir.is_dir()
            && std::fs::read_dir(&lambda_dir)
                .map_err(|e| Error::io("listing", &lambda_dir, e))?
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"));
        if !any {
            return Ok(FitMergeOutcome::BasesPresent);
        }
        let set = complete_set(&cx, FitPass::Lambda, Some(&rec.sha256))?;
        for seg in &p.segments {
            let added = set.iter().try_fold((0, 0), |(b, d), (_, r)| {
                let i = segment_info(r, seg.index)?;
                Ok::<_, Error>((b + i.batches, d + i.documents))
            })?;
            check_counts(&cx, seg, added, FitPass::Lambda)?;
        }
        fit(&cx)?;
        remove_dir_if_exists(&shards_root(run))?;
        let _ = std::fs::remove_dir(run.path().join("shards"));
        return Ok(FitMergeOutcome::Factors { shards: set.len() });
    }
    let set = complete_set(&cx, FitPass::Covariance, None)?;
    let maps = (set.iter())
        .map(|(path, rec)| read_data(path, rec, &cx.rerun(rec.shard.expect("a shard"))))
        .collect::<Result<Vec<_>>>()?;
    let backend = open_backend(config)?;
    let mut entries = Vec::new();
    let mut segments = Vec::new();
    for seg in &p.segments {
        let what = format!("segment {} (`{}`)", seg.index, seg.stage);
        let parts = (set.iter().zip(&maps))
            .map(|((_, rec), map)| {
                PartialCovariances::from_tensors(segment_info(rec, seg.index)?, map, &prefix(seg))
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = PartialCovariances::merge(parts, &what)?;
        let counts = (merged.info.batches, merged.info.documents);
        check_counts(&cx, seg, counts, FitPass::Covariance)?;
        let info = merged.info.clone();
        tracing::info!(
            "merge fit: {what}: {} covariance shards, {} tokens; eigendecomposing",
            set.len(),
            info.tokens
        );
        let bases: Vec<EigenBasis> = merged.bases(
            backend.as_ref(),
            &what,
            config.attribution.eigendecomposition,
        )?;
        entries.extend(basis_tensors(&bases, &prefix(seg))?);
        segments.push(SegmentPart {
            segment: seg.index,
            info,
        });
    }
    let path = bases_record_path(run);
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| Error::io("removing", &path, e))?;
    }
    let rec = PartRecord {
        stage: "fit".into(),
        pass: None,
        shard: None,
        merged: Some(set.len()),
        key: cx.key.clone(),
        tool_version: crate::VERSION.into(),
        file: "bases.safetensors".into(),
        sha256: String::new(),
        bytes: 0,
        bases_sha256: None,
        segments,
        finished_at: String::new(),
    };
    write_part(
        run,
        (&path, &path.with_extension("safetensors")),
        rec,
        &entries,
    )?;
    Ok(FitMergeOutcome::Bases { shards: set.len() })
}

/// The factors a sharded fit merged, for the `fit` stage to assemble instead of fitting.
pub struct MergedShards {
    bases: (PartRecord, HashMap<String, Tensor>),
    lambda: Vec<(PathBuf, PartRecord)>,
}

/// The merged bases and a complete set of Λ shards of this fit's key, when `merge fit` left
/// them (`None` otherwise, with a warning when an incomplete or mixed set is ignored).
pub fn merged_shards(ctx: &StageContext) -> Result<Option<MergedShards>> {
    if !shards_root(ctx.run).join(FitPass::Lambda.dir()).is_dir() {
        return Ok(None);
    }
    let cx = Context {
        registry: ctx.registry,
        config: ctx.config,
        run: ctx.run,
        key: ctx.resume_key.clone(),
        complete: false,
    };
    let Some(bases) = load_bases(&cx)? else {
        return Ok(None);
    };
    match complete_set(&cx, FitPass::Lambda, Some(&bases.0.sha256)) {
        Ok(lambda) => Ok(Some(MergedShards { bases, lambda })),
        Err(e) => {
            tracing::warn!(
                "fit: the shards in {} are not used: {e}",
                shards_root(ctx.run).display()
            );
            Ok(None)
        }
    }
}

impl MergedShards {
    /// Shards merged: (covariance, Λ).
    pub fn counts(&self) -> (usize, usize) {
        (self.bases.0.merged.unwrap_or(0), self.lambda.len())
    }

    /// Segment `seg`'s factors: its bases and Λ = Σ shard sums / Σ documents.
    pub fn factors(&self, seg: &PlannedSegment) -> Result<Vec<LayerFactors>> {
        let info = segment_info(&self.bases.0, seg.index)?;
        let bases = bases_from_tensors(&info, &self.bases.1, &prefix(seg))?;
        let parts = (self.lambda.iter())
            .map(|(path, rec)| {
                let map = read_data(path, rec, "source-tda fit --shard I/N (this shard)")?;
                let i = segment_info(rec, seg.index)?;
                PartialLambda::from_tensors(&info, &map, &prefix(seg), (i.documents, i.batches))
            })
            .collect::<Result<Vec<_>>>()?;
        let what = format!("segment {} (`{}`)", seg.index, seg.stage);
        factors_from_shards(&info, bases, &parts, &what)
    }
}
