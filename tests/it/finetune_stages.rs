//! Multi-stage fine-tuning through the binary: pretrain → `general` (AdamW on `train`) →
//! `domain` (momentum SGD on an extra `[data.domain]`). The trajectory holds one segment per
//! stage segment with its own stage name, data role, N and exactly summed learning rates;
//! a child killed in the middle of the second stage resumes to bitwise the same weights.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{cli, stderr, write};
use source_tda::train::{LrMass, OptimizerInfo, Trajectory};

const CONFIG: &str = r#"
[model]
id = "./model"
[data.train]
id = "./train.jsonl"
id_column = "id"
max_length = 64
[data.domain]
id = "./domain.jsonl"
id_column = "id"
max_length = 64
[data.pretrain]
id = "./train.jsonl"
id_column = "id"
max_documents = 10
[train]
optimizer = "adamw"
lr = 3e-3
batch_size = 5
schedule = "linear"
checkpoints_per_segment = 2

[[train.stages]]
name = "general"
dataset = "train"
max_steps = 8
segments = 2

[[train.stages]]
name = "domain"
dataset = "domain"
optimizer = "momentum"
lr = 1e-2
schedule = "cosine"
warmup_steps = 2
max_steps = 6
segments = 1
checkpoints_per_segment = 3

[pretrain]
lr_mass = 1000.0
"#;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let snap = common::demo_tokenizer().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(dir.path().join("model")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(snap.join(f), dir.path().join("model").join(f)).unwrap();
    }
    let lines = |n: usize, f: &dyn Fn(usize) -> String| -> String {
        (0..n)
            .map(|i| format!("{{\"id\": \"d{i}\", \"text\": \"{}\"}}\n", f(i)))
            .collect()
    };
    write(
        &dir.path().join("train.jsonl"),
        lines(30, &|i| {
            format!("The river number {i} flows into lake {}.", i % 7)
        }),
    );
    write(
        &dir.path().join("domain.jsonl"),
        lines(12, &|i| {
            format!("Reactor {i} runs at {} megawatts.", 100 + i)
        }),
    );
    write(&dir.path().join("c.toml"), CONFIG);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\"]\n",
    );
    dir
}

fn ok(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert!(o.status.success(), "command failed:\n{e}");
    e
}

fn summary(run: &Path) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    m["stages"]["finetune"]["summary"].clone()
}

fn weights(run: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run.join(format!(
        "finetune/checkpoints/step-{step:06}/model.safetensors"
    )))
    .unwrap()
}

/// Warm-up k/W, then linear or cosine decay to 0 at T (the Trainer's lambdas, written out).
fn rate(cosine: bool, eta: f64, w: u64, t: u64, k: u64) -> f64 {
    if k < w {
        return eta * k as f64 / w as f64;
    }
    let p = (k - w) as f64 / (t - w) as f64;
    eta * match cosine {
        true => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        false => 1.0 - p,
    }
}

#[test]
fn stages_record_their_segments_and_resume_bitwise_mid_second_stage() {
    let s = setup();
    let d = s.path();
    ok(&cli(d, &["-q", "run", "p.toml", "--run-dir", "full"], &[]));
    let full = d.join("full");
    assert_eq!(summary(&full)["steps"], 14);
    assert_eq!(summary(&full)["stages"][1]["first_step"], 9);

    let traj = Trajectory::load(&full.join("finetune/trajectory.json")).unwrap();
    let view: Vec<(&str, &str, u64, u64, u64)> = traj
        .segments
        .iter()
        .map(|s| {
            let d = s.dataset.as_str();
            (s.stage.as_str(), d, s.n_docs, s.step_start, s.step_end)
        })
        .collect();
    assert_eq!(
        view,
        vec![
            ("pretrain", "pretrain", 10, 0, 0),
            ("general", "train", 30, 0, 4),
            ("general", "train", 30, 4, 8),
            ("domain", "domain", 12, 8, 14),
        ]
    );
    assert_eq!(traj.segments[0].lr_mass, LrMass::Finite(1000.0));
    // s of each segment is the exact sum of its stage's own schedule over its own steps.
    for (seg, cosine, eta, w, t, first) in [
        (&traj.segments[1], false, 3e-3, 0, 8, 0),
        (&traj.segments[2], false, 3e-3, 0, 8, 4),
        (&traj.segments[3], true, 1e-2, 2, 6, 0),
    ] {
        let want: Vec<f64> = (first..first + seg.steps())
            .map(|k| rate(cosine, eta, w, t, k))
            .collect();
        for (a, b) in seg.learning_rates.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-15, "{}: {a} vs {b}", seg.stage);
        }
        let LrMass::Finite(m) = seg.lr_mass else {
            panic!("finite")
        };
        let sum: f64 = want.iter().sum();
        assert!(
            (m - sum).abs() <= 1e-15 * sum,
            "{}: {m} vs {sum}",
            seg.stage
        );
    }
    assert!(matches!(
        traj.segments[1].optimizer,
        OptimizerInfo::AdamW { .. }
    ));
    assert!(matches!(
        traj.segments[3].optimizer,
        OptimizerInfo::Momentum { beta, .. } if beta == 0.9
    ));
    let steps: Vec<u64> = traj.segments[3]
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![10, 12, 14]);
    for c in &traj.segments[3].checkpoints {
        assert!(full.join(&c.path).join("model.safetensors").exists());
        assert!(full.join(c.optimizer_state.as_ref().unwrap()).exists());
    }
    assert_eq!(
        traj.segments[3].visit_order.as_deref(),
        Some("finetune/visit_order-domain.parquet")
    );
    assert!(full.join("finetune/visit_order-general.parquet").exists());
    // The second stage starts a fresh optimizer: its step count restarts at 0.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.join("finetune/checkpoints/step-000010/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 10);
    assert_eq!(state["optimizer_steps"], 2);
    assert!(weights(&full, 10) != weights(&full, 8), "stage B trains");

    // Killed after step 11 (the second stage's last checkpoint: 10): resumes from 10 and ends
    // bitwise where the uninterrupted run ended.
    let run_dir = d.join("r");
    let mut child = Command::new(env!("CARGO_BIN_EXE_source-tda"))
        .current_dir(d)
        .args(["-q", "run", "p.toml", "--run-dir", "r"])
        .env("SOURCE_TDA_PAUSE_IN_STAGE", "finetune:step-11")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run_dir.join(".paused").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "never reached step 11"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(run_dir.join(".paused")).unwrap();
    let e = ok(&cli(d, &["run", "p.toml", "--run-dir", "r"], &[]));
    assert!(e.contains("resuming from checkpoint"), "{e}");
    assert_eq!(summary(&run_dir)["resumed_from_step"], 10);
    assert_eq!(summary(&run_dir)["stages"][0]["resumed_from_step"], 8);
    for step in [8, 10, 12, 14] {
        assert!(
            weights(&run_dir, step) == weights(&full, step),
            "step {step} differs after resuming"
        );
    }
    let again = Trajectory::load(&run_dir.join("finetune/trajectory.json")).unwrap();
    assert_eq!(again.segments.len(), traj.segments.len());
    for (a, b) in again.segments.iter().zip(&traj.segments).skip(1) {
        assert_eq!(a.learning_rates, b.learning_rates);
        assert_eq!(a.lr_mass, b.lr_mass);
    }
}
