//! Owns the run directory's layout, its lock, and opening it for a config.
//! Layer: pipeline — may import ground (error, util, config, output) only; sibling
//! `manifest`.
//!
//! The run directory: one folder per run holding the resolved config, the manifest and one
//! folder per completed stage.
//!
//! ```text
//! RUN_DIR/
//!   config.toml        the resolved config the run was made with
//!   manifest.json      stage records (status, timings, memory, hashes)
//!   fetch/  prepare/   one folder per completed stage
//!   .staging/          stages being written (never trusted; cleared on the next run)
//!   .resume/STAGE-KEY/ a stage's resume state across interrupted runs (see
//!                      `StageContext::resume_dir`); deleted when the stage completes
//!   .lock              pid of the process using the directory
//! ```

use std::path::{Path, PathBuf};

use crate::config::{diff_values, Config};
use crate::error::{Error, IoContext, Result};
use crate::util::fsx::{remove_dir_if_exists, write_atomic};
use crate::util::hash::sha256_json;

use super::manifest::Manifest;

/// An opened run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// A handle on `path` (nothing is created).
    pub fn at(path: &Path) -> Result<RunDir> {
        let path = std::path::absolute(path).ctx("resolving", path)?;
        Ok(RunDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `RUN_DIR/manifest.json`.
    pub fn manifest_path(&self) -> PathBuf {
        self.path.join("manifest.json")
    }

    /// `RUN_DIR/config.toml`, the resolved config.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.toml")
    }

    /// `RUN_DIR/STAGE/`, the completed outputs of a stage.
    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.path.join(stage)
    }

    /// `RUN_DIR/.staging/`, where stages write before their folder is renamed into place.
    pub fn staging_dir(&self) -> PathBuf {
        self.path.join(".staging")
    }

    /// `RUN_DIR/.resume/STAGE-KEY/`: resume state of `stage` for inputs+config key `key`.
    pub fn resume_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.path.join(".resume").join(format!("{stage}-{key}"))
    }

    /// Deletes `stage`'s resume folders except the one of key `keep` (all when `None`).
    pub fn clear_resume(&self, stage: &str, keep: Option<&str>) -> Result<()> {
        let root = self.path.join(".resume");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        let keep = keep.map(|k| format!("{stage}-{k}"));
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix(stage)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|k| !k.contains('-'));
            if ours && keep.as_deref() != Some(name.as_str()) {
                tracing::debug!("removing resume state {}", entry.path().display());
                remove_dir_if_exists(&entry.path())?;
            }
        }
        if std::fs::read_dir(&root).is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&root);
        }
        Ok(())
    }

    /// Whether a manifest exists.
    pub fn exists(&self) -> bool {
        self.manifest_path().exists()
    }

    /// Reads the manifest.
    pub fn manifest(&self) -> Result<Manifest> {
        if !self.exists() {
            return Err(Error::Pipeline(format!(
                "{} is not a source-tda run directory (no manifest.json); run a pipeline into \
                 it first, e.g. `source-tda run pipelines/demo.toml --run-dir {}`",
                self.path.display(),
                self.path.display()
            )));
        }
        Manifest::load(&self.manifest_path())
    }

    /// Opens the directory for `config`, creating it if new. An existing directory made with
    /// a different config is refused, listing the keys that differ, unless
    /// `allow_config_change` (then the new config replaces the old, and the runner reruns the
    /// stages whose part of the config changed).
    pub fn open_for(
        &self,
        config: &Config,
        config_file: &Path,
        allow_config_change: bool,
    ) -> Result<Manifest> {
        let new_json = config.to_json();
        let hash = sha256_json(&new_json);
        std::fs::create_dir_all(&self.path).ctx("creating run directory", &self.path)?;
        if !self.exists() {
            let manifest = Manifest::new(config_file, hash);
            write_atomic(&self.config_path(), config.to_toml().as_bytes())?;
            manifest.save(&self.manifest_path())?;
            return Ok(manifest);
        }
        let mut manifest = self.manifest()?;
        if manifest.config_hash == hash {
            return Ok(manifest);
        }
        let old = self.stored_config_json()?;
        let changes = diff_values(&old, &new_json);
        if !allow_config_change {
            let list: Vec<String> = changes.iter().map(|c| format!("  {c}")).collect();
            return Err(Error::Pipeline(format!(
                "{} was made with a different config; these keys differ (old → new):\n{}\n\
                 Use another --run-dir for a separate run, or pass --allow-config-change to \
                 rerun the stages these keys affect here.",
                self.path.display(),
                if list.is_empty() {
                    "  (the stored config could not be compared key by key)".to_string()
                } else {
                    list.join("\n")
                }
            )));
        }
        tracing::warn!(
            "config changed ({} keys: {}); stages that depend on them will rerun",
            changes.len(),
            changes
                .iter()
                .map(|c| c.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        write_atomic(&self.config_path(), config.to_toml().as_bytes())?;
        manifest.config_hash = hash;
        manifest.config_path = config_file.display().to_string();
        manifest.save(&self.manifest_path())?;
        Ok(manifest)
    }

    /// The stored resolved config, as JSON.
    pub fn stored_config_json(&self) -> Result<serde_json::Value> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).ctx("reading", &path)?;
        let value: toml::Value = toml::from_str(&text)
            .map_err(|e| Error::config(&path, format!("stored config is not valid TOML: {e}")))?;
        Ok(serde_json::to_value(value).expect("TOML values convert to JSON"))
    }

    /// Takes the directory's lock (`RUN_DIR/.lock` with this process's pid). A lock left by
    /// a process that no longer exists is taken over. The lock appears with its pid already
    /// in it (written to a file of this process's own, then hard-linked into place), so a
    /// process starting at the same moment never sees an empty lock and takes it for stale.
    pub fn lock(&self) -> Result<RunLock> {
        let path = self.path.join(".lock");
        let mine = self.path.join(format!(".lock.{}", std::process::id()));
        for _ in 0..3 {
            write_atomic(&mine, std::process::id().to_string().as_bytes())?;
            let linked = std::fs::hard_link(&mine, &path);
            let _ = std::fs::remove_file(&mine);
            let taken = match linked {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
                // A file system without hard links: create the lock, then write the pid.
                Err(_) => std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .and_then(|mut f| {
                        use std::io::Write;
                        write!(f, "{}", std::process::id())
                    }),
            };
            match taken {
                Ok(()) => return Ok(RunLock { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if pid != std::process::id() && process_alive(pid) => {
                            return Err(Error::Pipeline(format!(
                                "{} is in use by another source-tda process (pid {pid}); wait \
                                 for it to finish or stop it",
                                self.path.display()
                            )));
                        }
                        _ => {
                            tracing::debug!("taking over a stale lock {}", path.display());
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io("creating", &path, e)),
            }
        }
        Err(Error::Pipeline(format!(
            "could not take the lock {}",
            path.display()
        )))
    }

    /// Removes half-written stage folders left by interrupted runs.
    pub fn clear_staging(&self) -> Result<()> {
        remove_dir_if_exists(&self.staging_dir())
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Holds a run directory's lock; released on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_appears_with_its_pid_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::at(dir.path()).unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let lock = run.lock().unwrap();
        assert_eq!(names(), [".lock"]);
        let pid = std::fs::read_to_string(dir.path().join(".lock")).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        drop(lock);
        assert!(names().is_empty(), "released");
        // An empty or unreadable lock (a crash, another tool) is stale: taken over.
        std::fs::write(dir.path().join(".lock"), "").unwrap();
        let lock = run.lock().unwrap();
        assert_eq!(names(), [".lock"]);
        drop(lock);
        // A live holder (pid 1 always exists) is respected.
        std::fs::write(dir.path().join(".lock"), "1").unwrap();
        let e = run.lock().unwrap_err().to_string();
        assert!(
            e.contains("in use by another source-tda process (pid 1)"),
            "{e}"
        );
        assert_eq!(
            names(),
            [".lock"],
            "the refused attempt left nothing behind"
        );
    }
}
