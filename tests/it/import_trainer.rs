//! Importing a trajectory from a hand-made Hugging Face Trainer output folder, and the
//! documented errors for incomplete or inconsistent ones.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use crate::common::write;
use candle_core::{Device, Tensor};
use source_tda::config::LossNormalization;
use source_tda::config::{OptimizerKind, ScheduleKind, TrainConfig};
use source_tda::train::checkpoint::{read_safetensors, write_safetensors};
use source_tda::train::import::import_trainer;
use source_tda::train::{LrMass, OptimizerInfo};

const LR: f64 = 1e-3;
const T: u64 = 6;

/// λ(s) of a linear schedule without warm-up: what the Trainer logs at step s.
fn logged(s: u64) -> f64 {
    LR * (T - s) as f64 / T as f64
}

/// output_dir with checkpoint-2, -4, -6: weights, trainer_state.json, exp_avg_sq export
/// (and exp_avg for checkpoints 2 and 6).
fn trainer_dir(dir: &Path) {
    for step in [2u64, 4, 6] {
        let c = dir.join(format!("checkpoint-{step}"));
        write(&c.join("config.json"), br#"{"model_type": "llama"}"#);
        write(
            &c.join("model.safetensors"),
            common::tiny_safetensors("w", 4),
        );
        let v = Tensor::new(&[0.1f32 * step as f32, 0.2, 0.3, 0.4], &Device::Cpu).unwrap();
        write_safetensors(
            &c.join("exp_avg_sq.safetensors"),
            &[("model.w".to_string(), v)],
            HashMap::new(),
        )
        .unwrap();
        // The first moments are exported for checkpoints 2 and 6 only (optional).
        if step != 4 {
            let m = Tensor::new(&[-0.01f32 * step as f32, 0.02, 0.0, 0.5], &Device::Cpu).unwrap();
            write_safetensors(
                &c.join("exp_avg.safetensors"),
                &[("model.w".to_string(), m)],
                HashMap::new(),
            )
            .unwrap();
        }
        let logs: Vec<serde_json::Value> = (1..=step)
            .filter(|s| s % 2 == 0)
            .map(|s| serde_json::json!({"step": s, "learning_rate": logged(s), "loss": 2.0, "epoch": 0.1}))
            .collect();
        let state = serde_json::json!({
            "global_step": step, "max_steps": T, "log_history": logs, "epoch": 1.0,
        });
        write(&c.join("trainer_state.json"), state.to_string());
    }
}

fn declared() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::AdamW,
        lr: LR,
        schedule: ScheduleKind::Linear,
        beta1: Some(0.9),
        beta2: Some(0.99),
        eps: Some(1e-8),
        segments: Some(3),
        loss_normalization: LossNormalization::MeanPerToken,
        ..Default::default()
    }
}

fn import(dir: &Path, t: &TrainConfig) -> source_tda::Result<source_tda::train::import::Imported> {
    import_trainer(
        dir,
        t,
        "train",
        50,
        dir,
        &dir.join("out"),
        Path::new("finetune"),
    )
}

