//! Owns running stages in order from a given `Registry`, reusing what is unchanged.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`, `stage`.
//!
//! Runs stages in order, skipping completed ones whose inputs and config are unchanged.
//!
//! A stage is reused when its record is `complete`, its config hash and inputs hash equal
//! what they would be now, its output files are present with their recorded sizes and
//! sha256 (see `verify`), and [`Stage::still_valid`] agrees. Before a stage runs, the
//! recorded outputs of the stages it reads are checked the same way. Otherwise it reruns: into `.staging/STAGE-PID/`, renamed to
//! `STAGE/` only after it returned successfully and its outputs were hashed. The manifest
//! marks the stage `running` before it starts and `complete` only after the rename, so a
//! process killed at any moment leaves nothing a later run trusts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::util::fsx::{list_files, remove_dir_if_exists};
use crate::util::hash::{sha256_file, sha256_json};
use crate::util::{mem, now_rfc3339};

use super::manifest::{Manifest, OutputFile, StageRecord, StageStatus};
use super::query_set::{complete_sets, is_set_folder, record_name, QuerySet, QUERY_SET_STAGES};
use super::rundir::RunDir;
use super::stage::{Registry, Stage, StageContext, Workers};
use super::verify::{remember, stage_mismatch};

/// What the runner did with one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reused: complete with unchanged inputs and config.
    Skipped,
    /// Ran and completed.
    Ran,
}

/// Options of one runner invocation.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Rerun this stage and every later one, even if complete.
    pub force: Option<String>,
    /// Accept a run directory made with a different config (rerun what the change affects).
    pub allow_config_change: bool,
    /// The worker processes stages may start.
    pub workers: Workers,
}

/// The hashes that decide whether a stage's record is current.
#[derive(Debug, Clone)]
pub struct StageKey {
    /// SHA-256 of the stage's config view.
    pub config_hash: String,
    /// What it reads, by name, with hashes.
    pub inputs: BTreeMap<String, String>,
    /// SHA-256 over `inputs`.
    pub inputs_hash: String,
    /// `inputs_hash` as builds before [`Stage::unread_inputs`] computed it (every upstream
    /// file counted): a record that matches it matches `inputs_hash` too (nothing it read
    /// changed), so a run directory made by such a build is reused as it is, not recomputed.
    pub legacy_inputs_hash: String,
}

/// Computes a stage's key from the config and its upstream records. Errors when an
/// upstream stage is missing or incomplete; optional inputs count only when complete.
pub fn stage_key(stage: &dyn Stage, config: &Config, manifest: &Manifest) -> Result<StageKey> {
    stage_key_for(stage, config, manifest, None)
}

/// [`stage_key`] of the instance of `stage` for query set `set` (`None`: the default set).
/// A per-set stage reads the per-set stages upstream of it in its own set
/// (`stage:query/query_set=NAME`); the default `report` also reads every set's complete
/// `score` (`set:score/query_set=NAME`), so it reruns when a set appears or changes.
pub fn stage_key_for(
    stage: &dyn Stage,
    config: &Config,
    manifest: &Manifest,
    set: Option<&str>,
) -> Result<StageKey> {
    let config_hash = sha256_json(&stage.config_view(config));
    let (mut inputs, mut legacy) = (BTreeMap::new(), BTreeMap::new());
    let unread = |up: &str, path: &str| {
        stage.unread_inputs().iter().any(|&(s, p)| {
            s == up
                && path
                    .strip_prefix(up)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| r == p || (p.ends_with('/') && r.starts_with(p)))
        })
    };
    let hash_of = |up: &str, r: &StageRecord| {
        let read: Vec<&OutputFile> = r.outputs.iter().filter(|o| !unread(up, &o.path)).collect();
        sha256_json(&serde_json::to_value(read).expect("outputs serialise"))
    };
    for up in stage.inputs() {
        let name = record_name(up, set);
        match manifest.stages.get(&name) {
            Some(r) if r.status == StageStatus::Complete => {
                inputs.insert(format!("stage:{name}"), hash_of(up, r));
                legacy.insert(format!("stage:{name}"), r.outputs_hash());
            }
            _ => {
                return Err(Error::Pipeline(format!(
                    "stage `{}` reads the outputs of `{name}`, which has not completed in this \
                     run directory; run `{up}` first (or use `source-tda run` with a pipeline \
                     that lists both)",
                    stage.name()
                )))
            }
        }
    }
    for up in stage.optional_inputs() {
        if let Some(r) = manifest.stages.get(*up) {
            if r.status == StageStatus::Complete {
                inputs.insert(format!("optional:{up}"), hash_of(up, r));
                legacy.insert(format!("optional:{up}"), r.outputs_hash());
            }
        }
    }
    if set.is_none() && stage.name() == "report" {
        for name in complete_sets(manifest, "score") {
            let rec = record_name("score", Some(&name));
            let h = manifest.stages[&rec].outputs_hash();
            inputs.insert(format!("set:{rec}"), h.clone());
            legacy.insert(format!("set:{rec}"), h);
        }
    }
    let hash = |m: &BTreeMap<String, String>| {
        sha256_json(&serde_json::to_value(m).expect("map serialises"))
    };
    Ok(StageKey {
        config_hash,
        inputs_hash: hash(&inputs),
        legacy_inputs_hash: hash(&legacy),
        inputs,
    })
}

