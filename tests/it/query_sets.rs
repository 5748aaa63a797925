//! New questions without recomputation, proven from the manifest's records (no timing): a run
//! whose only change is its queries reruns `query`, `score` and `report` and keeps `finetune`
//! and `fit`; a run directory of an earlier build (every upstream file hashed) is reused, not
//! recomputed; `source-tda ask` scores named query sets beside the default one, reusing the
//! fit, and they coexist with each other, with reruns of the default set and in the report.
//! Token texts in `token_scores.parquet` join back to each document's text (non-ASCII too).

use std::collections::HashMap;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::RecordBatch;
use serde_json::Value;

use crate::common::{self, batches, cli, stderr, write};

const QUERIES: &str = "{\"id\": \"q0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\"}\n\
    {\"id\": \"q1\", \"prompt\": \"Boats from Pokas3 carry\", \"completion\": \" blue glass.\"}\n";

/// A run folder with local data (the demo's model), non-ASCII text among the documents.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = crate::common::city_docs_jsonl(11);
    docs += "{\"id\": \"intl\", \"text\": \"Café naïve: 東京 🦀 déjà vu.\"}\n";
    docs += "{\"id\": \"twin\", \"text\": \"The river Navo flows into Lake Tarsk.\"}\n";
    write(&dir.path().join("train.jsonl"), docs);
    write(&dir.path().join("queries.jsonl"), QUERIES);
    write_config(dir.path(), 64);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\", \"report\"]\nrun_dir = \"run\"\n",
    );
    dir
}

fn write_config(dir: &Path, query_max_length: usize) {
    let model = common::demo_tokenizer().parent().unwrap().to_path_buf();
    write(
        &dir.join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
             [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = {query_max_length}\n\
             [query]\nmax_new_tokens = 4\n\
             [train]\noptimizer = \"sgd\"\nlr = 0.01\nbatch_size = 8\nepochs = 1\nsegments = 1\ncheckpoints_per_segment = 1\n\
             [attribution]\nmethod = \"source\"\nfisher = \"empirical\"\nall_token_scores = true\n",
            model.display()
        ),
    );
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = cli(dir, args, &[]);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stderr(&o)
}

fn manifest(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap()
}

/// Each record's start time: a record that kept it was not rerun.
fn started(m: &Value) -> HashMap<String, String> {
    m["stages"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, r)| (k.clone(), r["started_at"].as_str().unwrap().to_string()))
        .collect()
}

fn assert_only_queries_reran(before: &HashMap<String, String>, after: &HashMap<String, String>) {
    for kept in ["finetune", "fit"] {
        assert_eq!(before[kept], after[kept], "{kept} must not rerun");
    }
    for reran in ["query", "score", "report"] {
        assert_ne!(before[reran], after[reran], "{reran} must rerun");
    }
}

fn strs(b: &RecordBatch, c: &str) -> Vec<String> {
    let col = b.column_by_name(c).unwrap().as_string::<i32>();
    col.iter().map(|s| s.unwrap().to_string()).collect()
}

/// (query, doc) → τ from a scores.parquet.
fn taus(path: &Path) -> HashMap<(String, String), f64> {
    let mut out = HashMap::new();
    for b in batches(path) {
        let (q, d) = (strs(&b, "query_id"), strs(&b, "train_id"));
        let t = b
            .column_by_name("tau")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..q.len() {
            out.insert((q[i].clone(), d[i].clone()), t.value(i));
        }
    }
    out
}

#[test]
fn changing_only_the_queries_reruns_query_score_and_report_not_finetune_or_fit() {
    let dir = setup();
    let run = dir.path().join("run");
    ok(dir.path(), &["-q", "run", "p.toml"]);
    let first = started(&manifest(&run));

    // A new query in the same file: the file changed, so fetch and prepare look again.
    let more = format!(
        "{QUERIES}{{\"id\": \"q2\", \"prompt\": \"Pokas5 lies on\", \"completion\": \" the river Braen.\"}}\n"
    );
    write(&dir.path().join("queries.jsonl"), more);
    ok(dir.path(), &["-q", "run", "p.toml"]);
    let second = started(&manifest(&run));
    assert_only_queries_reran(&first, &second);
    assert_eq!(
        taus(&run.join("score/query_set=default/shard=0/part-00000.parquet")).len(),
        3 * 13
    );

    // Another [data.query] setting: prepare reruns, its train.parquet is the same bytes.
    write_config(dir.path(), 48);
    ok(
        dir.path(),
        &["-q", "run", "p.toml", "--allow-config-change"],
    );
    let third = started(&manifest(&run));
    assert_only_queries_reran(&second, &third);
    assert_ne!(second["prepare"], third["prepare"], "prepare reran");

    // And the training data is still an input: a change there reruns the fine-tune.
    let train = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    write(
        &dir.path().join("train.jsonl"),
        train.replace("d00", "d00b"),
    );
    ok(dir.path(), &["-q", "run", "p.toml"]);
    let fourth = started(&manifest(&run));
    assert_ne!(third["finetune"], fourth["finetune"], "finetune reran");
    assert_ne!(third["fit"], fourth["fit"], "fit reran");
}

