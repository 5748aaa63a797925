//! The fit → query → score stages end to end on a small Llama (the demo's), through the CLI:
//! the sign convention (a training document identical to a query is its top proponent, for
//! every method), the output tables' contracts (per-token scores add up to document scores,
//! segment columns add up to the score) and invariance to the batch size (the scores dataset
//! read by DuckDB and pyarrow: `score_output`).

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt32Type};
use arrow_array::RecordBatch;

use crate::common::{batches, cli, stderr, write};

fn demo_model_dir() -> PathBuf {
    common::demo_tokenizer().parent().unwrap().to_path_buf()
}

/// A run folder with local data: 24 short documents, one of them exactly a query's text.
pub(crate) fn setup(method: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = crate::common::city_docs_jsonl(23);
    docs += "{\"id\": \"twin\", \"text\": \"The river Navo flows into Lake Tarsk.\"}\n";
    write(&dir.path().join("train.jsonl"), docs);
    write(
        &dir.path().join("queries.jsonl"),
        "{\"id\": \"q0\", \"prompt\": \"The river Navo flows into\", \"completion\": \" Lake Tarsk.\"}\n\
         {\"id\": \"q1\", \"prompt\": \"Boats from Pokas3 carry\", \"completion\": \" blue glass.\"}\n",
    );
    write(
        &dir.path().join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 64\n\
             [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 64\n\
             [train]\noptimizer = \"sgd\"\nlr = 0.01\nbatch_size = 8\nepochs = 2\nsegments = 2\ncheckpoints_per_segment = 1\n\
             [attribution]\nmethod = \"{method}\"\nfisher = \"empirical\"\ntop_k = 3\n{extra}",
            demo_model_dir().display()
        ),
    );
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\"]\nrun_dir = \"run\"\n",
    );
    dir
}

