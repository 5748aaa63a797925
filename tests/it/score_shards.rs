//! Sharded `score` (docs/design.md §11) through the CLI on the demo's small Llama: one shard
//! and three shards, merged, write bit for bit the unsharded stage's scores dataset (scores,
//! τ, ranks, segment columns), `token_scores.parquet` and `train_docs.parquet`, with and
//! without `keep_top_bottom`; the merged run directory is a complete `score` to the pipeline;
//! a merge is idempotent and refuses missing, duplicated, mixed and changed shards, naming
//! the command to rerun.

use std::path::Path;
use std::process::Command;

use source_tda::report::table::Table;

use crate::common::{cli, stderr, write};
use crate::resume::ok;
use crate::score_output::bit_rows;

/// A run folder `run/` through `query`: 24 documents, Source over 2 segments, batches of at
/// most 3 documents (8 per pass, so every shard of 3 has work); `extra` goes into
/// `[attribution]`.
fn queried(extra: &str) -> tempfile::TempDir {
    let dir = crate::stages_attribution::setup("source", extra);
    let c = dir.path().join("c.toml");
    let cfg = std::fs::read_to_string(&c).unwrap();
    write(&c, format!("{cfg}\n[batching]\nmax_batch_size = 3\n"));
    ok(&cli(
        dir.path(),
        &["-q", "run", "p.toml", "--until", "query"],
        &[],
    ));
    dir
}

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

/// The scores dataset, token scores and documents of a run, row by row, bit for bit.
fn tables(run: &Path) -> Vec<Vec<Vec<String>>> {
    vec![
        bit_rows(&Table::read_parts(&run.join("score/query_set=default")).unwrap()),
        bit_rows(&Table::read(&run.join("score/token_scores.parquet")).unwrap()),
        bit_rows(&Table::read(&run.join("score/train_docs.parquet")).unwrap()),
    ]
}

/// `score --shard i/n` for every i, then `merge score`, in run directory `run`; checks that
/// the stage merged them (rather than scoring everything again).
fn sharded(dir: &Path, run: &str, n: usize) {
    for i in 1..=n {
        let s = format!("{i}/{n}");
        run_cli(dir, &["-q", "score", "--shard", &s, "--run-dir", run]);
    }
    run_cli(dir, &["-q", "merge", "score", "--run-dir", run]);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(run).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let score = &m["stages"]["score"];
    assert_eq!(score["status"], "complete");
    assert_eq!(
        score["summary"]["merged_shards"],
        serde_json::json!(n),
        "{score}"
    );
}

#[test]
fn sharded_score_merges_to_the_unsharded_tables_bit_for_bit() {
    // top_k = 3 (setup) leads beyond K = 2: a shard keeps max(K, top_k) at both ends.
    for extra in ["", "keep_top_bottom = 2\n"] {
        let dir = queried(extra);
        let d = dir.path();
        copy_dir(&d.join("run"), &d.join("one"));
        copy_dir(&d.join("run"), &d.join("three"));
        run_cli(d, &["-q", "score", "--run-dir", "run"]);
        let want = tables(&d.join("run"));
        assert!(want[0].len() >= 2 * 4 && !want[1].is_empty(), "{extra}");
        sharded(d, "one", 1);
        assert_eq!(tables(&d.join("one")), want, "one shard, {extra:?}");
        sharded(d, "three", 3);
        assert_eq!(tables(&d.join("three")), want, "three shards, {extra:?}");
        assert!(!d.join("three/shards").exists(), "the shards are removed");

        // Idempotent; and the pipeline sees a complete, current `score`.
        let e = run_cli(d, &["merge", "score", "--run-dir", "three"]);
        assert!(e.contains("nothing to merge"), "{e}");
        assert_eq!(tables(&d.join("three")), want);
        let manifest = || std::fs::read_to_string(d.join("three/manifest.json")).unwrap();
        let before = manifest();
        run_cli(
            d,
            &[
                "-q",
                "run",
                "p.toml",
                "--run-dir",
                "three",
                "--until",
                "score",
            ],
        );
        assert_eq!(manifest(), before, "score is not run again");
        let e = run_cli(d, &["score", "--shard", "2/3", "--run-dir", "three"]);
        assert!(e.contains("nothing to do"), "{e}");
    }
}

#[test]
fn a_score_merge_refuses_missing_duplicated_mixed_and_changed_shards() {
    let dir = queried("");
    let d = dir.path();
    let shards = d.join("run/shards/score");
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(
        e.contains("no score shard") && e.contains("score --shard I/N"),
        "{e}"
    );

    run_cli(d, &["-q", "score", "--shard", "1/3", "--run-dir", "run"]);
    run_cli(d, &["-q", "score", "--shard", "3/3", "--run-dir", "run"]);
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(
        e.contains("missing score shard(s) 2/3") && e.contains("score --shard 2/3"),
        "{e}"
    );
    run_cli(d, &["-q", "score", "--shard", "2/3", "--run-dir", "run"]);

    // A copy of a record under another name.
    let rec = shards.join("shard-1-of-3.json");
    std::fs::copy(&rec, shards.join("shard-1-of-3-copy.json")).unwrap();
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(e.contains("duplicate"), "{e}");
    std::fs::remove_file(shards.join("shard-1-of-3-copy.json")).unwrap();

    // Another count beside the set.
    run_cli(d, &["-q", "score", "--shard", "1/2", "--run-dir", "run"]);
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(e.contains("different counts"), "{e}");
    std::fs::remove_file(shards.join("shard-1-of-2.json")).unwrap();
    std::fs::remove_dir_all(shards.join("shard-1-of-2")).unwrap();

    // A file changed after its record.
    let docs = shards.join("shard-2-of-3/train_docs.parquet");
    let mut bytes = std::fs::read(&docs).unwrap();
    bytes.push(0);
    std::fs::write(&docs, bytes).unwrap();
    let e = fails(d, &["merge", "score", "--run-dir", "run"]);
    assert!(
        e.contains("changed on disk") && e.contains("score --shard 2/3"),
        "{e}"
    );
    run_cli(d, &["-q", "score", "--shard", "2/3", "--run-dir", "run"]);

    // A shard of another config, and one of another tool version.
    let text = std::fs::read_to_string(&rec).unwrap();
    for (field, value, says) in [
        ("key", "0123456789abcdef", "another config"),
        (
            "tool_version",
            "0.0.0-other",
            "made by source-tda 0.0.0-other",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[field] = serde_json::json!(value);
        std::fs::write(&rec, v.to_string()).unwrap();
        let e = fails(d, &["merge", "score", "--run-dir", "run"]);
        assert!(
            e.contains(says) && e.contains("score --shard 1/3"),
            "{field}: {e}"
        );
    }
    std::fs::write(&rec, text).unwrap();
    let e = run_cli(d, &["merge", "score", "--run-dir", "run"]);
    assert!(e.contains("3 shards merged"), "{e}");
}