#[test]
fn a_run_directory_hashed_by_an_earlier_build_is_reused_not_recomputed() {
    let dir = setup();
    let run = dir.path().join("run");
    ok(dir.path(), &["-q", "run", "p.toml"]);
    // Rewrite every record's inputs as builds before per-file inputs hashed them: each
    // upstream stage's outputs whole.
    let path = run.join("manifest.json");
    let mut m: source_tda::pipeline::Manifest =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let hashes: HashMap<String, String> = m
        .stages
        .iter()
        .map(|(k, r)| (k.clone(), r.outputs_hash()))
        .collect();
    let mut rewritten = 0;
    for r in m.stages.values_mut() {
        for (k, v) in r.inputs.iter_mut() {
            let up = k.strip_prefix("stage:").unwrap_or(k);
            if let Some(h) = hashes.get(up) {
                rewritten += (v != h) as usize;
                *v = h.clone();
            }
        }
        r.inputs_hash =
            source_tda::util::hash::sha256_json(&serde_json::to_value(&r.inputs).unwrap());
    }
    assert!(
        rewritten >= 3,
        "finetune, fit and score read fewer files now"
    );
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let before = started(&manifest(&run));

    let out = ok(dir.path(), &["run", "p.toml"]);
    assert_eq!(out.matches("up to date (skipped)").count(), 7, "{out}");
    assert_eq!(before, started(&manifest(&run)));
    // The records now hold the precise inputs: new queries keep the fine-tune and the fit.
    write(
        &dir.path().join("queries.jsonl"),
        QUERIES.replace("blue glass", "glass"),
    );
    ok(dir.path(), &["-q", "run", "p.toml"]);
    assert_only_queries_reran(&before, &started(&manifest(&run)));

    // Such a build's fetch/ held one resolved.json: it is still read (the report needs it).
    let fetch = run.join("fetch");
    let legacy = fetch.join("resolved.json");
    write(&legacy, common::fetched(&run).to_string());
    std::fs::remove_file(fetch.join("model.json")).unwrap();
    std::fs::remove_dir_all(fetch.join("data")).unwrap();
    let mut m: source_tda::pipeline::Manifest =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m.stages.get_mut("fetch").unwrap().outputs = vec![source_tda::pipeline::OutputFile {
        path: "fetch/resolved.json".into(),
        bytes: std::fs::metadata(&legacy).unwrap().len(),
        sha256: source_tda::util::hash::sha256_file(&legacy).unwrap(),
    }];
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    ok(
        dir.path(),
        &["-q", "report", "--run-dir", "run", "--force", "report"],
    );
    assert!(run.join("report/report.html").is_file());
}

