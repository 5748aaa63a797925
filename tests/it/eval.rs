//! The evaluation stages end to end through the CLI: `eval recall` and `eval lds` compare
//! the three methods side by side in their output formats; a document identical to a query
//! is found at rank 1; retraining is resumable (an interrupted run redoes only unfinished
//! jobs), shardable and parallel (two shards + merge, or worker processes = one run, bitwise);
//! a two-stage fine-tune (`[[train.stages]]`) is retrained stage by stage on each role's
//! kept documents, bitwise alike in any number of workers, with predictions summing τ over
//! every role a method scores; and the demo meets the recall target with a small M.

use crate::common;

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};

use crate::common::{batches, cli, stderr, write};

fn demo_model_dir() -> PathBuf {
    common::demo_tokenizer().parent().unwrap().to_path_buf()
}

/// A small run: 24 short documents (one identical to query q0's text, the known source of
/// q0; q1's known sources are two ordinary documents) on the demo model, SGD for 6 steps.
fn setup(subsets: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = crate::common::city_docs_jsonl(23);
    docs += "{\"id\": \"twin\", \"text\": \"The river Navo flows into Lake Tarsk.\"}\n";
    write(&dir.path().join("train.jsonl"), docs);
    write(
        &dir.path().join("queries.jsonl"),
        "{\"id\": \"q0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\", \"known_sources\": [\"twin\"]}\n\
         {\"id\": \"q1\", \"prompt\": \"Boats from Pokas3 carry\", \"completion\": \" blue glass.\", \"known_sources\": \"d03, d13\"}\n\
         {\"id\": \"q2\", \"prompt\": \"The markets of Pokas7 sell\", \"completion\": \" blue glass.\"}\n",
    );
    write(
        &dir.path().join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
             [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 64\n\
             [train]\noptimizer = \"sgd\"\nlr = 0.05\nbatch_size = 8\nepochs = 2\nsegments = 2\ncheckpoints_per_segment = 1\n\
             [attribution]\nmethod = \"source\"\nfisher = \"empirical\"\ntop_k = 3\n\
             [eval]\nsubsets = {subsets}\nk = [1, 3]\nbootstrap = 200\n",
            demo_model_dir().display()
        ),
    );
    run_to_score(dir)
}

