//! Owns the sharded `score`'s commands and records: `score --shard i/n` (a shard's partial
//! tables under `RUN_DIR/shards/score/`) and `merge score` (runs the stage, which finds the
//! complete set and merges it, [`super::score_merge`]).
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! sibling `score_run`.
//!
//! docs/design.md §11. Shard i/n scores the documents of the batches k ≡ i − 1 (mod n) of each
//! data role's length-sorted batch plan (the plan of the whole role, so every batch, and so
//! every document score, is bitwise the unsharded one) and writes, in
//! `shards/score/shard-I-of-N/`, the tables an unsharded `score` writes with a `doc_index`
//! column (the document's position in the unsharded order, for ties and joins): its rows
//! (every document it scored, or its own top max(K, top_k) and bottom K per query), the
//! per-token scores of its own top_k per query and its documents. A record
//! `shard-I-of-N.json`, written last, names the stage's key (config and inputs), the tool
//! version, the counts and every file's sha256.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::pipeline::{run_stages, Registry, RunDir, RunOptions, StageContext, Workers};
use crate::util::fsx::{list_files, remove_dir_if_exists, write_json_atomic};
use crate::util::hash::sha256_file;
use crate::util::shard::Shard;

use super::shard_state::shard_state;

/// One file of a shard's partial results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ShardFile {
    /// Path inside the shard's folder.
    pub(super) path: String,
    pub(super) bytes: u64,
    pub(super) sha256: String,
}

/// The record of one `score --shard i/n`, beside its folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ScoreShardRecord {
    pub(super) stage: String,
    pub(super) shard: Shard,
    /// The score stage's key: [`crate::pipeline::StageKey::resume_key`].
    pub(super) key: String,
    pub(super) tool_version: String,
    /// Documents this shard scored.
    pub(super) documents: usize,
    /// Documents all shards score together (every scored document of every role).
    pub(super) total_documents: usize,
    pub(super) files: Vec<ShardFile>,
    /// The stage summary the shard computed (its own rows and top documents).
    pub(super) summary: serde_json::Value,
    pub(super) finished_at: String,
}

/// What `score --shard` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScoreShardOutcome {
    /// Scored `documents` documents; its record is `path`.
    Wrote {
        /// The record written.
        path: PathBuf,
        /// Documents scored.
        documents: usize,
    },
    /// The score stage is complete and current: nothing to do.
    Complete,
}

/// What `merge score` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScoreMergeOutcome {
    /// Merged this many shards: `score` is complete.
    Merged {
        /// Shards merged.
        shards: usize,
    },
    /// The score stage is complete and current: nothing to merge.
    Complete,
}

impl ScoreShardOutcome {
    /// What to tell the user (`run_dir` as they gave it), with the next command.
    pub fn message(&self, shard: Shard, run_dir: &Path) -> String {
        match self {
            ScoreShardOutcome::Wrote { path, documents } => format!(
                "score: shard {shard}: {documents} documents scored, recorded in {}; when every \
                 shard is done: source-tda merge score --run-dir {}",
                path.display(),
                run_dir.display()
            ),
            ScoreShardOutcome::Complete => "score: complete and up to date; nothing to do".into(),
        }
    }
}

impl ScoreMergeOutcome {
    /// What to tell the user.
    pub fn message(&self) -> String {
        match self {
            ScoreMergeOutcome::Merged { shards } => {
                format!("merge score: {shards} shards merged; score: done")
            }
            ScoreMergeOutcome::Complete => {
                "merge score: score is complete and up to date; nothing to merge".into()
            }
        }
    }
}

/// `RUN_DIR/shards/score/`.
pub(super) fn shards_root(run: &RunDir) -> PathBuf {
    run.path().join("shards").join("score")
}

/// A shard's folder of partial tables.
pub(super) fn shard_folder(run: &RunDir, s: Shard) -> PathBuf {
    shards_root(run).join(format!("shard-{}-of-{}", s.index, s.count))
}

fn record_path(run: &RunDir, s: Shard) -> PathBuf {
    shards_root(run).join(format!("shard-{}-of-{}.json", s.index, s.count))
}

/// The score stage's key, and whether it is complete and current.
struct Cx {
    key: String,
    complete: bool,
}