#[test]
fn ask_scores_named_query_sets_beside_the_default_one_reusing_the_fit() {
    let dir = setup();
    let run = dir.path().join("run");
    ok(dir.path(), &["-q", "run", "p.toml"]);
    let before = started(&manifest(&run));

    // The default set's q0 again, under another id: the same question gets the same scores.
    write(
        &dir.path().join("again.jsonl"),
        "{\"id\": \"a0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\"}\n",
    );
    let out = ok(
        dir.path(),
        &[
            "ask",
            "--run-dir",
            "run",
            "--prompts",
            "again.jsonl",
            "--name",
            "first",
        ],
    );
    assert!(out.contains("score/query_set=first: done"), "{out}");
    let after = started(&manifest(&run));
    for s in ["fetch", "prepare", "finetune", "fit", "query", "score"] {
        assert_eq!(before[s], after[s], "{s} must not rerun for a new set");
    }
    assert_ne!(
        before["report"], after["report"],
        "the report lists the new set"
    );
    let default = taus(&run.join("score/query_set=default/shard=0/part-00000.parquet"));
    let set = taus(&run.join("score/query_set=first/shard=0/part-00000.parquet"));
    assert_eq!(set.len(), 13);
    for ((q, d), t) in &set {
        assert_eq!(q, "a0");
        let want = default[&("q0".to_string(), d.clone())];
        assert!(
            (t - want).abs() <= 1e-4 * want.abs().max(1e-9),
            "{d}: {t} vs {want}"
        );
    }

    // Prompts alone: the model completes them (named after the file), a second set.
    write(
        &dir.path().join("open.jsonl"),
        "{\"prompt\": \"Boats from Pokas3 carry\"}\n{\"prompt\": \"The river Navo\"}\n",
    );
    ok(
        dir.path(),
        &["-q", "ask", "--run-dir", "run", "--prompts", "open.jsonl"],
    );
    let q = &batches(&run.join("query/query_set=open/queries.parquet"))[0];
    assert_eq!(strs(q, "query_id"), ["open-0", "open-1"]);
    let generated = q.column_by_name("generated").unwrap().as_boolean();
    assert!(generated.iter().all(|g| g == Some(true)));
    let n = q.column_by_name("n_completion_tokens").unwrap();
    assert!(n
        .as_primitive::<UInt32Type>()
        .values()
        .iter()
        .all(|&n| n > 0));

    // Both sets coexist, in the report too; asking again skips; the default set reruns
    // without losing them; every recorded file is intact.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report/summary.json")).unwrap())
            .unwrap();
    let sets: Vec<(&str, bool, usize)> = summary["query_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let n = s["queries"].as_array().unwrap().len();
            (
                s["name"].as_str().unwrap(),
                s["current"].as_bool().unwrap(),
                n,
            )
        })
        .collect();
    assert_eq!(sets, [("first", true, 1), ("open", true, 2)]);
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    assert!(html.contains("Query set first") && html.contains("first/a0"));
    let out = ok(
        dir.path(),
        &[
            "ask",
            "--run-dir",
            "run",
            "--prompts",
            "again.jsonl",
            "--name",
            "first",
        ],
    );
    assert!(
        out.contains("score/query_set=first: up to date (skipped)"),
        "{out}"
    );
    ok(dir.path(), &["-q", "run", "p.toml", "--force", "query"]);
    assert!(run
        .join("score/query_set=first/shard=0/part-00000.parquet")
        .is_file());
    assert!(run
        .join("query/query_set=open/gradients.safetensors")
        .is_file());
    ok(dir.path(), &["-q", "verify", "--run-dir", "run"]);
    let status = ok(dir.path(), &["status", "--run-dir", "run"]);
    let o = cli(dir.path(), &["status", "--run-dir", "run", "--json"], &[]);
    let status_json: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows: HashMap<&str, &str> = status_json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["stage"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    for s in ["query/query_set=first", "score/query_set=open"] {
        assert_eq!(rows.get(s), Some(&"complete"), "{status}{rows:?}");
    }

    // Rows with and without a completion are two sets, not one.
    write(
        &dir.path().join("mixed.jsonl"),
        "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": \"c\"}\n",
    );
    let o = cli(
        dir.path(),
        &["ask", "--run-dir", "run", "--prompts", "mixed.jsonl"],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("split the file into two sets"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn token_texts_in_token_scores_join_back_to_each_documents_text() {
    let dir = setup();
    let run = dir.path().join("run");
    ok(dir.path(), &["-q", "run", "p.toml", "--until", "score"]);
    let docs = &batches(&run.join("score/train_docs.parquet"))[0];
    let text: HashMap<String, String> = strs(docs, "train_id")
        .into_iter()
        .zip(strs(docs, "text"))
        .collect();
    let mut pieces: HashMap<(String, String), Vec<(u32, String)>> = HashMap::new();
    for b in batches(&run.join("score/token_scores.parquet")) {
        let (q, d, t) = (
            strs(&b, "query_id"),
            strs(&b, "train_id"),
            strs(&b, "token_text"),
        );
        let idx = b
            .column_by_name("token_index")
            .unwrap()
            .as_primitive::<UInt32Type>();
        for i in 0..q.len() {
            pieces
                .entry((q[i].clone(), d[i].clone()))
                .or_default()
                .push((idx.value(i), t[i].clone()));
        }
    }
    assert_eq!(pieces.len(), 2 * 13);
    for ((_, d), mut p) in pieces {
        p.sort();
        let joined: String = p.into_iter().map(|(_, s)| s).collect();
        assert_eq!(joined, text[&d], "{d}");
    }
}
