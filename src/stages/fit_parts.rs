//! Owns a sharded fit's partial results on disk: their paths, records, checks and the
//! refusals of a merge (missing, duplicated or mixed shards).
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `attribute`.
//!
//! docs/design.md §11: every data file under `RUN_DIR/shards/fit/` has a record beside it
//! (`.json`, written after the data) naming the stage, pass, shard, the fit stage's key, the
//! tool version, what each segment added and the data's sha256. [`complete_set`] is the one
//! check a merge makes of a pass's shards.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::attribution::plan::PlannedSegment;
use crate::config::Config;
use crate::curvature::SumsInfo;
use crate::error::{Error, Result};
use crate::passes::shard_batches;
use crate::pipeline::{Registry, RunDir};
use crate::util::fsx::write_json_atomic;
use crate::util::hash::sha256_file;
use crate::util::shard::Shard;
use crate::util::tensors::save_typed_tensors;

use super::attribute::{fit_options, role_docs};
use super::shard_state::shard_state;

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
    pub(super) fn dir(self) -> &'static str {
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
pub(super) struct SegmentPart {
    pub(super) segment: usize,
    pub(super) info: SumsInfo,
}

/// The record beside a partial data file: what it is and how to check it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PartRecord {
    pub(super) stage: String,
    /// `None` for the merged bases.
    pub(super) pass: Option<FitPass>,
    /// `None` for the merged bases.
    pub(super) shard: Option<Shard>,
    /// The shards merged (the bases: the covariance shards' count).
    pub(super) merged: Option<usize>,
    /// The fit stage's key: [`crate::pipeline::StageKey::resume_key`].
    pub(super) key: String,
    pub(super) tool_version: String,
    /// The data file, beside the record.
    pub(super) file: String,
    pub(super) sha256: String,
    pub(super) bytes: u64,
    /// The Λ pass: the sha256 of the bases it rotated into.
    pub(super) bases_sha256: Option<String>,
    pub(super) segments: Vec<SegmentPart>,
    pub(super) finished_at: String,
}

/// `RUN_DIR/shards/fit/`.
pub fn shards_root(run: &RunDir) -> PathBuf {
    run.path().join("shards").join("fit")
}

pub(super) fn record_path(run: &RunDir, pass: FitPass, shard: Shard) -> PathBuf {
    (shards_root(run).join(pass.dir()))
        .join(format!("shard-{}-of-{}.json", shard.index, shard.count))
}

pub(super) fn bases_record_path(run: &RunDir) -> PathBuf {
    shards_root(run).join("bases.json")
}

pub(super) fn prefix(seg: &PlannedSegment) -> String {
    format!("segment-{}", seg.index)
}

/// The config, the fit stage's key, and whether it is complete and current.
pub(super) struct Context<'a> {
    pub(super) registry: &'a Registry,
    pub(super) config: &'a Config,
    pub(super) run: &'a RunDir,
    pub(super) key: String,
    pub(super) complete: bool,
}

impl<'a> Context<'a> {
    pub(super) fn new(
        registry: &'a Registry,
        config: &'a Config,
        run: &'a RunDir,
    ) -> Result<Context<'a>> {
        let st = shard_state(registry, config, run, "fit")?;
        Ok(Context {
            registry,
            config,
            run,
            key: st.key,
            complete: st.complete,
        })
    }

    pub(super) fn rerun(&self, shard: Shard) -> String {
        format!(
            "source-tda fit --shard {shard} --run-dir {}",
            self.run.path().display()
        )
    }

    pub(super) fn merge_cmd(&self) -> String {
        format!(
            "source-tda merge fit --run-dir {}",
            self.run.path().display()
        )
    }
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes `entries` to `data` (atomically, the record in its metadata), then the record
/// with the data's sha256 to `record` (atomically): the record's presence means complete.
/// A test hook between the two: `SOURCE_TDA_PAUSE_IN_STAGE=fit:shard-I-of-N-written`
/// writes `RUN_DIR/.paused` and sleeps, so that a test can kill a shard there.
pub(super) fn write_part(
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

pub(super) fn read_record(path: &Path) -> Result<PartRecord> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: not a shard record ({e}); delete it and rerun the shard it belonged to",
            path.display()
        ))
    })
}

/// The data file of `rec` (beside `path`), checked against its recorded sha256, read.
pub(super) fn read_data(
    path: &Path,
    rec: &PartRecord,
    rerun: &str,
) -> Result<HashMap<String, Tensor>> {
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

pub(super) fn segment_info(rec: &PartRecord, segment: usize) -> Result<SumsInfo> {
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
pub(super) fn load_bases(cx: &Context) -> Result<Option<(PartRecord, HashMap<String, Tensor>)>> {
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
pub(super) fn complete_set(
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
pub(super) fn check_counts(
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
