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
}

/// Computes a stage's key from the config and its upstream records. Errors when an
/// upstream stage is missing or incomplete; optional inputs count only when complete.
pub fn stage_key(stage: &dyn Stage, config: &Config, manifest: &Manifest) -> Result<StageKey> {
    let config_hash = sha256_json(&stage.config_view(config));
    let mut inputs = BTreeMap::new();
    for up in stage.inputs() {
        match manifest.stages.get(*up) {
            Some(r) if r.status == StageStatus::Complete => {
                inputs.insert(format!("stage:{up}"), r.outputs_hash());
            }
            _ => {
                return Err(Error::Pipeline(format!(
                    "stage `{}` reads the outputs of `{up}`, which has not completed in this run \
                     directory; run `{up}` first (or use `source-tda run` with a pipeline that \
                     lists both)",
                    stage.name()
                )))
            }
        }
    }
    for up in stage.optional_inputs() {
        if let Some(r) = manifest.stages.get(*up) {
            if r.status == StageStatus::Complete {
                inputs.insert(format!("optional:{up}"), r.outputs_hash());
            }
        }
    }
    let inputs_hash = sha256_json(&serde_json::to_value(&inputs).expect("map serialises"));
    Ok(StageKey {
        config_hash,
        inputs,
        inputs_hash,
    })
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
    if record.inputs_hash != key.inputs_hash {
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
        forcing |= opts.force.as_deref() == Some(name);
        let key = stage_key(stage, config, &manifest)?;
        if !forcing {
            if let Some(record) = manifest.stages.get(name) {
                match staleness(stage, run, record, &key)? {
                    None => {
                        tracing::info!("{name}: complete, inputs and config unchanged; skipping");
                        outcomes.push((name.to_string(), Outcome::Skipped));
                        continue;
                    }
                    Some(why) => tracing::info!("{name}: rerunning because {why}"),
                }
            }
        }
        verify_inputs(stage, run, &manifest)?;
        run_one(
            stage,
            registry,
            config,
            (config_file, opts),
            run,
            &mut manifest,
            key,
        )?;
        outcomes.push((name.to_string(), Outcome::Ran));
    }
    Ok(outcomes)
}

/// Checks the recorded outputs of the stages `stage` reads against the manifest before it
/// reads them. A changed file of a stage being run in this invocation was found stale and
/// rerun already; one of a stage outside it is an error that says to rerun that stage.
fn verify_inputs(stage: &dyn Stage, run: &RunDir, manifest: &Manifest) -> Result<()> {
    for up in stage.inputs().iter().chain(stage.optional_inputs()) {
        let Some(record) = manifest.stages.get(*up) else {
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
    key: StageKey,
) -> Result<()> {
    let name = stage.name();
    tracing::info!("{name}: {}", stage.describe());
    crate::util::progress::set_stage(name);
    let resume_key = crate::util::hash::sha256_bytes(
        format!("{}\n{}", key.inputs_hash, key.config_hash).as_bytes(),
    )[..16]
        .to_string();
    run.clear_resume(name, Some(&resume_key))?;
    let staging = run
        .staging_dir()
        .join(format!("{name}-{}", std::process::id()));
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
    manifest.stages.insert(name.to_string(), record.clone());
    manifest.save(&run.manifest_path())?;

    mem::reset_peak_rss();
    let t0 = Instant::now();
    let ctx = StageContext {
        config,
        run,
        registry,
        out_dir: staging.clone(),
        stage: name,
        resume_key,
        config_file,
        workers: &opts.workers,
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
            manifest.stages.insert(name.to_string(), record);
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
            path: Path::new(name).join(&rel).to_string_lossy().into_owned(),
            bytes,
            sha256: sha256_file(&p)?,
        });
    }
    let final_dir = run.stage_dir(name);
    if final_dir.exists() {
        let trash = run
            .staging_dir()
            .join(format!("{name}-old-{}", std::process::id()));
        std::fs::rename(&final_dir, &trash).ctx("moving aside", &final_dir)?;
    }
    std::fs::rename(&staging, &final_dir).ctx("renaming into place", &final_dir)?;
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
    manifest.stages.insert(name.to_string(), record);
    manifest.save(&run.manifest_path())?;
    run.clear_staging()?;
    run.clear_resume(name, None)?;
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
