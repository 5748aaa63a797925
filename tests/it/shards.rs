//! Sharded `fit` (docs/design.md §11) through the CLI on the demo's small Llama: shards of the
//! covariance and Λ passes merged equal the unsharded fit (bitwise for one shard, 1e-6
//! relative for several), a merge refuses missing, duplicated and mixed shards and is
//! idempotent, the merged run directory is a complete `fit` to the later stages, and shard
//! processes run concurrently, as a scheduler's array job would, survive one being killed and
//! rerun. The scheduler templates (scripts/slurm/, scripts/k8s/) are checked here too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use source_tda::curvature::load_factors;
use source_tda::linalg::LayerFactors;

use crate::common::{cli, stderr};
use crate::resume::ok;

/// A run directory `run/` in a temp folder with the demo's fetch, prepare and finetune done
/// (24 documents, 2 segments), batches of at most 3 documents (8 per pass) so that every
/// shard of 4 has work.
fn finetuned() -> tempfile::TempDir {
    let dir = crate::stages_attribution::setup("source", "[batching]\nmax_batch_size = 3\n");
    crate::common::write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\"]\nrun_dir = \"run\"\n",
    );
    ok(&cli(
        dir.path(),
        &["-q", "run", "p.toml", "--until", "finetune"],
        &[],
    ));
    dir
}

/// A copy of `from` at `to` (the run directory's paths are relative to it).
fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

fn run_cli(dir: &Path, args: &[&str]) -> String {
    ok(&cli(dir, args, &[]))
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let o = cli(dir, args, &[]);
    assert!(!o.status.success(), "{args:?} should fail:\n{}", stderr(&o));
    stderr(&o)
}

/// Every pass of an `n`-way sharded fit, one shard after another, in run directory `run`.
fn sharded_fit(dir: &Path, run: &str, n: usize) {
    for _pass in 0..2 {
        for i in 1..=n {
            run_cli(
                dir,
                &[
                    "-q",
                    "fit",
                    "--shard",
                    &format!("{i}/{n}"),
                    "--run-dir",
                    run,
                ],
            );
        }
        run_cli(dir, &["-q", "merge", "fit", "--run-dir", run]);
    }
}

fn segments(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("fit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 2, "two segments");
    v
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A block-diagonal Q as a dense f64 matrix.
fn dense(q: &source_tda::linalg::BlockDiag) -> Tensor {
    let n = q.layout.dim;
    let mut m = vec![0f64; n * n];
    for ((off, len), b) in q.layout.ranges.iter().zip(&q.blocks) {
        let v = f64s(b);
        for i in 0..*len {
            for j in 0..*len {
                m[(off + i) * n + off + j] = v[i * len + j];
            }
        }
    }
    Tensor::from_vec(m, (n, n), &Device::Cpu).unwrap()
}

/// Q diag(λ) Qᵀ.
fn cov(q: &source_tda::linalg::BlockDiag, eig: &[f64]) -> Tensor {
    let q = dense(q);
    let n = eig.len();
    let d = Tensor::from_vec(eig.to_vec(), (1, n), &Device::Cpu).unwrap();
    q.broadcast_mul(&d)
        .unwrap()
        .matmul(&q.t().unwrap())
        .unwrap()
}

/// The EK-FAC curvature of one layer applied to `v` [d_out, d_in], in f64:
/// Q_S (Λ ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ. Invariant to the choice of eigenvectors within an
/// eigenspace of equal Λ (e.g. the null space of a rank-deficient covariance).
fn ekfac_apply(f: &LayerFactors, v: &Tensor) -> Tensor {
    let (qs, qa) = (dense(&f.basis.q_s), dense(&f.basis.q_a));
    let lam = f.lambda.to_dtype(DType::F64).unwrap();
    let r = qs.t().unwrap().matmul(v).unwrap().matmul(&qa).unwrap();
    let w = (r * lam).unwrap();
    qs.matmul(&w).unwrap().matmul(&qa.t().unwrap()).unwrap()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    d / n.max(f64::MIN_POSITIVE)
}

/// Each layer's factors in the factor files `a` and `b` agree to 1e-6 relative (Frobenius):
/// the covariances A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ (invariant to the choice
/// of eigenvectors within an eigenspace), their eigenvalues and Λ; and the EK-FAC curvature
/// applied to a random matrix to 1e-5 (its eigenvectors of nearly equal eigenvalues turn by
/// the f32 rounding of the sums, and Λ's entries with them: measured up to 1.4e-6 on this
/// fixture). With `bitwise`, every tensor is the same bit for bit.
fn assert_factors_agree(a: &Path, b: &Path, bitwise: bool) {
    let (fa, _) = load_factors(a, &Device::Cpu).unwrap();
    let (fb, _) = load_factors(b, &Device::Cpu).unwrap();
    assert_eq!(fa.len(), fb.len());
    let (mut worst, mut worst_op): (f64, f64) = (0.0, 0.0);
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.name, y.name);
        if bitwise {
            assert_eq!(f64s(&x.lambda), f64s(&y.lambda), "{}: Λ", x.name);
            assert_eq!(x.basis.eig_a, y.basis.eig_a, "{}", x.name);
            assert_eq!(x.basis.eig_s, y.basis.eig_s, "{}", x.name);
            for (p, q) in x.basis.q_a.blocks.iter().zip(&y.basis.q_a.blocks) {
                assert_eq!(f64s(p), f64s(q), "{}: Q_A", x.name);
            }
            for (p, q) in x.basis.q_s.blocks.iter().zip(&y.basis.q_s.blocks) {
                assert_eq!(f64s(p), f64s(q), "{}: Q_S", x.name);
            }
            continue;
        }
        let (bx, by) = (&x.basis, &y.basis);
        let diffs = [
            (
                "A",
                rel(
                    &f64s(&cov(&bx.q_a, &bx.eig_a)),
                    &f64s(&cov(&by.q_a, &by.eig_a)),
                ),
            ),
            (
                "S",
                rel(
                    &f64s(&cov(&bx.q_s, &bx.eig_s)),
                    &f64s(&cov(&by.q_s, &by.eig_s)),
                ),
            ),
            ("λ_A", rel(&bx.eig_a, &by.eig_a)),
            ("λ_S", rel(&bx.eig_s, &by.eig_s)),
            ("Λ", rel(&f64s(&x.lambda), &f64s(&y.lambda))),
        ];
        for (what, r) in diffs {
            assert!(r < 1e-6, "{}: {what} differs by {r:e} relative", x.name);
            worst = worst.max(r);
        }
        let (o, i) = x.lambda.dims2().unwrap();
        let v = Tensor::randn(0f64, 1.0, (o, i), &Device::Cpu).unwrap();
        let r = rel(&f64s(&ekfac_apply(x, &v)), &f64s(&ekfac_apply(y, &v)));
        assert!(r < 1e-5, "{}: EK-FAC · V differs by {r:e} relative", x.name);
        worst_op = worst_op.max(r);
    }
    eprintln!(
        "{}: factors agree to {worst:e} relative, the EK-FAC applied to {worst_op:e}",
        a.display()
    );
}