impl StageKey {
    /// The first 16 hex digits of SHA-256(inputs hash, config hash): names the stage's resume
    /// folder ([`StageContext::resume_key`]) and tags a shard's partial results, so that
    /// state made under another config or other inputs is never reused.
    pub fn resume_key(&self) -> String {
        crate::util::hash::sha256_bytes(
            format!("{}\n{}", self.inputs_hash, self.config_hash).as_bytes(),
        )[..16]
            .to_string()
    }

    /// Adds an input that is not an upstream stage (a query set's definition).
    pub fn with_input(mut self, name: String, hash: String) -> StageKey {
        self.inputs.insert(name.clone(), hash.clone());
        self.inputs_hash = sha256_json(&serde_json::to_value(&self.inputs).expect("map"));
        self.legacy_inputs_hash = self.inputs_hash.clone();
        self
    }
}

/// Why a completed record cannot be reused, or `None` when it can.
pub fn staleness(
    stage: &dyn Stage,
    run: &RunDir,
    record: &StageRecord,
    key: &StageKey,
) -> Result<Option<String>> {
    if record.status != StageStatus::Complete {
        return Ok(Some(
            format!("status is {:?}", record.status).to_lowercase(),
        ));
    }
    if record.config_hash != key.config_hash {
        return Ok(Some("its part of the config changed".into()));
    }
    if record.inputs_hash != key.inputs_hash && record.inputs_hash != key.legacy_inputs_hash {
        return Ok(Some("its inputs changed".into()));
    }
    if let Some(why) = stage_mismatch(run, record)? {
        return Ok(Some(why));
    }
    if !stage.still_valid(run, record)? {
        return Ok(Some(
            "files it resolved outside the run directory changed".into(),
        ));
    }
    Ok(None)
}

/// Runs `stages` (names, in order, each found in `registry`) of `config` in `run`.
pub fn run_stages(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
    stages: &[String],
    opts: &RunOptions,
) -> Result<Vec<(String, Outcome)>> {
    run_stages_for(registry, config, config_file, run, stages, opts, None)
}

/// [`run_stages`] with the per-set stages (`query`, `score`) run for the named query set
/// `set` instead of the default one (each recorded as `STAGE/query_set=NAME`, written to
/// `RUN_DIR/STAGE/query_set=NAME/`); the other stages run as usual. Outcomes are named by
/// record (`score/query_set=NAME`).
pub fn run_stages_for(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
    stages: &[String],
    opts: &RunOptions,
    set: Option<&QuerySet>,
) -> Result<Vec<(String, Outcome)>> {
    let stage_objs: Vec<&dyn Stage> = stages
        .iter()
        .map(|s| registry.find(s))
        .collect::<Result<_>>()?;
    if let Some(f) = &opts.force {
        if !stages.iter().any(|s| s == f) {
            return Err(Error::Pipeline(format!(
                "--force {f}: `{f}` is not among the stages being run ({})",
                stages.join(", ")
            )));
        }
    }
    std::fs::create_dir_all(run.path()).ctx("creating run directory", run.path())?;
    let _lock = run.lock()?;
    let mut manifest = run.open_for(config, config_file, opts.allow_config_change)?;
    run.clear_staging()?;

    let mut forcing = false;
    let mut outcomes = Vec::new();
    for &stage in &stage_objs {
        let name = stage.name();
        let set = set.filter(|_| QUERY_SET_STAGES.contains(&name));
        let record_key = record_name(name, set.map(|s| s.name.as_str()));
        forcing |= opts.force.as_deref() == Some(name);
        let mut key = stage_key_for(stage, config, &manifest, set.map(|s| s.name.as_str()))?;
        if let Some(s) = set.filter(|_| name == QUERY_SET_STAGES[0]) {
            key = key.with_input(format!("query_set:{}", s.name), s.spec_hash());
        }
        if !forcing {
            if let Some(record) = manifest.stages.get(&record_key) {
                match staleness(stage, run, record, &key)? {
                    None => {
                        tracing::info!(
                            "{record_key}: complete, inputs and config unchanged; skipping"
                        );
                        if record.inputs_hash != key.inputs_hash {
                            // Current by the hash of a build that counted every upstream file:
                            // record the precise inputs from now on.
                            let mut upgraded = record.clone();
                            upgraded.inputs = key.inputs;
                            upgraded.inputs_hash = key.inputs_hash;
                            manifest.stages.insert(record_key.clone(), upgraded);
                            manifest.save(&run.manifest_path())?;
                        }
                        outcomes.push((record_key, Outcome::Skipped));
                        continue;
                    }
                    Some(why) => tracing::info!("{record_key}: rerunning because {why}"),
                }
            }
        }
        verify_inputs(stage, run, &manifest, set.map(|s| s.name.as_str()))?;
        run_one(
            stage,
            registry,
            config,
            (config_file, opts),
            run,
            &mut manifest,
            (key, set),
        )?;
        outcomes.push((record_key, Outcome::Ran));
    }
    Ok(outcomes)
}

