//! `[pretrain] lr_mass = "from_model"`: the pretrain segment takes s, the optimizer and N from
//! the trajectory the model ships (`training/trajectory.json`, as the demo model does), and
//! its checkpoint carries the recorded AdamW second moments; a model without them is a clear
//! error at `finetune`.

use crate::common;

use std::path::Path;

use crate::common::{cli, stderr, write};
use source_tda::train::{LrMass, OptimizerInfo, Trajectory};

const CONFIG: &str = r#"
[model]
id = "./model"
[data.train]
id = "./train.jsonl"
id_column = "id"
max_length = 64
[data.pretrain]
id = "./train.jsonl"
id_column = "id"
max_documents = 6
[train]
lr = 1e-3
batch_size = 4
max_steps = 2
segments = 1
checkpoints_per_segment = 1
[pretrain]
lr_mass = "from_model"
"#;

/// A run folder with a copy of the demo model (without `drop`, a list of its files).
fn setup(drop: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let snap = common::demo_tokenizer().parent().unwrap().to_path_buf();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training/trajectory.json",
        "training/optimizer.safetensors",
    ] {
        if !drop.contains(&f) {
            write(
                &dir.path().join("model").join(f),
                std::fs::read(snap.join(f)).unwrap(),
            );
        }
    }
    let lines: String = (0..12)
        .map(|i| format!("{{\"id\": \"d{i}\", \"text\": \"The river {i} flows into a lake.\"}}\n"))
        .collect();
    write(&dir.path().join("train.jsonl"), lines);
    write(&dir.path().join("c.toml"), CONFIG);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\"]\n",
    );
    dir
}

fn run(dir: &Path) -> std::process::Output {
    cli(
        dir,
        &["run", "p.toml", "--run-dir", "run"],
        &[("HF_HUB_OFFLINE", "1")],
    )
}

#[test]
fn pretrain_segment_takes_the_recorded_mass_optimizer_and_second_moments() {
    let dir = setup(&[]);
    let out = run(dir.path());
    assert!(out.status.success(), "{}", stderr(&out));

    let model = dir.path().join("model");
    let recorded = Trajectory::load(&model.join("training/trajectory.json")).unwrap();
    let rec = &recorded.segments[0];
    assert_eq!(rec.stage, "pretrain");
    let s: f64 = rec.learning_rates.iter().sum();
    assert!(s > 0.0 && rec.steps() > 0, "the demo model was pretrained");

    let run = dir.path().join("run");
    let traj = Trajectory::load(&run.join("finetune/trajectory.json")).unwrap();
    let seg = &traj.segments[0];
    assert_eq!(seg.stage, "pretrain");
    match seg.lr_mass {
        // s = Σ η of the recorded steps (another summation order: equal to rounding).
        LrMass::Finite(m) => assert!((m - s).abs() <= 1e-12 * s, "{m} vs {s}"),
        ref other => panic!("pretrain mass {other:?}, expected Finite({s})"),
    }
    assert!(matches!(seg.optimizer, OptimizerInfo::AdamW { .. }));
    assert_eq!(seg.optimizer, rec.optimizer);
    assert_eq!(
        seg.dataset, "pretrain",
        "attributed to the run's pretrain sample"
    );
    assert_eq!(
        seg.n_docs, rec.n_docs,
        "N of pretraining, not of the 6-document sample"
    );
    assert_ne!(seg.n_docs, 6);
    let ckpt = run.join(&seg.checkpoints[0].path);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(ckpt.join(f)).unwrap(),
            std::fs::read(model.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read(run.join(seg.checkpoints[0].optimizer_state.as_ref().unwrap())).unwrap(),
        std::fs::read(model.join("training/optimizer.safetensors")).unwrap()
    );
    assert_eq!(traj.segments.len(), 2, "then one fine-tuning segment");
}

#[test]
fn a_model_without_a_recorded_trajectory_or_its_second_moments_is_refused() {
    for (drop, expected) in [
        (
            vec!["training/trajectory.json", "training/optimizer.safetensors"],
            "ships no `training/trajectory.json`",
        ),
        (
            vec!["training/optimizer.safetensors"],
            "ships no `training/optimizer.safetensors`",
        ),
    ] {
        let dir = setup(&drop);
        let out = run(dir.path());
        let e = stderr(&out);
        assert!(!out.status.success(), "{e}");
        assert!(
            e.contains(expected) && e.contains("lr_mass") && e.contains("from_model"),
            "{e}"
        );
    }
}
