//! Owns running retraining jobs in worker processes: `Worker`, `run_workers`, `auto_workers`.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no
//! sibling.
//!
//! Several retrainings at once, one per core. A small model's training step is bound by
//! per-operation overhead, not arithmetic: on the 2-core benchmark machine one demo
//! fine-tune takes less wall time on one thread than on two (docs/performance.md), so one
//! single-threaded retraining per core finishes the most retrainings per minute. Each worker
//! is a process of its own, because candle's CPU thread pool is one per process and
//! serialises its callers. A worker is this program run again on a share of the jobs
//! (`eval lds --shard i/n --no-merge`); it writes each job's result atomically as it finishes
//! (see [`super::retrain`]), so the parent only waits, shows progress from the result files,
//! and reports a worker's failure with the end of its log. The arithmetic of a retraining
//! does not depend on the number of threads (candle's and the project's CPU kernels split
//! work by output, never a sum), so the results are bitwise those of one process (tested).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// Models whose weight files are larger than this retrain one at a time on every core: their
/// steps are long matrix products that threads share well, and each worker holds a copy.
pub const SMALL_MODEL_BYTES: u64 = 256 << 20;

/// How often the parent looks at the workers and the finished jobs.
const POLL: Duration = Duration::from_millis(250);

/// How much of a failed worker's log an error quotes.
const LOG_TAIL_BYTES: usize = 4000;

/// One worker process to start.
pub struct Worker {
    /// The command (program, arguments, environment); its stdout and stderr go to `log`.
    pub command: Command,
    /// Where its output is written.
    pub log: PathBuf,
}

/// The number of worker processes for `jobs` jobs on `cores` cores with a model of
/// `weight_bytes`: one per core, at most one per job, when the model is small (under
/// [`SMALL_MODEL_BYTES`]); else 1 (retrain in this process on every core).
pub fn auto_workers(cores: usize, jobs: usize, weight_bytes: u64) -> usize {
    if weight_bytes > SMALL_MODEL_BYTES {
        return 1;
    }
    cores.min(jobs).max(1)
}

/// Threads per worker when `workers` share `cores`: ⌊cores / workers⌋, at least 1.
pub fn threads_each(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

/// The cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Total size of the weight files (`*.safetensors`, `*.gguf`, `*.bin`) in a model folder.
pub fn model_weight_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).ctx("listing", dir)? {
        let e = e.ctx("listing", dir)?;
        let name = e.file_name().to_string_lossy().to_string();
        if [".safetensors", ".gguf", ".bin"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            total += e.metadata().ctx("reading", e.path())?.len();
        }
    }
    Ok(total)
}

/// Starts every worker and waits for all of them, calling `poll` about four times a second
/// (to show progress). When one fails, the others are stopped (the jobs they finished are
/// kept) and the error names the worker and quotes the end of its log. Logs of workers that
/// succeeded are removed.
pub fn run_workers(workers: Vec<Worker>, mut poll: impl FnMut()) -> Result<()> {
    let mut running: Vec<(usize, Child, PathBuf)> = Vec::with_capacity(workers.len());
    let count = workers.len();
    for (i, mut w) in workers.into_iter().enumerate() {
        if let Some(dir) = w.log.parent() {
            std::fs::create_dir_all(dir).ctx("creating", dir)?;
        }
        let log = std::fs::File::create(&w.log).ctx("creating", &w.log)?;
        let err = log.try_clone().ctx("opening", &w.log)?;
        let child = w
            .command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn();
        match child {
            Ok(c) => running.push((i, c, w.log)),
            Err(e) => {
                stop(&mut running);
                return Err(Error::Pipeline(format!(
                    "could not start worker {} of {count} ({:?}): {e}",
                    i + 1,
                    w.command.get_program()
                )));
            }
        }
    }
    while !running.is_empty() {
        std::thread::sleep(POLL);
        poll();
        let mut k = 0;
        while k < running.len() {
            let (i, child, log) = &mut running[k];
            match child.try_wait().ctx("waiting for a worker", &*log)? {
                None => k += 1,
                Some(status) if status.success() => {
                    let _ = std::fs::remove_file(&*log);
                    running.swap_remove(k);
                }
                Some(status) => {
                    let (i, log) = (*i, log.clone());
                    running.swap_remove(k);
                    stop(&mut running);
                    return Err(Error::Pipeline(format!(
                        "worker {} of {count} failed ({status}); its log {}:\n{}",
                        i + 1,
                        log.display(),
                        tail(&log)
                    )));
                }
            }
        }
    }
    poll();
    Ok(())
}

/// Kills and reaps the workers still running.
fn stop(running: &mut Vec<(usize, Child, PathBuf)>) {
    for (_, child, _) in running.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    running.clear();
}

/// The last [`LOG_TAIL_BYTES`] of a log, as text.
fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_workers_is_one_per_core_for_small_models_and_one_for_large() {
        assert_eq!(auto_workers(2, 128, 1 << 20), 2);
        assert_eq!(auto_workers(16, 3, 1 << 20), 3);
        assert_eq!(auto_workers(16, 0, 1 << 20), 1);
        assert_eq!(auto_workers(16, 128, SMALL_MODEL_BYTES + 1), 1);
        assert_eq!(threads_each(16, 3), 5);
        assert_eq!(threads_each(2, 4), 1);
    }

    #[test]
    fn a_failing_worker_stops_the_others_and_its_log_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo fine"]);
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo 'bad things happened' >&2; exit 3"]);
        let mut slow = Command::new("sh");
        slow.args(["-c", "sleep 30"]);
        let log = |n: &str| dir.path().join(n);
        let t0 = std::time::Instant::now();
        let e = run_workers(
            vec![
                Worker {
                    command: ok,
                    log: log("ok.log"),
                },
                Worker {
                    command: bad,
                    log: log("bad.log"),
                },
                Worker {
                    command: slow,
                    log: log("slow.log"),
                },
            ],
            || {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the slow worker was stopped"
        );
        assert!(e.contains("worker 2 of 3 failed"), "{e}");
        assert!(e.contains("bad things happened"), "{e}");
        assert!(
            !log("ok.log").exists(),
            "a successful worker's log is removed"
        );
        assert!(log("bad.log").exists(), "a failed worker's log is kept");
    }

    #[test]
    fn workers_that_succeed_return_ok_after_all_exit() {
        let dir = tempfile::tempdir().unwrap();
        let workers = (0..3)
            .map(|i| {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    &format!("sleep 0.{i}; touch {}/done-{i}", dir.path().display()),
                ]);
                Worker {
                    command: c,
                    log: dir.path().join(format!("w{i}.log")),
                }
            })
            .collect();
        let mut polls = 0;
        run_workers(workers, || polls += 1).unwrap();
        assert!(polls >= 1);
        for i in 0..3 {
            assert!(dir.path().join(format!("done-{i}")).exists());
        }
    }
}
