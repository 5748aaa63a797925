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
//!   .lock              the process using the directory: pid, start time, boot id
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

    /// Takes the directory's lock (`RUN_DIR/.lock` naming this process: its pid and, on
    /// Linux, its start time and the boot id, see [`LockHolder`]). A lock whose holder no
    /// longer exists is taken over: a dead pid, or a live pid whose start time or boot differs
    /// (the pid now belongs to another process). The lock appears with its content already in
    /// it (written to a file of this process's own, then hard-linked into place), so a process
    /// starting at the same moment never sees an empty lock and takes it for stale.
    pub fn lock(&self) -> Result<RunLock> {
        let path = self.path.join(".lock");
        let mine = self.path.join(format!(".lock.{}", std::process::id()));
        let me = LockHolder::current().to_string();
        for _ in 0..3 {
            write_atomic(&mine, me.as_bytes())?;
            let linked = std::fs::hard_link(&mine, &path);
            let _ = std::fs::remove_file(&mine);
            let taken = match linked {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
                // A file system without hard links: create the lock, then write the holder.
                Err(_) => std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .and_then(|mut f| {
                        use std::io::Write;
                        write!(f, "{me}")
                    }),
            };
            match taken {
                Ok(()) => return Ok(RunLock { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| LockHolder::parse(&s));
                    match holder {
                        Some(h) if h.pid != std::process::id() && h.is_running() => {
                            return Err(Error::Pipeline(format!(
                                "{dir} is in use by another source-tda process (pid {pid}); wait \
                                 for it to finish or stop it. If no source-tda process is using \
                                 this directory (check with `ps -p {pid}`), the lock is stale: \
                                 delete {lock} and run again",
                                dir = self.path.display(),
                                pid = h.pid,
                                lock = path.display(),
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
            "could not take the lock {}; if no source-tda process is using {}, delete the lock \
             file and run again",
            path.display(),
            self.path.display()
        )))
    }

    /// Removes half-written stage folders left by interrupted runs.
    pub fn clear_staging(&self) -> Result<()> {
        remove_dir_if_exists(&self.staging_dir())
    }
}

/// Who holds a run directory's lock, as written in `.lock`: `PID [START BOOT]`, where START is
/// the process's start time (field 22 of `/proc/PID/stat`, clock ticks since boot) and BOOT
/// the kernel's boot id. A pid alone (an older lock, or a system without `/proc`) is checked by
/// the pid being alive; with START and BOOT, the process must also be the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot, when known.
    pub start: Option<u64>,
    /// The boot id of the system it ran on, when known.
    pub boot: Option<String>,
}

impl LockHolder {
    /// This process.
    pub fn current() -> LockHolder {
        let pid = std::process::id();
        LockHolder {
            pid,
            start: process_start(pid),
            boot: boot_id(),
        }
    }

    /// Parses a lock file's content; `None` when it names no pid (empty, another tool's).
    pub fn parse(text: &str) -> Option<LockHolder> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse::<u32>().ok()?;
        let start = words.next().and_then(|w| w.parse::<u64>().ok());
        let boot = words.next().map(str::to_string);
        Some(LockHolder { pid, start, boot })
    }

    /// Whether the process that wrote the lock is still running: its pid is alive and, where
    /// the lock and this system both say, it started at the same time in the same boot.
    pub fn is_running(&self) -> bool {
        if let (Some(theirs), Some(now)) = (&self.boot, boot_id()) {
            if *theirs != now {
                return false; // written before a reboot
            }
        }
        if !process_alive(self.pid) {
            return false;
        }
        match (self.start, process_start(self.pid)) {
            (Some(theirs), Some(now)) => theirs == now,
            _ => true,
        }
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.pid)?;
        if let (Some(start), Some(boot)) = (self.start, &self.boot) {
            write!(f, " {start} {boot}")?;
        }
        Ok(())
    }
}

/// Start time of process `pid` (clock ticks since boot, field 22 of `/proc/PID/stat`); `None`
/// without `/proc` or when the process is gone.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may hold spaces and parentheses itself:
    // the fields after it start after the last ')', with field 3 (the state) first.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The kernel's boot id (Linux), which changes on every boot.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| id.to_string())
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Without `/proc`: `ps -p PID` succeeds for a live process, whoever owns it. When `ps` cannot
/// be run the lock is respected (its message says how to clear it).
#[cfg(all(unix, not(target_os = "linux")))]
fn process_alive(pid: u32) -> bool {
    let status = std::process::Command::new("ps")
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    !matches!(status, Ok(s) if !s.success())
}

/// Elsewhere the pid cannot be checked: the lock is respected, and its message says how to
/// clear it.
#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
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
        let text = std::fs::read_to_string(dir.path().join(".lock")).unwrap();
        assert_eq!(LockHolder::parse(&text), Some(LockHolder::current()));
        assert_eq!(LockHolder::current().pid, std::process::id());
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

    #[cfg(target_os = "linux")]
    #[test]
    fn a_live_pid_of_another_process_is_a_stale_lock_and_the_message_says_how_to_clear_it() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::at(dir.path()).unwrap();
        let lock = dir.path().join(".lock");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let real = LockHolder {
            pid: child.id(),
            start: process_start(child.id()),
            boot: boot_id(),
        };
        assert!(real.start.is_some() && real.boot.is_some(), "{real:?}");
        // The holder itself, same pid, start time and boot: respected, with the way out named.
        std::fs::write(&lock, real.to_string()).unwrap();
        let e = run.lock().unwrap_err().to_string();
        assert!(e.contains(&format!("(pid {})", real.pid)), "{e}");
        assert!(
            e.contains(&format!(
                "the lock is stale: delete {} and run again",
                lock.display()
            )),
            "{e}"
        );
        // The same live pid with another start time: the pid was reused, the lock is stale.
        let reused = LockHolder {
            start: real.start.map(|s| s + 1),
            ..real.clone()
        };
        std::fs::write(&lock, reused.to_string()).unwrap();
        let held = run.lock().unwrap();
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(LockHolder::parse(&text), Some(LockHolder::current()));
        drop(held);
        // Written before a reboot (another boot id): stale too.
        let rebooted = LockHolder {
            boot: Some("00000000-0000-0000-0000-000000000000".into()),
            ..real.clone()
        };
        std::fs::write(&lock, rebooted.to_string()).unwrap();
        drop(run.lock().unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        // Its pid gone: stale.
        std::fs::write(&lock, real.to_string()).unwrap();
        drop(run.lock().unwrap());
    }

    #[test]
    fn lock_files_parse() {
        let h = LockHolder::parse("42 1234 abc-def\n").unwrap();
        assert_eq!(
            (h.pid, h.start, h.boot.as_deref()),
            (42, Some(1234), Some("abc-def"))
        );
        assert_eq!(h.to_string(), "42 1234 abc-def");
        let old = LockHolder::parse("42").unwrap();
        assert_eq!((old.pid, old.start, old.boot.as_deref()), (42, None, None));
        assert_eq!(old.to_string(), "42");
        assert_eq!(LockHolder::parse(""), None);
        assert_eq!(LockHolder::parse("x 1 2"), None);
    }
}