/// Checks the recorded outputs of the stages `stage` reads against the manifest before it
/// reads them. A changed file of a stage being run in this invocation was found stale and
/// rerun already; one of a stage outside it is an error that says to rerun that stage.
fn verify_inputs(
    stage: &dyn Stage,
    run: &RunDir,
    manifest: &Manifest,
    set: Option<&str>,
) -> Result<()> {
    for up in stage.inputs().iter().chain(stage.optional_inputs()) {
        let Some(record) = manifest.stages.get(&record_name(up, set)) else {
            continue;
        };
        if record.status != StageStatus::Complete {
            continue;
        }
        if let Some(why) = stage_mismatch(run, record)? {
            return Err(Error::Pipeline(format!(
                "stage `{}` reads the outputs of `{up}`, but {why}, so `{up}` is stale; rerun \
                 `{up}` first (a run of a pipeline that lists it, or `source-tda {up}` with this \
                 --run-dir, redoes it), then `{}`",
                stage.name(),
                stage.name()
            )));
        }
    }
    Ok(())
}

fn run_one(
    stage: &dyn Stage,
    registry: &Registry,
    config: &Config,
    (config_file, opts): (&Path, &RunOptions),
    run: &RunDir,
    manifest: &mut Manifest,
    (key, set): (StageKey, Option<&QuerySet>),
) -> Result<()> {
    let stage_name = stage.name();
    let set_name = set.map(|s| s.name.as_str());
    // The manifest record and folder (`score/query_set=NAME` for a set's instance), and a
    // flat form of it for the staging and resume folders (`score@NAME`).
    let name = record_name(stage_name, set_name);
    let flat = match set_name {
        Some(s) => format!("{stage_name}@{s}"),
        None => stage_name.to_string(),
    };
    tracing::info!("{name}: {}", stage.describe());
    crate::util::progress::set_stage(stage_name);
    let resume_key = key.resume_key();
    run.clear_resume(&flat, Some(&resume_key))?;
    let staging = run
        .staging_dir()
        .join(format!("{flat}-{}", std::process::id()));
    remove_dir_if_exists(&staging)?;
    std::fs::create_dir_all(&staging).ctx("creating", &staging)?;

    let mut record = StageRecord {
        status: StageStatus::Running,
        started_at: now_rfc3339(),
        finished_at: None,
        wall_s: None,
        peak_rss_bytes: None,
        tool_version: crate::VERSION.to_string(),
        git_commit: crate::GIT_COMMIT.map(str::to_string),
        config_hash: key.config_hash,
        inputs_hash: key.inputs_hash,
        inputs: key.inputs,
        outputs: Vec::new(),
        summary: serde_json::Value::Null,
        error: None,
    };
    manifest.stages.insert(name.clone(), record.clone());
    manifest.save(&run.manifest_path())?;

    mem::reset_peak_rss();
    let t0 = Instant::now();
    let ctx = StageContext {
        config,
        run,
        registry,
        out_dir: staging.clone(),
        stage: stage_name,
        resume_key,
        config_file,
        workers: &opts.workers,
        query_set: set,
    };
    let result = stage.run(&ctx).and_then(|summary| {
        ctx.failpoint("before-commit")?;
        Ok(summary)
    });
    record.wall_s = Some(t0.elapsed().as_secs_f64());
    record.peak_rss_bytes = mem::peak_rss_bytes();
    record.finished_at = Some(now_rfc3339());

    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            record.status = StageStatus::Failed;
            record.error = Some(e.to_string());
            manifest.stages.insert(name.clone(), record);
            manifest.save(&run.manifest_path())?;
            let _ = remove_dir_if_exists(&staging);
            return Err(e);
        }
    };

    // Hash what the stage wrote, then swap the folder into place.
    let mut outputs = Vec::new();
    for rel in list_files(&staging)? {
        let p = staging.join(&rel);
        let bytes = std::fs::metadata(&p).ctx("reading metadata of", &p)?.len();
        outputs.push(OutputFile {
            path: Path::new(&name).join(&rel).to_string_lossy().into_owned(),
            bytes,
            sha256: sha256_file(&p)?,
        });
    }
    let final_dir = run.stage_dir(&name);
    let trash = run
        .staging_dir()
        .join(format!("{flat}-old-{}", std::process::id()));
    if final_dir.exists() {
        std::fs::rename(&final_dir, &trash).ctx("moving aside", &final_dir)?;
    }
    if let Some(parent) = final_dir.parent() {
        std::fs::create_dir_all(parent).ctx("creating", parent)?;
    }
    std::fs::rename(&staging, &final_dir).ctx("renaming into place", &final_dir)?;
    if set.is_none() {
        keep_set_folders(&trash, &final_dir)?;
    }
    // A rename keeps size and modification time: later stages reading these files in this
    // process need not hash them again.
    for out in &outputs {
        remember(&run.path().join(&out.path), &out.sha256)?;
    }

    record.status = StageStatus::Complete;
    record.outputs = outputs;
    record.summary = summary;
    tracing::info!(
        "{name}: done in {}, peak RSS {}",
        crate::util::num::duration(record.wall_s.unwrap_or(0.0)),
        record
            .peak_rss_bytes
            .map(mem::human_bytes)
            .unwrap_or_else(|| "unknown".into())
    );
    manifest.stages.insert(name, record);
    manifest.save(&run.manifest_path())?;
    run.clear_staging()?;
    run.clear_resume(&flat, None)?;
    Ok(())
}

