//! The `finetune` stage through the binary: a child process killed mid-run (SIGKILL after a
//! checkpoint, and while writing one) resumes from its last checkpoint and ends with bitwise
//! the same weights as an uninterrupted run; the resume folder is keyed by inputs + config,
//! so a config change never reuses stale state, and it is deleted once the stage completes.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{cli, stderr, write};

/// A run setup: the demo model as a local folder, 30 short documents, a config, a pipeline.
pub(crate) fn setup(lr: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let snap = common::demo_tokenizer().parent().unwrap().to_path_buf();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(snap.join(f), dir.path().join("model").join(f))
            .or_else(|_| {
                std::fs::create_dir_all(dir.path().join("model"))?;
                std::fs::copy(snap.join(f), dir.path().join("model").join(f))
            })
            .unwrap();
    }
    let docs: String = (0..30)
        .map(|i| {
            format!(
                "{{\"id\": \"d{i}\", \"text\": \"The river number {i} flows into lake {}.\"}}\n",
                i % 7
            )
        })
        .collect();
    write(&dir.path().join("train.jsonl"), docs);
    write_config(dir.path(), lr);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\"]\n",
    );
    dir
}

fn write_config(dir: &Path, lr: &str) {
    write(
        &dir.join("c.toml"),
        format!(
            "[model]\nid = \"./model\"\n[data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\n\
             max_length = 64\n[data.pretrain]\nid = \"./train.jsonl\"\nid_column = \"id\"\n\
             max_documents = 10\n[train]\noptimizer = \"adamw\"\nlr = {lr}\nbatch_size = 5\n\
             max_steps = 12\nsegments = 3\ncheckpoints_per_segment = 2\nschedule = \"linear\"\n\
             [pretrain]\nlr_mass = 1000.0\n"
        ),
    );
}

fn ok(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert!(o.status.success(), "command failed:\n{e}");
    e
}

fn manifest(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap()
}

/// Runs the pipeline in a child that pauses at `point`, and SIGKILLs it there.
fn kill_at(dir: &Path, run: &str, point: &str) {
    let run_dir = dir.join(run);
    let mut child = Command::new(env!("CARGO_BIN_EXE_source-tda"))
        .current_dir(dir)
        .args(["-q", "run", "p.toml", "--run-dir", run])
        .env("SOURCE_TDA_PAUSE_IN_STAGE", format!("finetune:{point}"))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run_dir.join(".paused").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never reached {point}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(run_dir.join(".paused")).unwrap();
}

fn resume_dirs(run: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run.join(".resume"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("finetune/checkpoints/step-000012/model.safetensors")).unwrap()
}

