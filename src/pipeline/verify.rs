//! Owns checking a run directory's files against the sha256 its manifest recorded: before a
//! stage is skipped or its outputs are read, and for `source-tda verify`.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`.
//!
//! A file is hashed (streamed) at most once per process while its size and modification time
//! stay what they were when it was hashed, so a pipeline run hashes each recorded file once,
//! however many later stages read it; the files a stage has just written are remembered with
//! the hashes the runner computed for the manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::error::{Error, IoContext, Result};
use crate::util::hash::sha256_file;

use super::manifest::{OutputFile, StageRecord, StageStatus};
use super::rundir::RunDir;

/// What this process has hashed: the file (canonical path) → its size and modification time
/// when hashed, and the sha256.
type Hashed = HashMap<PathBuf, (u64, Option<SystemTime>, String)>;

fn hashed() -> &'static Mutex<Hashed> {
    static HASHED: OnceLock<Mutex<Hashed>> = OnceLock::new();
    HASHED.get_or_init(Default::default)
}

fn identity(path: &Path) -> Result<(PathBuf, u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path).ctx("reading metadata of", path)?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok((canonical, meta.len(), meta.modified().ok()))
}

/// The sha256 of `path`, streamed; a file this process already hashed and that has kept its
/// size and modification time is not read again.
pub(crate) fn sha256_once(path: &Path) -> Result<String> {
    let (key, len, modified) = identity(path)?;
    if let Some((l, m, sha)) = hashed().lock().expect("hash cache").get(&key) {
        if *l == len && *m == modified {
            return Ok(sha.clone());
        }
    }
    let sha = sha256_file(path)?;
    hashed()
        .lock()
        .expect("hash cache")
        .insert(key, (len, modified, sha.clone()));
    Ok(sha)
}

/// Records that `path`, as it is now, has sha256 `sha` (the runner hashed it for the
/// manifest), so that reading it in a later stage of this process does not hash it again.
pub(crate) fn remember(path: &Path, sha: &str) -> Result<()> {
    let (key, len, modified) = identity(path)?;
    hashed()
        .lock()
        .expect("hash cache")
        .insert(key, (len, modified, sha.to_string()));
    Ok(())
}

/// Why the recorded output `out` of `run` is not what the manifest says (missing, another
/// size, another sha256), naming the file; `None` when it matches.
pub fn output_mismatch(run: &RunDir, out: &OutputFile) -> Result<Option<String>> {
    let p = run.path().join(&out.path);
    let len = match std::fs::metadata(&p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(format!("{} is missing", out.path)))
        }
        Err(e) => return Err(Error::io("reading metadata of", &p, e)),
    };
    if len != out.bytes {
        return Ok(Some(format!(
            "{} changed on disk ({len} bytes, the manifest records {})",
            out.path, out.bytes
        )));
    }
    if sha256_once(&p)? != out.sha256 {
        return Ok(Some(format!(
            "{} changed on disk (sha256 differs from the manifest)",
            out.path
        )));
    }
    Ok(None)
}

/// The first recorded output of `stage` in `run` that differs from the manifest (why), or
/// `None` when all match or the stage has no complete record.
pub fn stage_mismatch(run: &RunDir, record: &StageRecord) -> Result<Option<String>> {
    for out in &record.outputs {
        if let Some(why) = output_mismatch(run, out)? {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

/// One recorded file that differs from the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The stage that wrote it.
    pub stage: String,
    /// What is wrong, naming the file (relative to the run directory).
    pub problem: String,
}

/// What [`verify_run`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Recorded files checked.
    pub files: usize,
    /// Their recorded bytes, in all.
    pub bytes: u64,
    /// Stages with a complete record (whose files were checked).
    pub stages: Vec<String>,
    /// Every file that differs, in manifest order.
    pub mismatches: Vec<Mismatch>,
}

impl Verification {
    /// `Ok` when every recorded file matches; otherwise an error naming each mismatch and
    /// what to do.
    pub fn into_result(self) -> Result<()> {
        if self.mismatches.is_empty() {
            return Ok(());
        }
        let mut stages: Vec<&str> = self.mismatches.iter().map(|m| m.stage.as_str()).collect();
        stages.dedup();
        let lines: Vec<String> = self
            .mismatches
            .iter()
            .map(|m| format!("  {} (stage `{}`)", m.problem, m.stage))
            .collect();
        Err(Error::Pipeline(format!(
            "{}: {} of {} recorded file(s) differ from manifest.json:\n{}\n\
             Rerun the pipeline (or the stages {}) into this run directory: a stage whose files \
             changed is stale and reruns, and so do the stages that read it where its new \
             outputs differ.",
            self.run_dir.display(),
            self.mismatches.len(),
            self.files,
            lines.join("\n"),
            stages.join(", ")
        )))
    }
}

/// Checks every file recorded by the complete stages of `run`'s manifest (presence, size,
/// sha256).
pub fn verify_run(run: &RunDir) -> Result<Verification> {
    let manifest = run.manifest()?;
    let mut v = Verification {
        run_dir: run.path().to_path_buf(),
        files: 0,
        bytes: 0,
        stages: Vec::new(),
        mismatches: Vec::new(),
    };
    // Pipeline order first, then any stage this version does not know, by name.
    let mut names: Vec<&String> = manifest.stages.keys().collect();
    let order = |n: &str| {
        crate::config::STAGE_ORDER
            .iter()
            .position(|s| *s == n)
            .unwrap_or(usize::MAX)
    };
    names.sort_by_key(|n| (order(n), n.as_str()));
    for name in names {
        let record = &manifest.stages[name];
        if record.status != StageStatus::Complete {
            continue;
        }
        v.stages.push(name.clone());
        for out in &record.outputs {
            v.files += 1;
            v.bytes += out.bytes;
            if let Some(problem) = output_mismatch(run, out)? {
                v.mismatches.push(Mismatch {
                    stage: name.clone(),
                    problem,
                });
            }
        }
    }
    Ok(v)
}
