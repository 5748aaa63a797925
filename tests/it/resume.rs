//! Run directories: interrupted stages leave nothing a later run trusts, reruns skip what is
//! complete and unchanged, config changes are refused or invalidate exactly the right stages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{cli, model_files, stderr, write};

/// A run setup in a temp folder: a local model, a local data file, a config and a pipeline
/// (`fetch`, `prepare` into `run/`). Shared with `integrity`.
pub(crate) struct Setup {
    pub(crate) dir: tempfile::TempDir,
}

impl Setup {
    pub(crate) fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in model_files() {
            write(&dir.path().join("model").join(name), bytes);
        }
        let docs: String = (0..40)
            .map(|i| format!("{{\"id\": \"d{i}\", \"text\": \"The river number {i} flows into the lake.\"}}\n"))
            .collect();
        write(&dir.path().join("train.jsonl"), docs);
        let s = Setup { dir };
        s.config("max_length = 64\n");
        write(
            &s.path("p.toml"),
            "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\"]\nrun_dir = \"run\"\n",
        );
        s
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self, train_extra: &str) {
        write(
            &self.path("c.toml"),
            format!(
                "[model]\nid = \"./model\"\n[data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\n{train_extra}"
            ),
        );
    }

    pub(crate) fn run(&self, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut args = vec!["run", "p.toml"];
        args.extend(extra);
        cli(self.dir.path(), &args, env)
    }

    pub(crate) fn manifest(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.path("run/manifest.json")).unwrap())
            .unwrap()
    }

    fn status_of(&self, stage: &str) -> String {
        self.manifest()["stages"][stage]["status"]
            .as_str()
            .unwrap_or("absent")
            .to_string()
    }
}

pub(crate) fn ok(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert!(o.status.success(), "command failed:\n{e}");
    e
}

fn staged_files(run: &Path) -> Vec<PathBuf> {
    let staging = run.join(".staging");
    if !staging.exists() {
        return Vec::new();
    }
    source_tda::util::fsx::list_files(&staging).unwrap()
}