#[test]
fn killed_finetune_resumes_to_bitwise_the_same_weights() {
    let s = setup("3e-3");
    let d = s.path();
    ok(&cli(d, &["-q", "run", "p.toml", "--run-dir", "full"], &[]));
    let full = d.join("full");
    assert!(
        resume_dirs(&full).is_empty(),
        "resume state deleted on completion"
    );
    let want = final_weights(&full);
    let m = manifest(&full);
    assert_eq!(m["stages"]["finetune"]["summary"]["resumed_from_step"], 0);

    // Killed right after the checkpoint of step 4 (checkpoints: 2, 4, 6, 8, 10, 12).
    kill_at(d, "r1", "after-checkpoint-4");
    let r1 = d.join("r1");
    assert_eq!(manifest(&r1)["stages"]["finetune"]["status"], "running");
    assert!(!r1.join("finetune").exists(), "nothing published");
    let rd = resume_dirs(&r1);
    assert_eq!(rd.len(), 1);
    assert!(rd[0].join("checkpoints/step-000004/state.json").exists());
    let e = ok(&cli(d, &["run", "p.toml", "--run-dir", "r1"], &[]));
    assert!(e.contains("resuming from checkpoint"), "{e}");
    assert_eq!(
        manifest(&r1)["stages"]["finetune"]["summary"]["resumed_from_step"],
        4
    );
    assert!(final_weights(&r1) == want, "resumed weights differ");
    assert!(resume_dirs(&r1).is_empty());

    // Killed while writing checkpoint 8: the half-written folder never counts.
    kill_at(d, "r2", "in-checkpoint-8");
    let r2 = d.join("r2");
    let ck = resume_dirs(&r2)[0].join("checkpoints");
    assert!(!ck.join("step-000008").exists());
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(".tmp-step-000008")),
        "{names:?}"
    );
    ok(&cli(d, &["-q", "run", "p.toml", "--run-dir", "r2"], &[]));
    assert_eq!(
        manifest(&r2)["stages"]["finetune"]["summary"]["resumed_from_step"],
        6
    );
    assert!(final_weights(&r2) == want);

    // The loss logs agree too, and the trajectory is complete.
    let traj = source_tda::train::Trajectory::load(&r2.join("finetune/trajectory.json")).unwrap();
    assert_eq!(traj.segments.len(), 4, "pretrain + 3 fine-tuning segments");
    assert_eq!(traj.segments[0].stage, "pretrain");
    assert_eq!(
        traj.segments[0].lr_mass,
        source_tda::train::LrMass::Finite(1000.0)
    );
    assert_eq!(traj.segments[0].dataset, "pretrain");
    assert_eq!(traj.segments[0].n_docs, 10);
    for seg in &traj.segments[1..] {
        assert_eq!(seg.steps(), 4);
        assert_eq!(seg.n_docs, 30);
        let c = &seg.checkpoints[1];
        assert!(r2.join(&c.path).join("model.safetensors").exists());
        assert!(r2.join(c.optimizer_state.as_ref().unwrap()).exists());
        assert!(!r2.join(&c.path).join("resume.safetensors").exists());
    }
}

#[test]
fn a_config_change_never_reuses_stale_resume_state() {
    let s = setup("3e-3");
    let d = s.path();
    kill_at(d, "run", "after-checkpoint-6");
    let run = d.join("run");
    let old = resume_dirs(&run);
    assert_eq!(old.len(), 1);
    write_config(d, "1e-3");
    let e = ok(&cli(
        d,
        &["run", "p.toml", "--run-dir", "run", "--allow-config-change"],
        &[],
    ));
    assert!(!e.contains("resuming from checkpoint"), "{e}");
    assert_eq!(
        manifest(&run)["stages"]["finetune"]["summary"]["resumed_from_step"],
        0
    );
    assert!(!old[0].exists(), "stale resume state removed");
    assert!(resume_dirs(&run).is_empty());
}

#[test]
fn a_damaged_resume_checkpoint_is_discarded_with_a_warning() {
    let s = setup("3e-3");
    let d = s.path();
    ok(&cli(d, &["-q", "run", "p.toml", "--run-dir", "full"], &[]));
    let want = final_weights(&d.join("full"));
    // Killed right after checkpoint 4; then one byte of its optimizer state flipped, or its
    // weights cut short.
    for (run, file, torn) in [
        ("flipped", "resume.safetensors", false),
        ("torn", "model.safetensors", true),
    ] {
        kill_at(d, run, "after-checkpoint-4");
        let ck = resume_dirs(&d.join(run))[0].join("checkpoints/step-000004");
        let p = ck.join(file);
        let mut bytes = std::fs::read(&p).unwrap();
        if torn {
            bytes.truncate(100);
        } else {
            let i = bytes.len() - 7;
            bytes[i] ^= 0x01;
        }
        std::fs::write(&p, bytes).unwrap();
        let e = ok(&cli(d, &["run", "p.toml", "--run-dir", run], &[]));
        assert!(
            e.contains(&format!("checkpoint {} is damaged ({file}", ck.display())),
            "{e}"
        );
        assert!(e.contains("resuming from the checkpoint of step 2"), "{e}");
        assert!(!e.contains("invalid header length"), "{e}");
        assert_eq!(
            manifest(&d.join(run))["stages"]["finetune"]["summary"]["resumed_from_step"],
            2
        );
        assert!(final_weights(&d.join(run)) == want, "{run}: weights differ");
        assert!(
            !d.join(run)
                .join("finetune/checkpoints/step-000004/checksums.json")
                .exists(),
            "the checksums stay with the resume state"
        );
    }
}