fn context(registry: &Registry, config: &Config, run: &RunDir) -> Result<Cx> {
    let st = shard_state(registry, config, run, "score")?;
    Ok(Cx {
        key: st.key,
        complete: st.complete,
    })
}

fn rerun(run: &RunDir, s: impl std::fmt::Display) -> String {
    format!(
        "source-tda score --shard {s} --run-dir {}",
        run.path().display()
    )
}

/// `source-tda score --shard i/n`: scores this shard's documents into
/// `shards/score/shard-I-of-N/` and writes its record; reruns overwrite its own files only.
pub fn score_shard(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
    shard: Shard,
) -> Result<ScoreShardOutcome> {
    let cx = context(registry, config, run)?;
    if cx.complete {
        return Ok(ScoreShardOutcome::Complete);
    }
    let record = record_path(run, shard);
    if record.exists() {
        std::fs::remove_file(&record).ctx("removing", &record)?;
    }
    let folder = shard_folder(run, shard);
    let staging = shards_root(run).join(format!(
        ".shard-{}-of-{}-{}",
        shard.index,
        shard.count,
        std::process::id()
    ));
    remove_dir_if_exists(&staging)?;
    std::fs::create_dir_all(&staging).ctx("creating", &staging)?;
    let workers = Workers::default();
    let ctx = StageContext {
        config,
        run,
        registry,
        out_dir: staging.clone(),
        stage: "score",
        resume_key: cx.key.clone(),
        config_file,
        workers: &workers,
        query_set: None,
    };
    let summary = match super::score_run::score_stage(&ctx, Some(shard)) {
        Ok(s) => s,
        Err(e) => {
            let _ = remove_dir_if_exists(&staging);
            return Err(e);
        }
    };
    remove_dir_if_exists(&folder)?;
    std::fs::rename(&staging, &folder).ctx("renaming into place", &folder)?;
    let mut files = Vec::new();
    for rel in list_files(&folder)? {
        let p = folder.join(&rel);
        files.push(ShardFile {
            path: rel.to_string_lossy().into_owned(),
            bytes: std::fs::metadata(&p).ctx("reading metadata of", &p)?.len(),
            sha256: sha256_file(&p)?,
        });
    }
    let count = |k: &str| summary["shard"][k].as_u64().unwrap_or(0) as usize;
    let rec = ScoreShardRecord {
        stage: "score".into(),
        shard,
        key: cx.key,
        tool_version: crate::VERSION.into(),
        documents: count("documents"),
        total_documents: count("total_documents"),
        files,
        summary,
        finished_at: crate::util::now_rfc3339(),
    };
    write_json_atomic(&record, &rec)?;
    Ok(ScoreShardOutcome::Wrote {
        path: record,
        documents: rec.documents,
    })
}

/// `source-tda merge score`: checks the shards, then runs the `score` stage through the
/// runner, which merges them ([`super::score_merge`]), so that the manifest records `score`
/// as an unsharded run does; then removes `shards/score/`. Idempotent.
pub fn merge_score(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
) -> Result<ScoreMergeOutcome> {
    let cx = context(registry, config, run)?;
    if cx.complete {
        remove_dir_if_exists(&shards_root(run))?;
        let _ = std::fs::remove_dir(run.path().join("shards"));
        return Ok(ScoreMergeOutcome::Complete);
    }
    let set = complete_set(run, &cx.key)?;
    run_stages(
        registry,
        config,
        config_file,
        run,
        &["score".into()],
        &RunOptions::default(),
    )?;
    remove_dir_if_exists(&shards_root(run))?;
    let _ = std::fs::remove_dir(run.path().join("shards"));
    Ok(ScoreMergeOutcome::Merged { shards: set.len() })
}

/// The complete set of shards the score stage of key `key` merges, when there is one: None
/// without shard records; an error naming what to rerun when they are not a complete set.
pub(super) fn shards_to_merge(ctx: &StageContext) -> Result<Option<Vec<ScoreShardRecord>>> {
    let root = shards_root(ctx.run);
    let any = root.is_dir()
        && std::fs::read_dir(&root)
            .ctx("listing", &root)?
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "json"));
    if !any || ctx.query_set.is_some() {
        return Ok(None);
    }
    complete_set(ctx.run, &ctx.resume_key).map(Some)
}