#[test]
fn a_trainer_folder_becomes_segments_with_exact_rates_and_corrected_moments() {
    let tmp = tempfile::tempdir().unwrap();
    trainer_dir(tmp.path());
    let imp = import(tmp.path(), &declared()).unwrap();
    assert_eq!(imp.checkpoint_steps, vec![2, 4, 6]);
    assert_eq!(imp.segments.len(), 3);
    for (i, seg) in imp.segments.iter().enumerate() {
        let (a, b) = (2 * i as u64, 2 * i as u64 + 2);
        assert_eq!((seg.step_start, seg.step_end), (a, b));
        // Step k (1-based) trains with λ(k − 1).
        let want: Vec<f64> = (a..b).map(|k| LR * (T - k) as f64 / T as f64).collect();
        assert_eq!(seg.learning_rates.len(), 2);
        for (g, w) in seg.learning_rates.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15, "{g} vs {w}");
        }
        let LrMass::Finite(m) = seg.lr_mass else {
            panic!("finite")
        };
        assert!((m - want.iter().sum::<f64>()).abs() < 1e-15);
        assert_eq!(seg.n_docs, 50);
        assert!(matches!(seg.optimizer, OptimizerInfo::AdamW { beta2, .. } if beta2 == 0.99));
        let c = &seg.checkpoints[0];
        assert_eq!(c.step, b);
        assert!(c.path.ends_with(&format!("checkpoint-{b}")));
        // v̂ = v / (1 − β₂ᵗ), named exp_avg_sq.<parameter>.
        let rel = c.optimizer_state.as_ref().unwrap();
        assert_eq!(
            rel,
            &format!("finetune/optimizer/checkpoint-{b}.safetensors")
        );
        let st = read_safetensors(
            &tmp.path()
                .join("out/optimizer")
                .join(format!("checkpoint-{b}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let v = st["exp_avg_sq.model.w"].to_vec1::<f32>().unwrap();
        let want0 = 0.1 * b as f64 / (1.0 - 0.99f64.powi(b as i32));
        assert!(
            (v[0] as f64 - want0).abs() < 1e-5 * want0,
            "{} vs {want0}",
            v[0]
        );
        // m̂ = m / (1 − β₁ᵗ) as exp_avg.<parameter> where exported; absent otherwise.
        if b == 4 {
            assert!(!st.contains_key("exp_avg.model.w"));
        } else {
            let m = st["exp_avg.model.w"].to_vec1::<f32>().unwrap();
            let want = -0.01 * b as f64 / (1.0 - 0.9f64.powi(b as i32));
            assert!(
                (m[0] as f64 - want).abs() < 1e-5 * want.abs(),
                "{} vs {want}",
                m[0]
            );
        }
    }
    // Fewer segments group the checkpoints evenly by count.
    let mut t = declared();
    t.segments = Some(2);
    let imp = import(tmp.path(), &t).unwrap();
    let ends: Vec<u64> = imp.segments.iter().map(|s| s.step_end).collect();
    assert_eq!(ends, vec![4, 6]);
    assert_eq!(imp.segments[0].checkpoints.len(), 2);
}

fn err(dir: &Path, t: &TrainConfig) -> String {
    import(dir, t).unwrap_err().to_string()
}

#[test]
fn incomplete_or_inconsistent_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d).unwrap();
    assert!(err(d, &declared()).contains("no checkpoint-N folders"));

    trainer_dir(d);
    // A schedule that disagrees with the logged rates.
    let mut t = declared();
    t.lr = 2e-3;
    let e = err(d, &t);
    assert!(
        e.contains("logs learning_rate") && e.contains("lr_scheduler_type"),
        "{e}"
    );
    let mut t = declared();
    t.schedule = ScheduleKind::Cosine;
    assert!(err(d, &t).contains("logs learning_rate"));
    // The Trainer's loss is a per-token mean.
    let mut t = declared();
    t.loss_normalization = LossNormalization::SumPerDocument;
    assert!(err(d, &t).contains("mean_per_token"));
    // More segments than checkpoints.
    let mut t = declared();
    t.segments = Some(4);
    assert!(err(d, &t).contains("set train.segments ≤ 3"));
    // A boundary that is not a checkpoint.
    let mut t = declared();
    t.segment_boundaries = Some(vec![3]);
    assert!(err(d, &t).contains("no checkpoint-3"));
    // Adam without the exported second moments.
    std::fs::remove_file(d.join("checkpoint-4/exp_avg_sq.safetensors")).unwrap();
    let e = err(d, &declared());
    assert!(
        e.contains("docs/import-trainer.md") && e.contains("checkpoint-4"),
        "{e}"
    );
    // …which SGD does not need.
    let mut t = declared();
    t.optimizer = OptimizerKind::Sgd;
    (t.beta1, t.beta2, t.eps) = (None, None, None);
    assert!(import(d, &t).unwrap().segments[1].checkpoints[0]
        .optimizer_state
        .is_none());
    // Missing weights.
    std::fs::remove_file(d.join("checkpoint-2/model.safetensors")).unwrap();
    assert!(err(d, &t).contains("save_safetensors"));
    // A renamed folder: global_step disagrees with its name.
    std::fs::rename(d.join("checkpoint-6"), d.join("checkpoint-8")).unwrap();
    assert!(err(d, &t).contains("global_step = 6"));
    // No trainer_state.json.
    std::fs::remove_file(d.join("checkpoint-8/trainer_state.json")).unwrap();
    assert!(err(d, &t).contains("no trainer_state.json"));
}

/// Rewrites checkpoint-6's trainer_state.json with `grad_norm` logged at `steps`
/// (‖g_s‖ = 0.4 s).
fn log_grad_norms(dir: &Path, steps: &[u64]) {
    let logs: Vec<serde_json::Value> = steps
        .iter()
        .map(|&s| serde_json::json!({"step": s, "learning_rate": logged(s), "grad_norm": 0.4 * s as f64}))
        .collect();
    let state = serde_json::json!({"global_step": T, "max_steps": T, "log_history": logs});
    write(
        &dir.join("checkpoint-6/trainer_state.json"),
        state.to_string(),
    );
}