pub(crate) fn run(dir: &Path) {
    let o = cli(dir, &["-q", "run", "p.toml"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn strs(b: &RecordBatch, c: &str) -> Vec<String> {
    b.column_by_name(c)
        .unwrap()
        .as_string::<i32>()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect()
}

fn f64s(b: &RecordBatch, c: &str) -> Vec<f64> {
    b.column_by_name(c)
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec()
}

/// (query, doc) → (score, tau, rank) from the default set's scores part.
fn scores(run: &Path) -> HashMap<(String, String), (f64, f64, u32)> {
    let mut out = HashMap::new();
    for b in batches(&run.join("score/query_set=default/shard=0/part-00000.parquet")) {
        let (q, d) = (strs(&b, "query_id"), strs(&b, "train_id"));
        let (s, t) = (f64s(&b, "score"), f64s(&b, "tau"));
        let r = b
            .column_by_name("rank")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec();
        for i in 0..q.len() {
            out.insert((q[i].clone(), d[i].clone()), (s[i], t[i], r[i]));
        }
    }
    out
}

#[test]
fn a_document_identical_to_the_query_is_its_top_proponent_for_every_method() {
    for method in ["gradient_dot", "influence", "source"] {
        let dir = setup(method, "");
        run(dir.path());
        let s = scores(&dir.path().join("run"));
        let (score, tau, rank) = s[&("q0".to_string(), "twin".to_string())];
        assert_eq!(rank, 1, "{method}: the twin document ranks {rank}");
        assert!(
            tau > 0.0 && score > 0.0,
            "{method}: a proponent has τ > 0 ({tau})"
        );
        check_token_factors(&dir.path().join("run/query"));
    }
}

/// The query stage's token factors multiply out to its dense gradients: Δ_qᵀ A_q = V_q for
/// every tracked layer.
fn check_token_factors(query: &Path) {
    let dev = candle_core::Device::Cpu;
    let dense = candle_core::safetensors::load(query.join("gradients.safetensors"), &dev).unwrap();
    let tf = candle_core::safetensors::load(query.join("token_factors.safetensors"), &dev).unwrap();
    assert_eq!(tf.len(), 2 * dense.len());
    for (name, v) in &dense {
        let f = source_tda::linalg::TokenFactors::new(
            tf[&format!("delta.{name}")].clone(),
            tf[&format!("a.{name}")].clone(),
        )
        .unwrap();
        common::assert_factors_are_dense(&f, v, name);
    }
}

#[test]
fn output_tables_keep_their_contracts_and_batching_changes_nothing() {
    let dir = setup("source", "");
    run(dir.path());
    let run_dir = dir.path().join("run");
    let base = scores(&run_dir);
    assert_eq!(base.len(), 2 * 24);

    // Segment columns add up to the score; τ = score / n_train.
    for b in batches(&run_dir.join("score/query_set=default/shard=0/part-00000.parquet")) {
        let seg_cols: Vec<String> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n.starts_with("segment_"))
            .collect();
        assert_eq!(seg_cols.len(), 2, "{seg_cols:?}");
        let score = f64s(&b, "score");
        let tau = f64s(&b, "tau");
        let n = b
            .column_by_name("n_train")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec();
        for i in 0..score.len() {
            let sum: f64 = seg_cols.iter().map(|c| f64s(&b, c)[i]).sum();
            assert!((sum - score[i]).abs() <= 1e-9 * score[i].abs().max(1e-12));
            assert!((tau[i] - score[i] / n[i] as f64).abs() <= 1e-12 * tau[i].abs().max(1e-12));
            assert_eq!(n[i], 24);
        }
    }

    // Per-token scores of the kept documents add up to their document scores.
    let mut sums: HashMap<(String, String), f64> = HashMap::new();
    let mut kept = 0;
    for b in batches(&run_dir.join("score/token_scores.parquet")) {
        let (q, d) = (strs(&b, "query_id"), strs(&b, "train_id"));
        let s = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float32Type>()
            .values()
            .to_vec();
        kept += q.len();
        for i in 0..q.len() {
            *sums.entry((q[i].clone(), d[i].clone())).or_default() += s[i] as f64;
        }
    }
    assert!(kept > 0);
    assert_eq!(sums.len(), 2 * 3, "top_k = 3 documents per query");
    let scale = base.values().fold(0f64, |m, v| m.max(v.0.abs()));
    for (k, v) in &sums {
        let (score, _, rank) = base[k];
        assert!(rank <= 3);
        assert!(
            (v - score).abs() <= 1e-5 * scale,
            "{k:?}: tokens {v} vs {score}"
        );
    }

    // Another token budget (other batches, other padding): the same scores.
    let dir2 = setup("source", "");
    let cfg = std::fs::read_to_string(dir2.path().join("c.toml")).unwrap();
    write(
        &dir2.path().join("c.toml"),
        format!("{cfg}[batching]\ntoken_budget = 128\nmax_batch_size = 3\n"),
    );
    run(dir2.path());
    let other = scores(&dir2.path().join("run"));
    for (k, v) in &base {
        let w = other[k];
        assert!(
            (v.0 - w.0).abs() <= 2e-3 * scale,
            "{k:?}: {} vs {}",
            v.0,
            w.0
        );
    }
}

#[test]
fn thread_count_changes_nothing() {
    // One thread against the default pool: the same scores within float tolerance.
    let dirs: Vec<tempfile::TempDir> = ["1", "2"]
        .iter()
        .map(|threads| {
            let dir = setup("source", "");
            let o = cli(
                dir.path(),
                &["-q", "run", "p.toml"],
                &[("RAYON_NUM_THREADS", threads)],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            dir
        })
        .collect();
    let a = scores(&dirs[0].path().join("run"));
    let b = scores(&dirs[1].path().join("run"));
    let scale = a.values().fold(0f64, |m, v| m.max(v.0.abs()));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(
            (v.0 - b[k].0).abs() <= 1e-3 * scale,
            "{k:?}: {} vs {}",
            v.0,
            b[k].0
        );
    }
}