#[test]
fn first_run_completes_and_second_run_skips_everything() {
    let s = Setup::new();
    let e = ok(&s.run(&[], &[]));
    assert!(
        e.contains("fetch: done") && e.contains("prepare: done"),
        "{e}"
    );
    assert_eq!(s.status_of("fetch"), "complete");
    assert_eq!(s.status_of("prepare"), "complete");
    let m = s.manifest();
    let prep = &m["stages"]["prepare"];
    assert_eq!(prep["outputs"][0]["path"], "prepare/train.parquet");
    assert!(prep["wall_s"].as_f64().unwrap() >= 0.0);
    assert!(prep["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(prep["tool_version"], source_tda::VERSION);
    assert!(prep["inputs"]["stage:fetch"].as_str().unwrap().len() == 64);
    assert!(s.path("run/config.toml").exists());
    assert!(!s.path("run/.lock").exists(), "lock released");

    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: up to date (skipped)"), "{e}");

    let out = cli(s.dir.path(), &["status", "--run-dir", "run"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fetch") && text.contains("complete"),
        "{text}"
    );
    assert!(
        text.contains("finetune") && text.contains("not run"),
        "{text}"
    );
}

#[test]
fn injected_failure_leaves_no_completed_artifact_and_the_rerun_completes() {
    let s = Setup::new();
    let o = s.run(&[], &[("SOURCE_TDA_FAIL_IN_STAGE", "prepare:after-train")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("injected failure in stage `prepare:after-train`"),
        "{}",
        stderr(&o)
    );
    assert_eq!(s.status_of("fetch"), "complete");
    assert_eq!(s.status_of("prepare"), "failed");
    assert!(
        !s.path("run/prepare").exists(),
        "no completed prepare folder"
    );
    assert!(
        staged_files(&s.path("run")).is_empty(),
        "failed staging removed"
    );

    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: done"), "{e}");
    assert_eq!(s.status_of("prepare"), "complete");
    assert!(s.path("run/prepare/train.parquet").exists());
}

#[test]
fn killed_stage_is_never_trusted_and_the_rerun_completes() {
    let s = Setup::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_source-tda"))
        .current_dir(s.dir.path())
        .args(["-q", "run", "p.toml"])
        .env("SOURCE_TDA_PAUSE_IN_STAGE", "prepare:after-train")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !s.path("run/.paused").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "child never reached the pause point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    std::fs::remove_file(s.path("run/.paused")).unwrap();

    // Mid-write state: the parquet file exists in staging only; the manifest says running.
    assert_eq!(s.status_of("prepare"), "running");
    assert!(!s.path("run/prepare").exists());
    assert!(
        staged_files(&s.path("run"))
            .iter()
            .any(|p| p.ends_with("train.parquet")),
        "the killed stage had written into staging"
    );
    assert!(
        s.path("run/.lock").exists(),
        "a killed process leaves its lock behind"
    );
    let out = cli(s.dir.path(), &["status", "--run-dir", "run"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted"));

    // The rerun takes over the dead process's lock, clears staging, and redoes prepare only.
    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: done"), "{e}");
    assert!(staged_files(&s.path("run")).is_empty());
    assert_eq!(s.status_of("prepare"), "complete");
}

#[test]
fn config_change_is_refused_then_invalidates_exactly_the_right_stages() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    let fetch_started = s.manifest()["stages"]["fetch"]["started_at"].clone();

    // A tokenisation key changed: refused, naming the key and both values.
    s.config("max_length = 16\n");
    let o = s.run(&[], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("was made with a different config"), "{e}");
    assert!(e.contains("data.train.max_length: 64 → 16"), "{e}");
    assert!(e.contains("--allow-config-change"), "{e}");

    // Allowed: fetch's part of the config is unchanged, so only prepare reruns.
    let e = ok(&s.run(&["--allow-config-change"], &[]));
    assert!(e.contains("fetch: up to date (skipped)"), "{e}");
    assert!(e.contains("prepare: done"), "{e}");
    assert_eq!(s.manifest()["stages"]["fetch"]["started_at"], fetch_started);
    let (docs, _) = source_tda::data::read_prepared(&s.path("run/prepare/train.parquet")).unwrap();
    assert!(docs.iter().all(|d| d.input_ids.len() <= 16));

    // A fetch key that resolves to the same files (a local folder has no revisions): fetch
    // reruns, and since its outputs are identical, prepare (which reads them) stays valid.
    write(
        &s.path("c.toml"),
        "[model]\nid = \"./model\"\nrevision = \"v2\"\n[data.train]\nid = \"./train.jsonl\"\n\
         id_column = \"id\"\nmax_length = 16\n",
    );
    let e = ok(&s.run(&["--allow-config-change"], &[]));
    assert!(e.contains("fetch: done"), "{e}");
    assert!(e.contains("prepare: up to date (skipped)"), "{e}");
    s.config("max_length = 16\n");
    ok(&s.run(&["--allow-config-change"], &[]));

    // A data file changed on disk: fetch notices, and prepare follows because fetch's
    // outputs (the file's sha256) changed.
    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("prepare: up to date (skipped)"), "{e}");
    std::thread::sleep(Duration::from_millis(10));
    write(
        &s.path("train.jsonl"),
        "{\"id\": \"x\", \"text\": \"one new document\"}\n",
    );
    let e = ok(&s.run(&[], &[]));
    assert!(e.contains("fetch: done"), "{e}");
    assert!(e.contains("prepare: done"), "{e}");
    let (docs, _) = source_tda::data::read_prepared(&s.path("run/prepare/train.parquet")).unwrap();
    assert_eq!(docs.len(), 1);
}

#[test]
fn force_reruns_the_named_stage_and_every_later_one() {
    let s = Setup::new();
    ok(&s.run(&[], &[]));
    let e = ok(&s.run(&["--force", "prepare"], &[]));
    assert!(
        e.contains("fetch: up to date (skipped)") && e.contains("prepare: done"),
        "{e}"
    );
    let e = ok(&s.run(&["--force", "fetch"], &[]));
    assert!(
        e.contains("fetch: done") && e.contains("prepare: done"),
        "{e}"
    );
    let o = s.run(&["--force", "score"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`score` is not among the stages being run"));
}

#[test]
fn single_stages_need_their_inputs_and_unknown_stages_are_explained() {
    let s = Setup::new();
    let o = cli(
        s.dir.path(),
        &["prepare", "--config", "c.toml", "--run-dir", "r2"],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("reads the outputs of `fetch`, which has not completed"),
        "{e}"
    );

    ok(&cli(
        s.dir.path(),
        &["fetch", "--config", "c.toml", "--run-dir", "r2"],
        &[],
    ));
    ok(&cli(
        s.dir.path(),
        &["prepare", "--config", "c.toml", "--run-dir", "r2"],
        &[],
    ));
    assert!(s.path("r2/prepare/train.parquet").exists());

    write(
        &s.path("p2.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"reprot\"]\n",
    );
    let o = cli(s.dir.path(), &["run", "p2.toml", "--run-dir", "r3"], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("unknown stage `reprot`"), "{e}");
    assert!(e.contains("report"), "lists the stages: {e}");
}

#[test]
fn a_live_lock_holder_is_respected() {
    let s = Setup::new();
    std::fs::create_dir_all(s.path("run")).unwrap();
    // This test process is alive: its pid in the lock means the directory is in use.
    write(&s.path("run/.lock"), std::process::id().to_string());
    let o = s.run(&[], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by another source-tda process"),
        "{}",
        stderr(&o)
    );
}