fn eval(dir: &Path, run: &str, what: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut args = vec!["eval"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["--config", "c.toml", "--run-dir", run]);
    cli(dir, &args, env)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (method, query_id, subset, seed, predicted, measured) rows of points.parquet.
type Point = (String, String, u32, u32, f64, f64);

fn points(path: &Path) -> Vec<Point> {
    let mut out = Vec::new();
    for b in batches(path) {
        let s = |c: &str| b.column_by_name(c).unwrap().as_string::<i32>().clone();
        let u = |c: &str| {
            b.column_by_name(c)
                .unwrap()
                .as_primitive::<UInt32Type>()
                .clone()
        };
        let f = |c: &str| {
            b.column_by_name(c)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (m, q, j, r, p, y) = (
            s("method"),
            s("query_id"),
            u("subset"),
            u("seed"),
            f("predicted"),
            f("measured"),
        );
        for i in 0..b.num_rows() {
            out.push((
                m.value(i).to_string(),
                q.value(i).to_string(),
                j.value(i),
                r.value(i),
                p.value(i),
                y.value(i),
            ));
        }
    }
    out
}

fn job_files(run: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(run.join("eval-work")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

#[test]
fn recall_and_lds_compare_three_methods_and_resume() {
    let dir = setup(4);
    let o = eval(dir.path(), "run", &["recall"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    for m in ["source", "influence", "gradient_dot"] {
        assert!(table.contains(m), "{table}");
    }
    let run = dir.path().join("run");
    let s = json(&run.join("eval-recall/summary.json"));
    assert_eq!(s["k"], serde_json::json!([1, 3]));
    assert_eq!(s["candidates"], "train");
    assert_eq!(s["queries_without_known_sources"], 1);
    let methods = s["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    assert_eq!(methods[0]["method"], "source");
    for m in methods {
        assert_eq!(m["n_queries"], 2, "{m}");
        for k in ["1", "3"] {
            let r = m["recall"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&r), "{m}");
        }
    }
    // The twin of q0 is every method's top document (the sign convention), so recall@1
    // has q0's hit: ≥ 0.5 over two queries, and the recall table says rank 1 for it.
    let b = &batches(&run.join("eval-recall/recall.parquet"))[0];
    let method = b.column_by_name("method").unwrap().as_string::<i32>();
    let query = b.column_by_name("query_id").unwrap().as_string::<i32>();
    let src = b.column_by_name("known_source").unwrap().as_string::<i32>();
    let rank = b
        .column_by_name("rank")
        .unwrap()
        .as_primitive::<UInt32Type>();
    assert_eq!(b.num_rows(), 3 * 3, "3 methods × (1 + 2) known sources");
    for i in 0..b.num_rows() {
        if query.value(i) == "q0" {
            assert_eq!(src.value(i), "twin");
            assert_eq!(rank.value(i), 1, "method {}", method.value(i));
        }
    }
    for m in methods {
        assert!(m["recall"]["1"].as_f64().unwrap() >= 0.5, "{m}");
        assert!(m["mrr"].as_f64().unwrap() >= 0.5, "{m}");
    }
    // The other methods ran in sub-runs that reuse the run's upstream stages.
    for m in ["influence", "gradient_dot"] {
        let sub = run.join("eval-methods").join(m);
        assert!(sub
            .join("score/query_set=default/shard=0/part-00000.parquet")
            .is_file());
        assert!(std::fs::read_link(sub.join("finetune")).is_ok());
    }
    assert!(
        !run.join("eval-methods/source").exists(),
        "source is the run's own score"
    );

    // LDS, interrupted after its second job: the rerun trains only the rest.
    // In this process (the failpoint is the stage's own hook after each job).
    let o = eval(
        dir.path(),
        "run",
        &["lds", "--workers", "1"],
        &[("SOURCE_TDA_FAIL_IN_STAGE", "eval-lds:after-job-1")],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("after-job-1"), "{}", stderr(&o));
    let done = job_files(&run);
    assert_eq!(done.len(), 2, "{done:?}");
    let before: Vec<_> = done
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    let o = eval(dir.path(), "run", &["lds"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 of 4 retraining jobs already finished"),
        "{}",
        stderr(&o)
    );
    for (p, t) in done.iter().zip(before) {
        assert_eq!(
            std::fs::metadata(p).unwrap().modified().unwrap(),
            t,
            "{p:?} redone"
        );
    }
    assert_eq!(job_files(&run).len(), 4);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("LDS over 4 subsets"), "{table}");

    let s = json(&run.join("eval-lds/summary.json"));
    assert_eq!(s["subsets"], 4);
    assert_eq!(s["alpha"], 0.5);
    assert_eq!(s["seeds"], 1);
    assert_eq!(s["subset_size"], 12);
    let methods = s["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    // Every method after the first is compared with it, paired on the same subsets.
    assert!(methods[0]["vs"].is_null(), "{}", methods[0]);
    for m in &methods[1..] {
        let vs = &m["vs"];
        if let (Some(a), Some(b)) = (m["lds"].as_f64(), methods[0]["lds"].as_f64()) {
            assert_eq!(vs["method"], methods[0]["method"], "{m}");
            let d = vs["difference"].as_f64().unwrap();
            assert!((d - (a - b)).abs() < 1e-12, "{m}");
            let ci = vs["ci95"].as_array().unwrap();
            assert!(ci[0].as_f64().unwrap() <= ci[1].as_f64().unwrap(), "{m}");
        }
    }
    assert!(table.contains("paired 95% CI"), "{table}");
    for m in methods {
        let pq = m["per_query"].as_object().unwrap();
        assert_eq!(pq.len(), 3, "{m}");
        if let Some(l) = m["lds"].as_f64() {
            assert!((-1.0..=1.0).contains(&l), "{m}");
            let ci = m["ci95"].as_array().unwrap();
            assert!(ci[0].as_f64().unwrap() <= ci[1].as_f64().unwrap(), "{m}");
        }
    }
    let pts = points(&run.join("eval-lds/points.parquet"));
    assert_eq!(pts.len(), 3 * 3 * 4, "methods × queries × subsets × seeds");
    // The measured losses do not depend on the method; they differ between subsets.
    let measured = |m: &str| -> Vec<f64> { pts.iter().filter(|p| p.0 == m).map(|p| p.5).collect() };
    assert_eq!(measured("source"), measured("influence"));
    let q0: Vec<f64> = pts
        .iter()
        .filter(|p| p.0 == "source" && p.1 == "q0")
        .map(|p| p.5)
        .collect();
    assert!(q0.iter().any(|&x| x != q0[0]), "{q0:?}");

    // A rerun with nothing changed is skipped; more bootstrap resamples merge again
    // without retraining.
    let o = eval(dir.path(), "run", &["lds"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("up to date"), "{}", stderr(&o));
}

#[test]
fn two_shards_a_merge_and_worker_processes_equal_one_run_bitwise() {
    let dir = setup(3);
    let copy = |to: &str| {
        let st = std::process::Command::new("cp")
            .args(["-a", "run", to])
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
    };
    copy("sharded");
    copy("workers");
    let o = eval(dir.path(), "run", &["lds", "--workers", "1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Three single-threaded worker processes against one process on every core.
    let o = eval(dir.path(), "workers", &["lds", "--workers", "3"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 retraining jobs in 3 worker processes of 1 thread(s) each"),
        "{}",
        stderr(&o)
    );
    assert!(
        !dir.path().join("workers/eval-work/workers").exists(),
        "the logs of workers that succeeded are removed"
    );

    let o = eval(dir.path(), "sharded", &["lds", "--shard", "2/2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not finished yet"), "{}", stderr(&o));
    assert!(!dir.path().join("sharded/eval-lds").exists());
    // `merge eval-lds` refuses while shard 1's two jobs (0 and 2) have no result.
    let merge = [
        "merge",
        "eval-lds",
        "--config",
        "c.toml",
        "--run-dir",
        "sharded",
    ];
    let o = cli(dir.path(), &merge, &[]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 of the 3 retraining jobs of eval-lds have no result"),
        "{}",
        stderr(&o)
    );
    let o = eval(dir.path(), "sharded", &["lds", "--shard", "1/2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !dir.path().join("sharded/eval-lds").exists(),
        "only the last shard merges"
    );
    // The last shard again: its jobs are done, so it only merges.
    let o = eval(dir.path(), "sharded", &["lds", "--shard", "2/2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("trained 0 job(s); all done, merged"),
        "{}",
        stderr(&o)
    );

    // Merging again changes nothing.
    let summary = std::fs::read(dir.path().join("sharded/eval-lds/summary.json")).unwrap();
    let o = cli(dir.path(), &merge, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing to merge"), "{}", stderr(&o));
    let again = std::fs::read(dir.path().join("sharded/eval-lds/summary.json")).unwrap();
    assert_eq!(summary, again);

    let a = points(&dir.path().join("run/eval-lds/points.parquet"));
    assert_eq!(a.len(), 3 * 3 * 3);
    let sa = json(&dir.path().join("run/eval-lds/summary.json"));
    for other in ["sharded", "workers"] {
        let b = points(&dir.path().join(other).join("eval-lds/points.parquet"));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.0, &x.1, x.2, x.3), (&y.0, &y.1, y.2, y.3));
            assert_eq!(x.4.to_bits(), y.4.to_bits(), "{other}: {x:?} vs {y:?}");
            assert_eq!(x.5.to_bits(), y.5.to_bits(), "{other}: {x:?} vs {y:?}");
        }
        let sb = json(&dir.path().join(other).join("eval-lds/summary.json"));
        assert_eq!(sa["methods"], sb["methods"], "{other}");
    }

    // Bad shard specs are errors that say what is allowed.
    for bad in ["0/2", "3/2", "1-2", "a/b"] {
        let o = eval(dir.path(), "sharded", &["lds", "--shard", bad], &[]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("expected i/n with 1 ≤ i ≤ n"),
            "{}",
            stderr(&o)
        );
    }
}

/// A two-stage run: momentum SGD with clipping on the 24 city documents (`facts`, 3 steps),
/// then on 10 other documents (`text`, role `general`, 4 steps, continuing the optimizer).
fn setup_two_stage(subsets: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = crate::common::city_docs_jsonl(23);
    docs += "{\"id\": \"twin\", \"text\": \"The river Navo flows into Lake Tarsk.\"}\n";
    write(&dir.path().join("train.jsonl"), docs);
    let general: String = (0..10)
        .map(|i| {
            format!(
                "{{\"id\": \"g{i}\", \"text\": \"The harbour of Pokas{i} opens at {} in the morning.\"}}\n",
                5 + i % 4
            )
        })
        .collect();
    write(&dir.path().join("general.jsonl"), general);
    write(
        &dir.path().join("queries.jsonl"),
        "{\"id\": \"q0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\", \"known_sources\": [\"twin\"]}\n\
         {\"id\": \"q1\", \"prompt\": \"The harbour of Pokas3 opens at\", \"completion\": \" 8 in the morning.\"}\n",
    );
    write(
        &dir.path().join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
             [data.general]\nid = \"./general.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
             [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 64\n\
             [train]\noptimizer = \"momentum\"\nlr = 0.05\nbatch_size = 8\nmax_grad_norm = 1.0\nsegments = 1\ncheckpoints_per_segment = 1\n\
             [[train.stages]]\nname = \"facts\"\ndataset = \"train\"\nepochs = 1\n\
             [[train.stages]]\nname = \"text\"\ndataset = \"general\"\nepochs = 2\ncontinue_optimizer = true\n\
             [attribution]\nmethod = \"source\"\nfisher = \"empirical\"\ntop_k = 3\n\
             [eval]\nsubsets = {subsets}\nk = [1, 3]\nbootstrap = 200\n",
            demo_model_dir().display()
        ),
    );
    run_to_score(dir)
}

/// τ of (query, document, role) from a run's score table.
fn taus(path: &Path) -> std::collections::HashMap<(String, String, String), f64> {
    let mut out = std::collections::HashMap::new();
    for b in batches(path) {
        let s = |c: &str| b.column_by_name(c).unwrap().as_string::<i32>().clone();
        let (q, t, d) = (s("query_id"), s("train_id"), s("dataset"));
        let tau = b
            .column_by_name("tau")
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone();
        for i in 0..b.num_rows() {
            let key = (q.value(i).into(), t.value(i).into(), d.value(i).into());
            out.insert(key, tau.value(i));
        }
    }
    out
}

#[test]
fn two_stage_runs_retrain_every_stage_on_each_roles_subset_bitwise_in_workers() {
    let dir = setup_two_stage(3);
    // The retraining's entry point, on all documents, ends where the finetune stage did.
    let c = source_tda::config::Config::load(&dir.path().join("c.toml")).unwrap();
    let stages = c.train.stage_list();
    let prepared = |role: &str| {
        source_tda::data::read_prepared(&dir.path().join(format!("run/prepare/{role}.parquet")))
            .unwrap()
            .0
    };
    let (facts, general) = (prepared("train"), prepared("general"));
    let runs = [
        source_tda::train::StageRun {
            train: &stages[0].train,
            docs: &facts,
            continue_optimizer: false,
        },
        source_tda::train::StageRun {
            train: &stages[1].train,
            docs: &general,
            continue_optimizer: true,
        },
    ];
    let (model, log) = source_tda::train::train_stages_in_memory(
        &demo_model_dir(),
        &runs,
        &c.batching,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(log.len(), 3 + 4);
    let mine = dir.path().join("in-memory.safetensors");
    source_tda::train::checkpoint::write_safetensors(
        &mine,
        &source_tda::train::checkpoint::hf_weights(&model).unwrap(),
        std::collections::HashMap::from([("format".to_string(), "pt".to_string())]),
    )
    .unwrap();
    assert!(
        std::fs::read(&mine).unwrap()
            == std::fs::read(
                dir.path()
                    .join("run/finetune/checkpoints/step-000007/model.safetensors")
            )
            .unwrap(),
        "in-memory stages end bitwise on the finetune stage's final weights"
    );

    // eval recall ranks the fine-tuning set's documents as before.
    let o = eval(dir.path(), "run", &["recall"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = json(&dir.path().join("run/eval-recall/summary.json"));
    assert_eq!(r["candidates"], "train");
    assert_eq!(r["methods"][0]["n_queries"], 1);

    let st = std::process::Command::new("cp")
        .args(["-a", "run", "workers"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let o = eval(dir.path(), "run", &["lds", "--workers", "1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("train only"), "{}", stderr(&o));
    let o = eval(dir.path(), "workers", &["lds", "--workers", "3"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = points(&dir.path().join("run/eval-lds/points.parquet"));
    let b = points(&dir.path().join("workers/eval-lds/points.parquet"));
    assert_eq!(a.len(), 3 * 2 * 3);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.0, &x.1, x.2, x.3), (&y.0, &y.1, y.2, y.3));
        assert_eq!(x.4.to_bits(), y.4.to_bits(), "{x:?} vs {y:?}");
        assert_eq!(x.5.to_bits(), y.5.to_bits(), "{x:?} vs {y:?}");
    }
    let s = json(&dir.path().join("run/eval-lds/summary.json"));
    assert_eq!(
        s["methods"],
        json(&dir.path().join("workers/eval-lds/summary.json"))["methods"]
    );
    assert_eq!(s["roles"][0]["role"], "train");
    assert_eq!(s["roles"][0]["subset_size"], 12);
    assert_eq!(s["roles"][1]["role"], "general");
    assert_eq!(s["roles"][1]["subset_size"], 5);
    let source = &s["methods"][0];
    assert_eq!(source["roles"], serde_json::json!(["train", "general"]));
    assert!(source["by_role"]["general"].is_object(), "{s}");
    let influence = &s["methods"][1];
    assert_eq!(influence["roles"], serde_json::json!(["train"]));
    assert!(
        influence["by_role"]["train"]["vs"]["ci95"].is_array(),
        "{s}"
    );
    assert!(influence["by_role"]["general"].is_null(), "{s}");

    // Each job kept 12 + 5 documents and retrained 2 + 2 steps; Source's predicted loss is
    // −Σ τ over the kept documents of both roles, the influence function's over `train`'s.
    let tau = taus(
        &dir.path()
            .join("run/score/query_set=default/shard=0/part-00000.parquet"),
    );
    let tau_if = taus(
        &dir.path()
            .join("run/eval-methods/influence/score/query_set=default/shard=0/part-00000.parquet"),
    );
    for f in job_files(&dir.path().join("run")) {
        let job = json(&f);
        let kept = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        let facts_kept = kept(&job["doc_ids"]);
        assert_eq!(job["other_roles"][0]["role"], "general");
        let general_kept = kept(&job["other_roles"][0]["doc_ids"]);
        assert_eq!((facts_kept.len(), general_kept.len()), (12, 5));
        assert_eq!(job["steps"], 2 + 2);
        let j = job["subset"].as_u64().unwrap() as u32;
        for (method, table, roles) in [
            ("source", &tau, vec!["train", "general"]),
            ("influence", &tau_if, vec!["train"]),
        ] {
            for qid in ["q0", "q1"] {
                let mut want = 0.0;
                for role in &roles {
                    let ids = if *role == "train" {
                        &facts_kept
                    } else {
                        &general_kept
                    };
                    for id in ids {
                        want -= table[&(qid.to_string(), id.clone(), role.to_string())];
                    }
                }
                let got = a
                    .iter()
                    .find(|p| p.0 == method && p.1 == qid && p.2 == j)
                    .unwrap()
                    .4;
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1e-30),
                    "{method} {qid} subset {j}: {got} vs {want}"
                );
            }
        }
    }
}

/// The demo with a small M: Source finds every planted fact's documents (recall@1 ≥ 0.9,
/// the project's target), token-span recall agrees with brute force for every method, and
/// `eval lds` runs on the demo's real fine-tuning config.
#[test]
fn demo_meets_the_recall_target_and_runs_lds() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo_root();
    let text = std::fs::read_to_string(root.join("configs/demo-eval.toml"))
        .unwrap()
        .replace(
            "cache_dir = \"../assets/hf-cache\"",
            &format!("cache_dir = \"{}\"", root.join("assets/hf-cache").display()),
        );
    write(
        &dir.path().join("c.toml"),
        format!("{text}\n[eval]\nsubsets = 3\nbootstrap = 100\n"),
    );
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\", \"eval-recall\", \"eval-lds\"]\nrun_dir = \"run\"\n",
    );
    let o = cli(dir.path(), &["-q", "run", "p.toml"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&dir.path().join("run/eval-recall/summary.json"));
    let source = &s["methods"][0];
    assert_eq!(source["method"], "source");
    assert_eq!(source["n_queries"], 8);
    assert!(source["recall"]["1"].as_f64().unwrap() >= 0.9, "{s}");
    crate::eval_spans::demo_token_span_recall_matches_brute_force(&dir.path().join("run"), &s);
    let l = json(&dir.path().join("run/eval-lds/summary.json"));
    assert_eq!(l["subset_size"], 152);
    assert_eq!(l["methods"].as_array().unwrap().len(), 3);
}

/// Runs `dir/c.toml` through `score` (a pipeline `p.toml` written beside it) and returns `dir`.
fn run_to_score(dir: tempfile::TempDir) -> tempfile::TempDir {
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\"]\nrun_dir = \"run\"\n",
    );
    let o = cli(dir.path(), &["-q", "run", "p.toml"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir
}