fn read_record(path: &Path) -> Result<ScoreShardRecord> {
    let text = std::fs::read_to_string(path).ctx("reading", path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: not a score shard record ({e}); delete it and rerun the shard it belonged to",
            path.display()
        ))
    })
}

/// Every record under `shards/score/`: one per shard 1..=n, one n, all of this key and tool
/// version, each file intact; else an error naming what to rerun. Sorted by shard.
fn complete_set(run: &RunDir, key: &str) -> Result<Vec<ScoreShardRecord>> {
    let root = shards_root(run);
    let mut found: Vec<(PathBuf, ScoreShardRecord)> = Vec::new();
    if root.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&root)
            .ctx("listing", &root)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let rec = read_record(&p)?;
            found.push((p, rec));
        }
    }
    if found.is_empty() {
        return Err(Error::Pipeline(format!(
            "no score shard in {}: run `{}` for I = 1..N first (on one machine or several), \
             then `source-tda merge score --run-dir {}`",
            root.display(),
            rerun(run, "I/N"),
            run.path().display()
        )));
    }
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut counts = std::collections::BTreeSet::new();
    let mut by_index = std::collections::BTreeMap::new();
    for (p, rec) in &found {
        if rec.stage != "score" {
            return Err(Error::Pipeline(format!(
                "{} is not a score shard's record; delete it",
                p.display()
            )));
        }
        let s = rec.shard;
        if name(p) != name(&record_path(run, s)) {
            return Err(Error::Pipeline(format!(
                "{} holds shard {s}, a duplicate of {} (a copy?): delete {} and rerun `{}` if \
                 it is missing",
                p.display(),
                record_path(run, s).display(),
                p.display(),
                rerun(run, s)
            )));
        }
        counts.insert(s.count);
        by_index.insert(s.index, p.clone());
    }
    if counts.len() > 1 {
        let listed: Vec<String> = found.iter().filter_map(|(p, _)| name(p)).collect();
        return Err(Error::Pipeline(format!(
            "score shards of different counts N ({}) in {}: keep the N you mean, delete the \
             other records and folders, rerun what is missing",
            listed.join(", "),
            root.display()
        )));
    }
    let n = *counts.iter().next().expect("one count");
    let missing: Vec<String> = (1..=n)
        .filter(|i| !by_index.contains_key(i))
        .map(|i| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        let cmds: Vec<String> = missing.iter().map(|s| rerun(run, s)).collect();
        return Err(Error::Pipeline(format!(
            "missing score shard(s) {} of {n} (a shard still running, failed or killed \
             before its record): run `{}`, then merge again",
            missing.join(", "),
            cmds.join("`, `")
        )));
    }
    let mut set = Vec::new();
    for (p, rec) in found {
        let s = rec.shard;
        if rec.key != key {
            return Err(Error::Pipeline(format!(
                "{}: shard {s} was made under another config or other inputs (key {}, this \
                 run's score is {key}): rerun `{}`",
                p.display(),
                rec.key,
                rerun(run, s)
            )));
        }
        if rec.tool_version != crate::VERSION {
            return Err(Error::Pipeline(format!(
                "{}: shard {s} was made by source-tda {}, this is {}: rerun `{}`",
                p.display(),
                rec.tool_version,
                crate::VERSION,
                rerun(run, s)
            )));
        }
        let folder = shard_folder(run, s);
        for f in &rec.files {
            let path = folder.join(&f.path);
            let ok = path.is_file() && sha256_file(&path)? == f.sha256;
            if !ok {
                return Err(Error::Pipeline(format!(
                    "{} is missing or changed on disk (its sha256 differs from {}): rerun `{}`",
                    path.display(),
                    p.display(),
                    rerun(run, s)
                )));
            }
        }
        set.push(rec);
    }
    let totals: std::collections::BTreeSet<usize> = set.iter().map(|r| r.total_documents).collect();
    let sum: usize = set.iter().map(|r| r.documents).sum();
    if totals.len() != 1 || totals.first() != Some(&sum) {
        return Err(Error::Pipeline(format!(
            "the score shards in {} scored {sum} documents of {totals:?}: their plans differ; \
             rerun every shard",
            root.display()
        )));
    }
    set.sort_by_key(|r| r.shard.index);
    Ok(set)
}