/// Moves the query sets' folders (`query_set=NAME/`, recorded on their own) from the default
/// instance's previous folder `old` into its new one: a rerun of the default set keeps them.
fn keep_set_folders(old: &Path, new: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(old) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        if is_set_folder(&file_name.to_string_lossy()) {
            let to = new.join(&file_name);
            std::fs::rename(entry.path(), &to).ctx("keeping query set folder", &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reader;
    impl Stage for Reader {
        fn name(&self) -> &'static str {
            "report"
        }
        fn describe(&self) -> &'static str {
            "test"
        }
        fn inputs(&self) -> &'static [&'static str] {
            &["score"]
        }
        fn optional_inputs(&self) -> &'static [&'static str] {
            &["eval-lds"]
        }
        fn config_view(&self, _: &Config) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn run(&self, _: &StageContext) -> Result<serde_json::Value> {
            Ok(serde_json::Value::Null)
        }
    }

    fn record(status: StageStatus, sha: &str) -> StageRecord {
        StageRecord {
            status,
            started_at: String::new(),
            finished_at: None,
            wall_s: None,
            peak_rss_bytes: None,
            tool_version: String::new(),
            git_commit: None,
            config_hash: String::new(),
            inputs_hash: String::new(),
            inputs: BTreeMap::new(),
            outputs: vec![OutputFile {
                path: "x".into(),
                bytes: 1,
                sha256: sha.into(),
            }],
            summary: serde_json::Value::Null,
            error: None,
        }
    }

    #[test]
    fn optional_inputs_count_only_when_complete_and_change_the_key() {
        let config = Config::from_str_at(
            "[model]\nid = \"./m\"\n[data.train]\nid = \"./d.jsonl\"\n",
            Path::new("c.toml"),
            Path::new("/tmp"),
        )
        .unwrap();
        let mut m = Manifest::new(Path::new("c.toml"), String::new());
        let e = stage_key(&Reader, &config, &m).unwrap_err().to_string();
        assert!(e.contains("reads the outputs of `score`"), "{e}");
        m.stages
            .insert("score".into(), record(StageStatus::Complete, "a"));
        let without = stage_key(&Reader, &config, &m).unwrap();
        assert_eq!(without.inputs.len(), 1);

        m.stages
            .insert("eval-lds".into(), record(StageStatus::Failed, "b"));
        let failed = stage_key(&Reader, &config, &m).unwrap();
        assert_eq!(failed.inputs_hash, without.inputs_hash, "failed: ignored");

        m.stages
            .insert("eval-lds".into(), record(StageStatus::Complete, "b"));
        let with = stage_key(&Reader, &config, &m).unwrap();
        assert_ne!(with.inputs_hash, without.inputs_hash);
        assert!(with.inputs.contains_key("optional:eval-lds"));

        m.stages
            .insert("eval-lds".into(), record(StageStatus::Complete, "c"));
        let changed = stage_key(&Reader, &config, &m).unwrap();
        assert_ne!(changed.inputs_hash, with.inputs_hash);
    }
}
