//! The command line for scripts: exit status by kind of failure (2 usage, 3 config or data,
//! 4 a stage failed, 5 a resource limit — the last in `attribution_options`), `status --json`,
//! single-stage commands that read the run directory's resolved config, `run --until STAGE`.

use crate::common::{cli, stderr, write};
use crate::resume::{ok, Setup};

fn code(o: &std::process::Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn status_json(s: &Setup, run: &str) -> serde_json::Value {
    let o = cli(s.dir.path(), &["status", "--run-dir", run, "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn stage_status(v: &serde_json::Value, stage: &str) -> String {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} in {v}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn exit_status_tells_usage_config_and_stage_failures_apart() {
    let s = Setup::new();
    let d = s.dir.path();
    assert_eq!(code(&cli(d, &["frobnicate"], &[])), 2, "unknown command");
    assert_eq!(code(&cli(d, &["run"], &[])), 2, "missing argument");

    let o = s.run(&[], &[("SOURCE_TDA_FAIL_IN_STAGE", "prepare")]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("injected failure"), "{}", stderr(&o));

    write(
        &s.path("bad.toml"),
        "[model]\nid = \"./model\"\n[data.train]\nid = \"./train.jsonl\"\nid_colum = \"id\"\n",
    );
    let o = cli(
        d,
        &["fetch", "--config", "bad.toml", "--run-dir", "r2"],
        &[],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("id_colum"), "{}", stderr(&o));
    let o = cli(
        d,
        &["fetch", "--config", "missing.toml", "--run-dir", "r2"],
        &[],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));

    // Exit codes are documented in --help.
    let help = String::from_utf8_lossy(&cli(d, &["--help"], &[]).stdout).into_owned();
    for line in [
        "2  usage",
        "3  config or data",
        "4  a stage failed",
        "5  a resource limit",
    ] {
        assert!(help.contains(line), "{help}");
    }
}

#[test]
fn run_until_then_single_stages_from_the_stored_config_and_status_json() {
    let s = Setup::new();
    let d = s.dir.path();
    let o = s.run(&["--until", "finetune"], &[]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--until finetune"), "{}", stderr(&o));

    let e = ok(&s.run(&["--until", "fetch"], &[]));
    assert!(e.contains("fetch: done") && !e.contains("prepare"), "{e}");
    let v = status_json(&s, "run");
    assert_eq!(stage_status(&v, "fetch"), "complete");
    assert_eq!(stage_status(&v, "prepare"), "not_run");
    assert_eq!(v["stages"][0]["stage"], "fetch", "pipeline order");
    assert!(v["stages"][0]["wall_s"].as_f64().unwrap() >= 0.0);

    // Without --config a stage reads run/config.toml, even after c.toml is gone.
    std::fs::remove_file(s.path("c.toml")).unwrap();
    let e = ok(&cli(d, &["prepare", "--run-dir", "run"], &[]));
    assert!(e.contains("prepare: done"), "{e}");
    let v = status_json(&s, "run");
    assert_eq!(stage_status(&v, "prepare"), "complete");
    let e = ok(&cli(d, &["prepare", "--run-dir", "run"], &[]));
    assert!(e.contains("prepare: up to date (skipped)"), "{e}");

    // A stage failure shows in status --json.
    let o = cli(
        d,
        &["prepare", "--run-dir", "run", "--force", "prepare"],
        &[("SOURCE_TDA_FAIL_IN_STAGE", "prepare")],
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let v = status_json(&s, "run");
    assert_eq!(stage_status(&v, "prepare"), "failed");

    // A run directory that was never started has no config to read: a usage error.
    let o = cli(d, &["fetch", "--run-dir", "never"], &[]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("pass --config"), "{}", stderr(&o));
}