#[test]
fn clip_factors_come_from_the_logged_grad_norms_or_the_import_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    trainer_dir(d);
    // Every step logged: c_k = min(1, max / (‖g_k‖ + 1e-6)) per step, split by segment.
    log_grad_norms(d, &[1, 2, 3, 4, 5, 6]);
    let mut t = declared();
    t.max_grad_norm = Some(1.0);
    let imp = import(d, &t).unwrap();
    let c: Vec<f64> = imp
        .segments
        .iter()
        .flat_map(|s| s.clip_factors.clone())
        .collect();
    let want: Vec<f64> = (1..=T)
        .map(|k| (1.0 / (0.4 * k as f64 + 1e-6)).min(1.0))
        .collect();
    assert_eq!(c, want);
    assert_eq!(imp.segments[0].clip_factors.len(), 2);
    let s = &imp.segments[2];
    let LrMass::Finite(m) = s.effective_mass() else {
        panic!("finite")
    };
    let direct: f64 = s
        .learning_rates
        .iter()
        .zip(&want[4..])
        .map(|(a, b)| a * b)
        .sum();
    assert!((m - direct).abs() < 1e-15, "{m} vs {direct}");
    // Clipping happened (step 4: ‖g‖ = 1.6 > 1) but steps 1 and 3 were not logged: refused.
    log_grad_norms(d, &[2, 4, 6]);
    let e = err(d, &t);
    assert!(
        e.contains("clipped step 4") && e.contains("logging_steps = 1") && e.contains("step 1"),
        "{e}"
    );
    // Undeclared max_grad_norm while the log shows norms above the Trainer's default 1.0.
    let e = err(d, &declared());
    assert!(
        e.contains("train.max_grad_norm") && e.contains("step 4"),
        "{e}"
    );
    // Declared, but no grad_norm logged at all: unknown, refused.
    let mut t2 = declared();
    t2.max_grad_norm = Some(1.0);
    log_grad_norms(d, &[]);
    assert!(err(d, &t2).contains("records no grad_norm"));
    // A large max_grad_norm that no logged step reached: no clipping recorded.
    log_grad_norms(d, &[2, 4, 6]);
    t2.max_grad_norm = Some(10.0);
    assert!(import(d, &t2)
        .unwrap()
        .segments
        .iter()
        .all(|s| s.clip_factors.is_empty()));
}

#[test]
fn the_import_trainer_command_writes_the_trajectory_of_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    trainer_dir(&d.join("trainer"));
    let snap = common::demo_tokenizer().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(d.join("model")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(snap.join(f), d.join("model").join(f)).unwrap();
    }
    let docs: String = (0..7)
        .map(|i| format!("{{\"text\": \"document {i}\"}}\n"))
        .collect();
    write(&d.join("train.jsonl"), docs);
    write(
        &d.join("c.toml"),
        format!(
            "[model]\nid = \"./model\"\n[data.train]\nid = \"./train.jsonl\"\n[train]\n\
             lr = {LR}\nschedule = \"linear\"\nbeta2 = 0.99\nsegments = 3\n\
             loss_normalization = \"mean_per_token\"\n"
        ),
    );
    let help = common::cli(d, &["import-trainer", "--help"], &[]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("TRAINER_DIR"),
        "{text}"
    );

    let args = [
        "import-trainer",
        "trainer",
        "--config",
        "c.toml",
        "--run-dir",
        "run",
    ];
    let o = common::cli(d, &args, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let traj =
        source_tda::train::Trajectory::load(&d.join("run/finetune/trajectory.json")).unwrap();
    assert_eq!(traj.segments.len(), 3);
    assert_eq!(traj.segments[2].n_docs, 7, "N of the prepared data set");
    assert!(traj
        .final_checkpoint()
        .path
        .ends_with("trainer/checkpoint-6"));
    assert!(d
        .join("run/finetune/optimizer/checkpoint-6.safetensors")
        .exists());

    // A wrong declared schedule is the documented error, naming the keys to fix.
    write(
        &d.join("c2.toml"),
        std::fs::read_to_string(d.join("c.toml"))
            .unwrap()
            .replace("\"linear\"", "\"cosine\""),
    );
    let args = [
        "import-trainer",
        "trainer",
        "--config",
        "c2.toml",
        "--run-dir",
        "run2",
    ];
    let o = common::cli(d, &args, &[]);
    let e = common::stderr(&o);
    assert!(
        !o.status.success() && e.contains("logs learning_rate"),
        "{e}"
    );
    let o = common::cli(
        d,
        &[
            "import-trainer",
            "nowhere",
            "--config",
            "c.toml",
            "--run-dir",
            "r3",
        ],
        &[],
    );
    assert!(common::stderr(&o).contains("no such folder"));
}
