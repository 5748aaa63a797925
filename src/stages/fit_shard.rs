//! Owns the sharded `fit`: `fit --shard i/n` (the covariance pass, or the Λ pass once the
//! covariances are merged), `merge fit`, and the partial results in `RUN_DIR/shards/fit/`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `attribute`.
//!
//! docs/design.md §10. The fit is two passes, so a sharded fit is four steps, each a command:
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::attribution::plan::PlannedSegment;
use crate::backend::Backend;
use crate::config::Config;
use crate::curvature::{
    bases_from_tensors, basis_tensors, covariance_shard, factors_from_shards, lambda_shard,
    PartialCovariances, PartialLambda, SumsInfo,
};
use crate::error::{Error, Result};
use crate::linalg::{EigenBasis, LayerFactors};
use crate::model::Model;
use crate::passes::shard_batches;
use crate::pipeline::{
    run_stages, stage_key, staleness, Registry, RunDir, RunOptions, StageContext, StageStatus,
};
use crate::util::fsx::{remove_dir_if_exists, write_json_atomic};
use crate::util::hash::{sha256_file, sha256_json};
use crate::util::shard::Shard;
use crate::util::tensors::save_typed_tensors;

use super::attribute::{check_memory, fit_options, load_model_on, open_backend, plan, role_docs};

/// The fit's two passes over data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitPass {
    /// Σ a aᵀ, Σ δ δᵀ and their token count (docs/design.md §3.1).
    Covariance,
    /// Σ_m (Q_Sᵀ G_m Q_A)² in the merged eigenbases and its document count (§3.3).
    Lambda,
}

impl FitPass {
    fn dir(self) -> &'static str {
        match self {
            FitPass::Covariance => "covariance",
            FitPass::Lambda => "lambda",
        }
    }

    /// `covariance pass` or `eigenvalue-correction (Λ) pass`.
    pub fn describe(self) -> &'static str {
        match self {
            FitPass::Covariance => "covariance pass",
            FitPass::Lambda => "eigenvalue-correction (Λ) pass",
        }
    }
}

/// One segment's part of a partial result.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SegmentPart {
    segment: usize,
    info: SumsInfo,
}

/// The record beside a partial data file: what it is and how to check it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartRecord {
    stage: String,
    /// `None` for the merged bases.
    pass: Option<FitPass>,
    /// `None` for the merged bases.
    shard: Option<Shard>,
    /// The shards merged (the bases: the covariance shards' count).
    merged: Option<usize>,
    /// The fit stage's key: [`crate::pipeline::StageKey::resume_key`].
    key: String,
    tool_version: String,
    /// The data file, beside the record.
    file: String,
    sha256: String,
    bytes: u64,
    /// The Λ pass: the sha256 of the bases it rotated into.
    bases_sha256: Option<String>,
    segments: Vec<SegmentPart>,
    finished_at: String,
}

/// `RUN_DIR/shards/fit/`.
pub fn shards_root(run: &RunDir) -> PathBuf {
    run.path().join("shards").join("fit")
}

fn record_path(run: &RunDir, pass: FitPass, shard: Shard) -> PathBuf {
    (shards_root(run).join(pass.dir()))
        .join(format!("shard-{}-of-{}.json", shard.index, shard.count))
}

fn bases_record_path(run: &RunDir) -> PathBuf {
    shards_root(run).join("bases.json")
}

fn prefix(seg: &PlannedSegment) -> String {
    format!("segment-{}", seg.index)
}

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

/// The config, the fit stage's key, and whether it is complete and current.
struct Context<'a> {
    registry: &'a Registry,
    config: &'a Config,
    run: &'a RunDir,
    key: String,
    complete: bool,
}

