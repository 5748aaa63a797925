//! Logs written to a file (Slurm, CI, `nohup`): no ANSI escape codes, a plain progress line at
//! the interval `SOURCE_TDA_PROGRESS_INTERVAL` sets while a stage works, numbers formatted
//! for people, and the fine-tune's loss reported as epoch means.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::finetune_cli::setup;

/// Runs the binary with stderr into `log` (a file, so not a terminal) and `env`; waits for it
/// unless `pause_at` names a failpoint, where it is killed after `linger`.
fn run_to_file(dir: &Path, log: &Path, env: &[(&str, &str)], pause_at: Option<(&str, Duration)>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_source-tda"));
    cmd.current_dir(dir)
        .args(["run", "p.toml", "--run-dir", "run"])
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match pause_at {
        None => assert!(cmd.status().unwrap().success(), "{}", read(log)),
        Some((point, linger)) => {
            cmd.env("SOURCE_TDA_PAUSE_IN_STAGE", point);
            let mut child = cmd.spawn().unwrap();
            let t0 = Instant::now();
            while !dir.join("run/.paused").exists() {
                assert!(t0.elapsed() < Duration::from_secs(120), "{}", read(log));
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(linger);
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

fn read(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap()).into_owned()
}

/// Whether `text` has a number with more than 6 digits after the decimal point.
fn has_long_decimal(text: &str) -> Option<&str> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|w| w.split_once('.').is_some_and(|(_, f)| f.len() > 6))
}

#[test]
fn a_stage_that_works_prints_plain_progress_lines_without_colour() {
    let s = setup("3e-3");
    let d = s.path();
    let log = d.join("stderr.log");
    // The fine-tune pauses after its checkpoint of step 4 (bar at 4/12) for 1.5 s: with an
    // interval of 0.2 s the bar's line comes several times meanwhile.
    run_to_file(
        d,
        &log,
        &[("SOURCE_TDA_PROGRESS_INTERVAL", "0.2")],
        Some(("finetune:after-checkpoint-4", Duration::from_millis(1500))),
    );
    let bytes = std::fs::read(&log).unwrap();
    let text = read(&log);
    assert!(!bytes.contains(&0x1b), "ANSI escape in a log file:\n{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("progress: finetune · "))
        .collect();
    assert!(
        lines.len() >= 3,
        "expected periodic progress lines:\n{text}"
    );
    for l in &lines {
        assert!(l.contains("/12 (") && l.contains("/s, ETA "), "{l}");
    }
    assert!(
        lines.last().unwrap().contains(" 4/12 ("),
        "the paused bar stands at step 4:\n{text}"
    );
}

#[test]
fn a_quiet_interval_and_colour_settings_keep_the_log_plain() {
    let s = setup("3e-3");
    let d = s.path();
    let log = d.join("stderr.log");
    // NO_COLOR set and the default interval (20 s): no ANSI, no progress line in this short run.
    run_to_file(d, &log, &[("NO_COLOR", "1")], None);
    let text = read(&log);
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(!text.contains("progress: "), "{text}");
    // Numbers for people: no Debug output of library types, no 16-digit floats.
    for leak in ["Finite(", "AdamW {", "Some("] {
        assert!(!text.contains(leak), "`{leak}` in the log:\n{text}");
    }
    if let Some(w) = has_long_decimal(&text) {
        panic!("unrounded number {w} in the log:\n{text}");
    }
    // The fine-tune reports the mean loss of each epoch (30 documents, 5 per step: 6 steps
    // per epoch, 12 steps → 2 epochs), and these are the means of loss.parquet's rows.
    let line = text
        .lines()
        .find(|l| l.contains("mean loss per epoch"))
        .unwrap_or_else(|| panic!("no epoch means:\n{text}"));
    let shown: Vec<f64> = line
        .rsplit("epoch ")
        .next()
        .unwrap()
        .split(" → ")
        .map(|v| v.trim().parse().unwrap())
        .collect();
    let batches = crate::common::batches(&d.join("run/finetune/loss.parquet"));
    let loss: Vec<f64> = batches
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("loss")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow_array::Float64Array>()
                .unwrap()
                .clone();
            a.values().to_vec()
        })
        .collect();
    assert_eq!(loss.len(), 12);
    let want = [
        loss[..6].iter().sum::<f64>() / 6.0,
        loss[6..].iter().sum::<f64>() / 6.0,
    ];
    assert_eq!(shown.len(), 2, "{line}");
    for (s, w) in shown.iter().zip(want) {
        assert!((s - w).abs() <= 5e-4 * w.abs(), "{line} vs {want:?}");
    }
}
