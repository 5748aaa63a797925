//! The candidate index (`index` stage, `[attribution.candidates]`) through the CLI: with every
//! document a candidate the scores are the full run's; candidates are scored exactly (their
//! rows are the full run's rows); where every tracked coordinate fits in the row's exact part
//! the sketched score is the exact score, so each query's candidates are exactly its true
//! top and bottom documents; a missing or stale index is refused with advice.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use source_tda::report::table::Table;

use crate::common::{cli, stderr, write};
use crate::stages_attribution::{run, setup};

/// (query, train_id) → score of the default set's scores dataset.
fn scores(run: &Path) -> HashMap<(String, String), f64> {
    let t = Table::read_parts(&run.join("score/query_set=default")).unwrap();
    let (q, d, s) = (
        t.strings("query_id").unwrap(),
        t.strings("train_id").unwrap(),
        t.floats("score").unwrap(),
    );
    (0..t.len())
        .map(|i| ((q[i].clone(), d[i].clone()), s[i]))
        .collect()
}

/// Reruns the directory's run with `extra` appended to the config and `index` among the
/// stages.
fn rerun_with(dir: &Path, extra: &str) -> std::process::Output {
    let cfg = std::fs::read_to_string(dir.join("c.toml")).unwrap();
    write(&dir.join("c.toml"), format!("{cfg}{extra}"));
    write(
        &dir.join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"index\", \
         \"query\", \"score\"]\nrun_dir = \"run\"\n",
    );
    cli(dir, &["-q", "run", "p.toml", "--allow-config-change"], &[])
}

fn summary(run: &Path) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    m["stages"]["score"]["summary"]["candidates"].clone()
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn every_document_a_candidate_gives_the_full_runs_scores_for_every_method() {
    for method in ["gradient_dot", "influence", "source"] {
        let dir = setup(method, "");
        run(dir.path());
        let full = scores(&dir.path().join("run"));
        let o = rerun_with(dir.path(), "[attribution.candidates]\nper_query = 24\n");
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let got = scores(&dir.path().join("run"));
        assert_eq!(
            got.len(),
            full.len(),
            "{method}: every (query, document) row"
        );
        for (k, v) in &full {
            assert_close(got[k], *v, &format!("{method} {k:?}"));
        }
        let s = summary(&dir.path().join("run"));
        assert_eq!(s["scored_documents"], 24, "{method}: {s}");
    }
}

/// Two small layers (k_proj: 32 × 64 each, 4096 coordinates) and D = 8192: the row's exact
/// half holds every coordinate, so ŝ = Σ ⟨W⁻¹ rot u, W rot g⟩ = ⟨u, g⟩, and one candidate at
/// each end of each query is its exact top and bottom document.
#[test]
fn with_every_coordinate_exact_the_candidates_are_the_true_ends() {
    for method in ["influence", "source"] {
        let layers = "layers = [\"model.layers.0.self_attn.k_proj\", \
                      \"model.layers.1.self_attn.k_proj\"]\n";
        let dir = setup(method, layers);
        run(dir.path());
        let full = scores(&dir.path().join("run"));
        let o = rerun_with(
            dir.path(),
            "[attribution.candidates]\nper_query = 1\ndims = 8192\n",
        );
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let got = scores(&dir.path().join("run"));
        // The candidates are scored exactly: their rows are the full run's.
        for (k, v) in &got {
            assert_close(*v, full[k], &format!("{method} {k:?}"));
        }
        let mut want = BTreeSet::new();
        for q in ["q0", "q1"] {
            let mut row: Vec<(&String, f64)> = full
                .iter()
                .filter(|((qq, _), _)| qq == q)
                .map(|((_, d), s)| (d, *s))
                .collect();
            row.sort_by(|a, b| b.1.total_cmp(&a.1));
            want.insert(row[0].0.clone());
            want.insert(row[row.len() - 1].0.clone());
        }
        let scored: BTreeSet<String> = got.keys().map(|(_, d)| d.clone()).collect();
        assert_eq!(
            scored, want,
            "{method}: candidates are each query's true ends"
        );
        assert!(want.contains("twin"), "q0's copy is its top document");
    }
}

#[test]
fn a_missing_or_stale_index_is_refused_with_advice() {
    let dir = setup("influence", "");
    run(dir.path());
    // Candidates asked for, but the pipeline has no index stage.
    let cfg = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    write(
        &dir.path().join("c.toml"),
        format!("{cfg}[attribution.candidates]\nper_query = 2\n"),
    );
    let o = cli(
        dir.path(),
        &["-q", "run", "p.toml", "--allow-config-change"],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("index") && e.contains("stages"), "{e}");

    // An index built with other dims: `score` alone refuses it and says to rerun `index`.
    let o = rerun_with(dir.path(), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    write(
        &dir.path().join("c.toml"),
        cfg.replace("per_query = 2\n", "per_query = 2\ndims = 1024\n"),
    );
    let o = cli(
        dir.path(),
        &[
            "-q",
            "score",
            "--config",
            "c.toml",
            "--run-dir",
            "run",
            "--allow-config-change",
        ],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("dims") && e.contains("rerun the index stage"),
        "{e}"
    );
}