impl<'a> Context<'a> {
    fn new(registry: &'a Registry, config: &'a Config, run: &'a RunDir) -> Result<Context<'a>> {
        let manifest = run.manifest()?;
        if manifest.config_hash != sha256_json(&config.to_json()) {
            return Err(Error::Pipeline(format!(
                "{} was made with a different config than the one given; a shard and a merge \
                 must use the run's config (leave out --config to read the run directory's \
                 config.toml)",
                run.path().display()
            )));
        }
        let stage = registry.find("fit")?;
        let key = stage_key(stage, config, &manifest)?;
        let complete = match manifest.stages.get("fit") {
            Some(r) if r.status == StageStatus::Complete => {
                staleness(stage, run, r, &key)?.is_none()
            }
            _ => false,
        };
        Ok(Context {
            registry,
            config,
            run,
            key: key.resume_key(),
            complete,
        })
    }

    fn rerun(&self, shard: Shard) -> String {
        format!(
            "source-tda fit --shard {shard} --run-dir {}",
            self.run.path().display()
        )
    }

    fn merge_cmd(&self) -> String {
        format!(
            "source-tda merge fit --run-dir {}",
            self.run.path().display()
        )
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

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes `entries` to `data` (atomically, the record in its metadata), then the record
/// with the data's sha256 to `record` (atomically): the record's presence means complete.
/// A test hook between the two: `SOURCE_TDA_PAUSE_IN_STAGE=fit:shard-I-of-N-written`
/// writes `RUN_DIR/.paused` and sleeps, so that a test can kill a shard there.
fn write_part(
    run: &RunDir,
    (record, data): (&Path, &Path),
    mut rec: PartRecord,
    entries: &[(String, Tensor, candle_core::DType)],
) -> Result<()> {
    let meta: HashMap<String, String> = [(
        "source_tda".to_string(),
        serde_json::to_string(&rec).expect("a record serialises"),
    )]
    .into();
    save_typed_tensors(data, entries, meta)?;
    if let Some(s) = rec.shard {
        let point = format!("fit:shard-{}-of-{}-written", s.index, s.count);
        if std::env::var("SOURCE_TDA_PAUSE_IN_STAGE").is_ok_and(|v| v == point) {
            let _ = std::fs::write(run.path().join(".paused"), &point);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
    rec.sha256 = sha256_file(data)?;
    rec.bytes = std::fs::metadata(data)
        .map_err(|e| Error::io("reading the size of", data, e))?
        .len();
    rec.finished_at = crate::util::now_rfc3339();
    write_json_atomic(record, &rec)
}

fn read_record(path: &Path) -> Result<PartRecord> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: not a shard record ({e}); delete it and rerun the shard it belonged to",
            path.display()
        ))
    })
}

/// The data file of `rec` (beside `path`), checked against its recorded sha256, read.
fn read_data(path: &Path, rec: &PartRecord, rerun: &str) -> Result<HashMap<String, Tensor>> {
    let data = path.with_file_name(&rec.file);
    let changed = |why: &str| {
        Error::Pipeline(format!(
            "{} {why} (recorded in {}); rerun `{rerun}`",
            data.display(),
            path.display()
        ))
    };
    if !data.is_file() {
        return Err(changed("is missing"));
    }
    if sha256_file(&data)? != rec.sha256 {
        return Err(changed(
            "changed on disk (its sha256 differs from its record)",
        ));
    }
    Ok(candle_core::safetensors::load(&data, &Device::Cpu)?)
}

fn segment_info(rec: &PartRecord, segment: usize) -> Result<SumsInfo> {
    (rec.segments.iter())
        .find(|s| s.segment == segment)
        .map(|s| s.info.clone())
        .ok_or_else(|| {
            Error::Pipeline(format!(
                "the merged bases hold no segment {segment}; the plan changed since: rerun \
                 the covariance shards and the merge"
            ))
        })
}

/// The merged bases of this key, if `merge fit` wrote them (and they are intact).
fn load_bases(cx: &Context) -> Result<Option<(PartRecord, HashMap<String, Tensor>)>> {
    let path = bases_record_path(cx.run);
    if !path.is_file() {
        return Ok(None);
    }
    let rec = read_record(&path)?;
    if rec.key != cx.key || rec.tool_version != crate::VERSION {
        return Ok(None);
    }
    let map = read_data(&path, &rec, &cx.merge_cmd())?;
    Ok(Some((rec, map)))
}

