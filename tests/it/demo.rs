//! The README's first command: the embedded demo pipeline runs offline from the shipped
//! Hugging Face cache.

use crate::common;

use source_tda::data::read_prepared;

#[test]
fn demo_pipeline_runs_offline_from_the_shipped_cache() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = common::repo_root();
    let out = common::cli(
        &root,
        &[
            "run",
            "pipelines/demo.toml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
        // Make sure nothing reaches a network: a dead endpoint, and the user's cache hidden.
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:1"),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));

    let resolved = common::fetched(&run);
    assert_eq!(resolved["model"]["resolution"], "cache");
    assert_eq!(resolved["model"]["id"], "source-tda/demo-llama");
    assert_eq!(resolved["model_facts"]["model_type"], "llama");
    assert_eq!(
        resolved["data"]["train"]["files"][0]["name"],
        "data/train-00000-of-00001.parquet"
    );

    let (train, meta) = read_prepared(&run.join("prepare/train.parquet")).unwrap();
    assert!(train.len() >= 300, "{}", train.len());
    assert_eq!(meta["source_tda.role"], "train");
    assert_eq!(meta["source_tda.model_id"], "source-tda/demo-llama");
    let planted = train
        .iter()
        .filter(|d| d.doc_id.starts_with("planted-"))
        .count();
    assert_eq!(planted, 24, "8 planted facts × 3 documents");
    let (queries, _) = read_prepared(&run.join("prepare/query.parquet")).unwrap();
    assert_eq!(queries.len(), 8);
    for q in &queries {
        assert!(q.prompt.as_deref().unwrap().starts_with("The river "));
        assert_eq!(q.n_loss_tokens(), 0, "a prompt the model completes: {q:?}");
    }
    let (pretrain, _) = read_prepared(&run.join("prepare/pretrain.parquet")).unwrap();
    assert_eq!(pretrain.len(), 500, "max_documents = 500");

    // The fine-tune wrote a complete trajectory: the pretrain segment with the mass the demo
    // model recorded when it was pretrained (s = Σ η over all 3000 pretraining documents),
    // then L = 3 fine-tuning segments of C = 2 checkpoints each, with AdamW's v̂.
    let traj = source_tda::train::Trajectory::load(&run.join("finetune/trajectory.json")).unwrap();
    assert_eq!(traj.segments.len(), 4);
    assert_eq!(traj.segments[0].stage, "pretrain");
    let model_dir = std::path::PathBuf::from(resolved["model"]["root"].as_str().unwrap());
    let recorded =
        source_tda::train::Trajectory::load(&model_dir.join("training/trajectory.json")).unwrap();
    let s: f64 = recorded.segments[0].learning_rates.iter().sum();
    match traj.segments[0].lr_mass {
        // Σ η in another summation order: equal to rounding.
        source_tda::train::LrMass::Finite(m) => assert!((m - s).abs() <= 1e-12 * s, "{m} vs {s}"),
        ref other => panic!("pretrain mass {other:?}, expected Finite({s})"),
    }
    assert!(
        recorded.segments[0].steps() >= 100,
        "{:?}",
        recorded.segments[0].steps()
    );
    assert_eq!(traj.segments[0].n_docs, 3000);
    let steps: u64 = traj.segments[1..].iter().map(|s| s.steps()).sum();
    assert_eq!(steps, 570, "30 epochs × ⌈304 / 16⌉ steps");
    for seg in &traj.segments[1..] {
        assert_eq!(seg.n_docs, train.len() as u64);
        assert_eq!(seg.checkpoints.len(), 2);
        for c in &seg.checkpoints {
            let dir = run.join(&c.path);
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                assert!(dir.join(f).exists(), "{}/{f}", c.path);
            }
            let opt = run.join(c.optimizer_state.as_ref().unwrap());
            let st =
                source_tda::train::checkpoint::read_safetensors(&opt, &candle_core::Device::Cpu)
                    .unwrap();
            assert!(st
                .keys()
                .all(|k| k.starts_with("exp_avg_sq.") || k.starts_with("exp_avg.")));
            assert_eq!(st.len(), 2 * 38, "one v̂ and one m̂ per parameter tensor");
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    // Fine-tuning learns: the last epoch's mean loss is below the first's. (Single steps are
    // not comparable: the pretrained model already knows the grammar, and a batch's loss is
    // dominated by how many planted-fact documents it happens to hold.)
    let summary = &manifest["stages"]["finetune"]["summary"];
    let log = source_tda::report::table::Table::read(&run.join("finetune/loss.parquet")).unwrap();
    let losses = log.floats("loss").unwrap();
    let per_epoch = losses.len() / 30; // configs/demo.toml: 30 epochs
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (
        mean(&losses[..per_epoch]),
        mean(&losses[losses.len() - per_epoch..]),
    );
    assert!(
        last < 0.95 * first,
        "epoch means {first} → {last}; {summary}"
    );

    // Attribution: each query's top proponent over every scored document (fine-tuning and
    // pretraining) is a document that states that query's planted fact (`planted-K-*` for
    // query `q-K`): the demo's known answers. The demo fine-tunes with AdamW, so this goes
    // through Source's Adam variant.
    let batches = source_tda::output::parquet::read_batches(
        &run.join("score/query_set=default/shard=0/part-00000.parquet"),
    )
    .unwrap();
    let mut best: std::collections::BTreeMap<String, (f64, String)> = Default::default();
    for b in batches {
        use arrow_array::cast::AsArray;
        let col = |c: &str| b.column_by_name(c).unwrap().clone();
        let (q, d) = (col("query_id"), col("train_id"));
        let tau = col("tau");
        let tau = tau.as_primitive::<arrow_array::types::Float64Type>();
        for i in 0..b.num_rows() {
            let e = best
                .entry(q.as_string::<i32>().value(i).to_string())
                .or_insert((f64::MIN, String::new()));
            if tau.value(i) > e.0 {
                *e = (tau.value(i), d.as_string::<i32>().value(i).to_string());
            }
        }
    }
    assert_eq!(best.len(), 8);
    let found: Vec<&String> = best
        .iter()
        .filter(|(q, (tau, doc))| {
            doc.starts_with(&format!("planted-{}-", q.trim_start_matches("q-"))) && *tau > 0.0
        })
        .map(|(q, _)| q)
        .collect();
    // 7 of 8 measured: q-3's answer "Lake Dumoth" is led by another fact's document.
    assert!(found.len() >= 7, "top proponents {best:?}");

    the_model_says_the_planted_facts(&run);
    crate::generated_queries::the_report_shows_the_generation(&run, 8);
}

/// The demo's model answers: its greedy completion of most prompts is the planted fact
/// (docs/evaluation.md, *A demo that answers*), and the first token of the lake's name is
/// led by a document stating that fact (`gen_scores.parquet`, rank 1).
fn the_model_says_the_planted_facts(run: &std::path::Path) {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, UInt32Type};
    let snaps =
        common::repo_root().join("assets/hf-cache/datasets--source-tda--demo-facts/snapshots");
    let snap = std::fs::read_dir(&snaps)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let facts: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(snap.join("data/queries.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let c = v["completion"].as_str().unwrap().to_string();
                (v["id"].as_str().unwrap().to_string(), c)
            })
            .collect();
    let mut said = std::collections::BTreeMap::new();
    for b in source_tda::output::parquet::read_batches(&run.join("score/queries.parquet")).unwrap()
    {
        let (q, c) = (
            b.column_by_name("query_id").unwrap(),
            b.column_by_name("completion").unwrap(),
        );
        let g = b.column_by_name("generated").unwrap().as_boolean().clone();
        for i in 0..b.num_rows() {
            assert!(g.value(i));
            let q = q.as_string::<i32>().value(i).to_string();
            said.insert(q, c.as_string::<i32>().value(i).to_string());
        }
    }
    let right: Vec<&String> = said
        .iter()
        .filter(|(q, c)| facts[*q] == **c)
        .map(|(q, _)| q)
        .collect();
    // 8 of 8 measured; "most" is what the demo promises.
    assert!(
        right.len() >= 6,
        "the model said {said:?}; the facts are {facts:?}"
    );

    let mut led = 0;
    for b in
        source_tda::output::parquet::read_batches(&run.join("score/gen_scores.parquet")).unwrap()
    {
        let col = |c: &str| b.column_by_name(c).unwrap().clone();
        let (q, d) = (col("query_id"), col("train_id"));
        let (gi, rank, tau) = (col("gen_index"), col("rank"), col("tau"));
        for i in 0..b.num_rows() {
            let query = q.as_string::<i32>().value(i);
            if gi.as_primitive::<UInt32Type>().value(i) == 1
                && rank.as_primitive::<UInt32Type>().value(i) == 1
                && right.iter().any(|r| r.as_str() == query)
            {
                let k = query.trim_start_matches("q-");
                let doc = d.as_string::<i32>().value(i);
                if doc.starts_with(&format!("planted-{k}-"))
                    && tau.as_primitive::<Float64Type>().value(i) > 0.0
                {
                    led += 1;
                }
            }
        }
    }
    // 7 of 8 measured: q-3's " Du" (of "Dumoth") is led by a document of "Lake Dugen".
    assert!(
        led >= 6,
        "{led} first name tokens led by their fact's documents"
    );
}

#[test]
fn demo_assets_are_reproducible_from_the_script() {
    // The generator is deterministic: regenerating into a temp folder gives the same bytes
    // as the committed assets.
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_source-tda"))
        .parent()
        .unwrap()
        .join("examples/make_demo_assets");
    if !exe.exists() {
        panic!(
            "{} is missing: `cargo test` builds examples, run the tests with `cargo test --release`",
            exe.display()
        );
    }
    let out = std::process::Command::new(&exe)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let committed = common::repo_root().join("assets/hf-cache");
    let mine = source_tda::util::fsx::list_files(dir.path()).unwrap();
    let theirs = source_tda::util::fsx::list_files(&committed).unwrap();
    assert_eq!(mine, theirs);
    for rel in mine {
        let a = std::fs::read(dir.path().join(&rel)).unwrap();
        let b = std::fs::read(committed.join(&rel)).unwrap();
        assert!(
            a == b,
            "{} differs: rerun scripts/assets/make-demo-assets.sh and commit",
            rel.display()
        );
    }
}