fn sha(p: &Path) -> String {
    source_tda::util::hash::sha256_file(p).unwrap()
}

fn stage_record(run: &Path, stage: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    m["stages"][stage].clone()
}

#[test]
fn sharded_fit_equals_the_unsharded_fit_and_the_run_goes_on_as_unsharded() {
    let dir = finetuned();
    let d = dir.path();
    for name in ["one", "four"] {
        copy_dir(&d.join("run"), &d.join(name));
    }
    run_cli(d, &["-q", "fit", "--run-dir", "run"]);
    // One shard does every batch in the unsharded order: bitwise the same factors.
    sharded_fit(d, "one", 1);
    for (a, b) in segments(&d.join("run"))
        .iter()
        .zip(segments(&d.join("one")))
    {
        assert_factors_agree(a, &b, true);
    }
    // Four shards: the sums are added in another order (f32 rounding only).
    for i in 1..=4 {
        run_cli(
            d,
            &[
                "-q",
                "fit",
                "--shard",
                &format!("{i}/4"),
                "--run-dir",
                "four",
            ],
        );
    }
    let e = run_cli(d, &["merge", "fit", "--run-dir", "four"]);
    assert!(e.contains("4 covariance shards merged"), "{e}");
    let bases = d.join("four/shards/fit/bases.safetensors");
    let before = sha(&bases);
    // Idempotent: merging again changes nothing and says what comes next.
    let e = run_cli(d, &["merge", "fit", "--run-dir", "four"]);
    assert!(
        e.contains("merged already") && e.contains("fit --shard I/N"),
        "{e}"
    );
    assert_eq!(sha(&bases), before);
    for i in 1..=4 {
        let e = run_cli(
            d,
            &["fit", "--shard", &format!("{i}/4"), "--run-dir", "four"],
        );
        assert!(
            e.contains("its eigenvalue-correction (Λ) pass written"),
            "{e}"
        );
    }
    let e = run_cli(d, &["merge", "fit", "--run-dir", "four"]);
    assert!(e.contains("4 Λ shards merged; fit: done"), "{e}");
    assert!(!d.join("four/shards").exists(), "partial results removed");
    let rec = stage_record(&d.join("four"), "fit");
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["summary"]["segments"][0]["shards"]["lambda"], 4);
    let manifest = sha(&d.join("four/manifest.json"));
    let e = run_cli(d, &["merge", "fit", "--run-dir", "four"]);
    assert!(e.contains("nothing to merge"), "{e}");
    let e = run_cli(d, &["fit", "--shard", "2/4", "--run-dir", "four"]);
    assert!(e.contains("nothing to do"), "{e}");
    assert_eq!(
        sha(&d.join("four/manifest.json")),
        manifest,
        "a second merge changes nothing"
    );
    for (a, b) in segments(&d.join("run"))
        .iter()
        .zip(segments(&d.join("four")))
    {
        assert_factors_agree(a, &b, false);
    }
    // The same records as the unsharded fit's: the same inputs and config, the same files.
    let plain = stage_record(&d.join("run"), "fit");
    assert_eq!(rec["inputs_hash"], plain["inputs_hash"]);
    assert_eq!(rec["config_hash"], plain["config_hash"]);
    let paths = |r: &serde_json::Value| -> Vec<String> {
        (r["outputs"].as_array().unwrap().iter())
            .map(|o| o["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(paths(&rec), paths(&plain));
    // The later stages see a complete, current fit: verify passes, the pipeline skips fit.
    run_cli(d, &["verify", "--run-dir", "four"]);
    let e = run_cli(d, &["run", "p.toml", "--run-dir", "four"]);
    assert!(e.contains("fit: up to date (skipped)"), "{e}");
    assert!(e.contains("score: done"), "{e}");
}

#[test]
fn merge_refuses_missing_duplicated_and_mixed_shards_naming_what_to_rerun() {
    let dir = finetuned();
    let d = dir.path();
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(e.contains("no shard of the fit's covariance pass"), "{e}");
    for i in [1, 3] {
        run_cli(
            d,
            &[
                "-q",
                "fit",
                "--shard",
                &format!("{i}/3"),
                "--run-dir",
                "run",
            ],
        );
    }
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(
        e.contains("missing shard(s) 2 of 3") && e.contains("fit --shard 2/3 --run-dir /"),
        "{e}"
    );
    let cov = d.join("run/shards/fit/covariance");
    // A copy of shard 1 under shard 2's name is a duplicate, not shard 2.
    for ext in ["json", "safetensors"] {
        std::fs::copy(
            cov.join(format!("shard-1-of-3.{ext}")),
            cov.join(format!("shard-2-of-3.{ext}")),
        )
        .unwrap();
    }
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(e.contains("holds shard 1/3, a duplicate"), "{e}");
    for ext in ["json", "safetensors"] {
        std::fs::remove_file(cov.join(format!("shard-2-of-3.{ext}"))).unwrap();
    }
    // Shards of another count do not mix.
    run_cli(d, &["-q", "fit", "--shard", "2/2", "--run-dir", "run"]);
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(e.contains("different counts") && e.contains("N = 2"), "{e}");
    for ext in ["json", "safetensors"] {
        std::fs::remove_file(cov.join(format!("shard-2-of-2.{ext}"))).unwrap();
    }
    // A shard run with another config is refused before it computes anything; one made
    // under another config (its record's key) is refused by the merge.
    let c2 = std::fs::read_to_string(d.join("c.toml")).unwrap();
    let c2 = c2.replace("[attribution]\n", "[attribution]\nblock_size = 16\n");
    crate::common::write(&d.join("c2.toml"), c2);
    let e = fails(
        d,
        &[
            "fit",
            "--shard",
            "2/3",
            "--config",
            "c2.toml",
            "--run-dir",
            "run",
        ],
    );
    assert!(e.contains("must use the run's config"), "{e}");
    run_cli(d, &["-q", "fit", "--shard", "2/3", "--run-dir", "run"]);
    let rec2 = cov.join("shard-2-of-3.json");
    let text = std::fs::read_to_string(&rec2).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["key"] = "0123456789abcdef".into();
    std::fs::write(&rec2, v.to_string()).unwrap();
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(
        e.contains("mixed configs") && e.contains("rerun `source-tda fit --shard 2/3"),
        "{e}"
    );
    std::fs::write(&rec2, text).unwrap();
    // A data file that changed on disk is refused.
    let data = cov.join("shard-3-of-3.safetensors");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(
        e.contains("changed on disk") && e.contains("fit --shard 3/3"),
        "{e}"
    );
    run_cli(d, &["-q", "fit", "--shard", "3/3", "--run-dir", "run"]);
    let e = run_cli(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(e.contains("3 covariance shards merged"), "{e}");
    // The Λ pass: a missing shard is refused likewise.
    run_cli(d, &["-q", "fit", "--shard", "1/2", "--run-dir", "run"]);
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(
        e.contains("(Λ) pass is missing shard(s) 2 of 2") && e.contains("fit --shard 2/2"),
        "{e}"
    );
    let e = fails(d, &["merge", "query", "--run-dir", "run"]);
    assert!(e.contains("`fit`, `score` and `eval-lds`"), "{e}");
    // score merges too, but not before fit is complete.
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(e.contains("needs the `fit` stage complete first"), "{e}");
}

/// Starts `fit --shard i/n` in the background (as a scheduler's array task would).
fn spawn_shard(dir: &Path, i: usize, n: usize, pause: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_source-tda"));
    cmd.current_dir(dir)
        .args([
            "-q",
            "fit",
            "--shard",
            &format!("{i}/{n}"),
            "--run-dir",
            "run",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for var in ["RUST_LOG", "SOURCE_TDA_PAUSE_IN_STAGE"] {
        cmd.env_remove(var);
    }
    // Two cores: one compute thread per shard process.
    cmd.env("RAYON_NUM_THREADS", "1");
    if pause {
        cmd.env(
            "SOURCE_TDA_PAUSE_IN_STAGE",
            format!("fit:shard-{i}-of-{n}-written"),
        );
    }
    cmd.spawn().expect("starts the binary")
}

fn wait_ok(c: Child) {
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "a shard failed:\n{}", stderr(&o));
}

/// One pass: `n` shard processes at once; shard `killed` is killed once its data is written
/// and before its record is (the worst moment), the merge refuses it as missing, and its
/// rerun completes the pass.
fn concurrent_pass(d: &Path, n: usize, killed: usize) {
    let paused = d.join("run/.paused");
    let _ = std::fs::remove_file(&paused);
    let children: Vec<(usize, Child)> = (1..=n)
        .map(|i| (i, spawn_shard(d, i, n, i == killed)))
        .collect();
    let t0 = Instant::now();
    while !paused.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "shard {killed} never paused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, mut c) in children {
        if i == killed {
            c.kill().unwrap();
            c.wait().unwrap();
        } else {
            wait_ok(c);
        }
    }
    let e = fails(d, &["merge", "fit", "--run-dir", "run"]);
    assert!(
        e.contains(&format!("missing shard(s) {killed} of {n}")),
        "{e}"
    );
    wait_ok(spawn_shard(d, killed, n, false));
    run_cli(d, &["-q", "merge", "fit", "--run-dir", "run"]);
}

#[test]
fn shard_processes_run_concurrently_survive_a_kill_and_merge_to_the_unsharded_fit() {
    let dir = finetuned();
    let d = dir.path();
    copy_dir(&d.join("run"), &d.join("plain"));
    run_cli(d, &["-q", "fit", "--run-dir", "plain"]);
    concurrent_pass(d, 4, 2);
    assert!(d.join("run/shards/fit/bases.json").exists());
    concurrent_pass(d, 4, 3);
    assert_eq!(stage_record(&d.join("run"), "fit")["status"], "complete");
    for (a, b) in segments(&d.join("plain"))
        .iter()
        .zip(segments(&d.join("run")))
    {
        assert_factors_agree(a, &b, false);
    }
}

#[test]
fn scheduler_templates_parse() {
    let root = crate::common::repo_root();
    let scripts: Vec<PathBuf> = ["scripts/slurm", "scripts/k8s"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    assert!(scripts.len() >= 7, "{scripts:?}");
    for s in &scripts {
        let o = Command::new("bash").arg("-n").arg(s).output().unwrap();
        assert!(o.status.success(), "{}: {}", s.display(), stderr(&o));
    }
    let Some(py) = crate::common::reference_python("k8s templates") else {
        return;
    };
    let check = |dir: &Path| {
        Command::new(&py)
            .arg(root.join("scripts/k8s/check.py"))
            .arg(dir)
            .output()
            .unwrap()
    };
    let o = check(&root.join("scripts/k8s"));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("fit-shards.yaml: ok")
            && out.contains("score-shards.yaml: ok")
            && out.contains("merge-job.yaml: ok"),
        "{out}"
    );
    // The check can fail: a pod spec without its restart policy and a mount of no volume.
    let bad = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("scripts/k8s/fit-shards.yaml")).unwrap();
    let text = text.replace("restartPolicy: Never", "restartPolicy: Always");
    crate::common::write(
        &bad.path().join("bad.yaml"),
        text.replace(
            "- name: runs\n          persistentVolumeClaim",
            "- name: other\n          persistentVolumeClaim",
        ),
    );
    let o = check(bad.path());
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("restartPolicy") && e.contains("names no volume"),
        "{e}"
    );
}