/// The complete set of records of `pass` for this key: every shard 1..=n once, one n, all
/// of this key, version and bases, each data file intact; else an error naming what to
/// rerun. Sorted by shard index.
fn complete_set(
    cx: &Context,
    pass: FitPass,
    bases_sha: Option<&str>,
) -> Result<Vec<(PathBuf, PartRecord)>> {
    let dir = shards_root(cx.run).join(pass.dir());
    let mut found: Vec<(PathBuf, PartRecord)> = Vec::new();
    if dir.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io("listing", &dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let rec = read_record(&p)?;
            found.push((p, rec));
        }
    }
    let what = pass.describe();
    if found.is_empty() {
        return Err(Error::Pipeline(format!(
            "no shard of the fit's {what} in {}: run `source-tda fit --shard I/N --run-dir {}` \
             for I = 1..N first (on one machine or several), then `{}`",
            dir.display(),
            cx.run.path().display(),
            cx.merge_cmd()
        )));
    }
    let mut by_index: BTreeMap<usize, &Path> = BTreeMap::new();
    for (p, rec) in &found {
        let Some(shard) = rec
            .shard
            .filter(|_| rec.pass == Some(pass) && rec.stage == "fit")
        else {
            return Err(Error::Pipeline(format!(
                "{} is not a shard of the fit's {what}; delete it",
                p.display()
            )));
        };
        let named = record_path(cx.run, pass, shard);
        if file_name(p) != file_name(&named) {
            return Err(Error::Pipeline(format!(
                "{} holds shard {shard}, a duplicate of {} (a copy?): delete {} and rerun \
                 the shard its name says if it is missing",
                p.display(),
                named.display(),
                p.display()
            )));
        }
        if let Some(other) = by_index.insert(shard.index, p) {
            return Err(Error::Pipeline(format!(
                "shard {} of the fit's {what} is there twice, in {} and {} (different shard \
                 counts): keep the count you mean, delete the other files, rerun what is missing",
                shard.index,
                other.display(),
                p.display()
            )));
        }
    }
    let counts: BTreeMap<usize, Vec<String>> =
        found.iter().fold(BTreeMap::new(), |mut m, (p, r)| {
            let n = r.shard.map_or(0, |s| s.count);
            m.entry(n).or_insert_with(Vec::new).push(file_name(p));
            m
        });
    if counts.len() > 1 {
        let list: Vec<String> = (counts.iter())
            .map(|(n, files)| format!("N = {n} ({})", files.join(", ")))
            .collect();
        return Err(Error::Pipeline(format!(
            "the fit's {what} in {} has shards of different counts: {}; all shards of a pass \
             use one N: delete the files of the count you do not mean and rerun the missing \
             shards of the other",
            dir.display(),
            list.join(" and ")
        )));
    }
    for (p, rec) in &found {
        let shard = rec.shard.expect("checked above");
        let other = if rec.key != cx.key {
            Some(format!(
                "another config or other inputs (key {}, this run directory's fit now has key {})",
                rec.key, cx.key
            ))
        } else if rec.tool_version != crate::VERSION {
            Some(format!(
                "source-tda {} (this is {})",
                rec.tool_version,
                crate::VERSION
            ))
        } else if bases_sha.is_some() && rec.bases_sha256.as_deref() != bases_sha {
            Some("other eigenbases (an earlier merge of the covariance shards)".to_string())
        } else {
            None
        };
        if let Some(why) = other {
            return Err(Error::Pipeline(format!(
                "shard {shard} of the fit's {what} ({}) was made with {why}: shards of mixed \
                 configs do not merge; rerun `{}`",
                p.display(),
                cx.rerun(shard)
            )));
        }
    }
    let n = *counts.keys().next().expect("found is not empty");
    let missing: Vec<Shard> = (1..=n)
        .filter(|i| !by_index.contains_key(i))
        .map(|index| Shard { index, count: n })
        .collect();
    if !missing.is_empty() {
        let runs: Vec<String> = missing
            .iter()
            .map(|s| format!("`{}`", cx.rerun(*s)))
            .collect();
        return Err(Error::Pipeline(format!(
            "the fit's {what} is missing shard(s) {} of {n} in {}: run {}, then `{}` again",
            missing
                .iter()
                .map(|s| s.index.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display(),
            runs.join(", "),
            cx.merge_cmd()
        )));
    }
    found.sort_by_key(|(_, r)| r.shard.map_or(0, |s| s.index));
    Ok(found)
}

/// Checks that `parts` (per shard: what it added to segment `seg`) add up to the whole plan:
/// every batch of every checkpoint once.
fn check_counts(
    cx: &Context,
    seg: &PlannedSegment,
    added: (u64, u64),
    pass: FitPass,
) -> Result<()> {
    let docs = role_docs(cx.run, &seg.role)?;
    let opts = fit_options(cx.config);
    let k = seg.checkpoints.len() as u64;
    let want = (
        shard_batches(&docs, &opts, None).len() as u64 * k,
        docs.len() as u64 * k,
    );
    if added != want {
        return Err(Error::Pipeline(format!(
            "the shards of the fit's {} added {} batches and {} documents of segment {}, its \
             plan has {} and {} (over {k} checkpoint(s)): they were made with other batching or \
             data; rerun every shard",
            pass.describe(),
            added.0,
            added.1,
            seg.index,
            want.0,
            want.1
        )));
    }
    Ok(())
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
