//! The `[attribution]` options through the CLI: the low-rank query form
//! (`attribution.query_rank`), factors loaded per layer group under a memory limit
//! (`attribution.memory_limit_gib`), and the factor cache shared between runs
//! (`attribution.factor_cache`).

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use source_tda::output::parquet::read_batches;

use crate::common::{cli, stderr, write};

/// (query, doc) → score, and (query, doc, token) → token score.
type Scores = (
    HashMap<(String, String), f64>,
    HashMap<(String, String, usize), f32>,
);

fn read_scores(run: &Path) -> Scores {
    let open = |name: &str| read_batches(&run.join("score").join(name)).unwrap();
    let strs = |b: &arrow_array::RecordBatch, c: &str| -> Vec<String> {
        b.column_by_name(c)
            .unwrap()
            .as_string::<i32>()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect()
    };
    let mut docs = HashMap::new();
    for b in open("query_set=default/shard=0/part-00000.parquet") {
        let (q, d) = (strs(&b, "query_id"), strs(&b, "train_id"));
        let s = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..q.len() {
            docs.insert((q[i].clone(), d[i].clone()), s.value(i));
        }
    }
    let mut tokens = HashMap::new();
    for b in open("token_scores.parquet") {
        let (q, d) = (strs(&b, "query_id"), strs(&b, "train_id"));
        let t = b
            .column_by_name("token_index")
            .unwrap()
            .as_primitive::<arrow_array::types::UInt32Type>();
        let s = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float32Type>();
        for i in 0..q.len() {
            tokens.insert(
                (q[i].clone(), d[i].clone(), t.value(i) as usize),
                s.value(i),
            );
        }
    }
    (docs, tokens)
}

fn manifest(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap()
}

/// Reruns only `score` in `run` with `extra` keys added to `[attribution]` of its first
/// run's config (saved as `base.toml`).
fn rescore(dir: &Path, run: &Path, extra: &str) -> std::process::Output {
    let base = dir.join("base.toml");
    if !base.exists() {
        std::fs::copy(run.join("config.toml"), &base).unwrap();
    }
    let cfg = std::fs::read_to_string(&base).unwrap();
    assert!(cfg.contains("[attribution]\n"));
    let cfg = cfg.replacen("[attribution]\n", &format!("[attribution]\n{extra}\n"), 1);
    let path = dir.join("rescore.toml");
    write(&path, cfg);
    cli(
        dir,
        &[
            "-q",
            "score",
            "--config",
            path.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--allow-config-change",
        ],
        &[],
    )
}

/// Relative errors (max over documents, max over tokens) of `b` against `a`, each scaled by
/// the largest magnitude of its table.
fn rel_errors(a: &Scores, b: &Scores) -> (f64, f64) {
    let ds = a.0.values().fold(0f64, |m, v| m.max(v.abs()));
    let ts = a.1.values().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert_eq!(a.0.len(), b.0.len());
    let d =
        a.0.iter()
            .map(|(k, v)| (v - b.0[k]).abs() / ds)
            .fold(0f64, f64::max);
    let mut t = 0f64;
    for (k, v) in &a.1 {
        if let Some(w) = b.1.get(k) {
            t = t.max((v - w).abs() as f64 / ts);
        }
    }
    (d, t)
}

#[test]
fn demo_low_rank_queries_and_grouped_factors_match_the_exact_all_at_once_path() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = common::repo_root();
    let pipeline = common::demo_eval_pipeline(dir.path());
    let o = cli(
        &root,
        &[
            "-q",
            "run",
            pipeline.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let exact = read_scores(&run);
    let mem = manifest(&run)["stages"]["score"]["summary"]["memory"].clone();
    let layer_bytes: Vec<u64> = serde_json::from_value(mem["layer_factor_bytes"].clone()).unwrap();
    let fixed = mem["model_pass_bytes"].as_u64().unwrap() + mem["query_bytes"].as_u64().unwrap();
    let max_layer = *layer_bytes.iter().max().unwrap();
    assert!(layer_bytes.iter().sum::<u64>() > 5 * max_layer);
    let gib = |b: f64| b / (1u64 << 30) as f64;

    // Factors in groups of about 2.5 layers: the same scores, bit for bit.
    let limit = gib(fixed as f64 + 2.5 * max_layer as f64);
    let o = rescore(dir.path(), &run, &format!("memory_limit_gib = {limit}"));
    assert!(o.status.success(), "{}", stderr(&o));
    let groups = manifest(&run)["stages"]["score"]["summary"]["memory"]["groups"].clone();
    let n_groups = groups.as_array().unwrap().len();
    assert!(n_groups > 2, "{groups}");
    let grouped = read_scores(&run);
    assert_eq!(grouped.0, exact.0, "grouped document scores differ");
    assert_eq!(grouped.1, exact.1, "grouped token scores differ");

    // A limit that leaves less than the widest layer's factors: refused, naming both.
    let limit = gib(fixed as f64 + 0.5 * max_layer as f64);
    let o = rescore(dir.path(), &run, &format!("memory_limit_gib = {limit}"));
    assert_eq!(o.status.code(), Some(5), "a resource limit exits 5");
    let e = stderr(&o);
    assert!(e.contains("the factors of layer `model.layers."), "{e}");
    assert!(
        e.contains(&format!("attribution.memory_limit_gib = {limit}")),
        "{e}"
    );

    // Full rank equals the exact path; lower ranks approach it as the rank grows.
    let o = rescore(dir.path(), &run, "query_rank = 100000");
    assert!(o.status.success(), "{}", stderr(&o));
    let (d, t) = rel_errors(&exact, &read_scores(&run));
    assert!(
        d <= 1e-5 && t <= 1e-5,
        "full rank: documents {d}, tokens {t}"
    );
    let mut last = f64::INFINITY;
    for r in [1, 4, 16] {
        let o = rescore(dir.path(), &run, &format!("query_rank = {r}"));
        assert!(o.status.success(), "{}", stderr(&o));
        let kept = manifest(&run)["stages"]["score"]["summary"]["query_rank_kept_energy"]
            .as_f64()
            .unwrap();
        let (d, _) = rel_errors(&exact, &read_scores(&run));
        eprintln!("query_rank {r}: max relative document error {d:.3e}, kept ‖u‖² {kept:.4}");
        assert!(d < last, "rank {r}: {d} ≥ {last}");
        last = d;
    }

    // `[run] device = "cuda"` in a build without CUDA support (or on a machine without a
    // GPU): the score stage stops before scoring and says which, and how to fix it.
    let base = std::fs::read_to_string(dir.path().join("base.toml")).unwrap();
    let cfg = if base.contains("[run]\n") {
        base.replacen("[run]\n", "[run]\ndevice = \"cuda\"\n", 1)
    } else {
        format!("[run]\ndevice = \"cuda\"\n{base}")
    };
    let path = dir.path().join("cuda.toml");
    write(&path, cfg);
    let o = cli(
        dir.path(),
        &[
            "-q",
            "score",
            "--config",
            path.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--allow-config-change",
        ],
        &[],
    );
    let e = stderr(&o);
    if cfg!(any(feature = "cuda", feature = "cuda-kernels")) {
        assert!(
            o.status.success() || e.contains("no CUDA GPU") || e.contains("NVRTC"),
            "{e}"
        );
    } else {
        assert!(!o.status.success(), "device = cuda ran in a CPU-only build");
        assert!(e.contains("built without CUDA support"), "{e}");
        assert!(
            e.contains("scripts/gpu/build-cuda.sh") && e.contains("device = \"cpu\""),
            "{e}"
        );
    }
}

fn demo_model_dir() -> PathBuf {
    common::demo_tokenizer().parent().unwrap().to_path_buf()
}

/// A small project: 16 documents, 2 queries, SGD, a factor cache next to the config.
fn cache_project(dir: &Path, fisher: &str) {
    let mut docs = String::new();
    for i in 0..16 {
        docs += &format!(
            "{{\"id\": \"d{i:02}\", \"text\": \"The town of Velm{i} trades amber for salt.\"}}\n"
        );
    }
    write(&dir.join("train.jsonl"), docs);
    write(
        &dir.join("queries.jsonl"),
        "{\"id\": \"q0\", \"prompt\": \"The town of Velm3 trades\", \"completion\": \" amber.\"}\n",
    );
    write(
        &dir.join("c.toml"),
        format!(
            "[model]\nid = \"{}\"\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 32\n\
             [data.query]\nid = \"./queries.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 32\n\
             [train]\noptimizer = \"sgd\"\nlr = 0.05\nbatch_size = 8\nepochs = 1\nsegments = 2\ncheckpoints_per_segment = 1\n\
             [attribution]\nfisher = \"{fisher}\"\nfactor_cache = \"factor-cache\"\n",
            demo_model_dir().display()
        ),
    );
    write(
        &dir.join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\"]\n",
    );
}

fn run_into(dir: &Path, run: &str) -> serde_json::Value {
    let o = cli(dir, &["-q", "run", "p.toml", "--run-dir", run], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    manifest(&dir.join(run))["stages"]["fit"]["summary"]["segments"].clone()
}

#[test]
fn a_second_run_reuses_cached_factors_and_a_changed_setting_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cache_project(dir, "true");
    let first = run_into(dir, "run1");
    let segs = first.as_array().unwrap();
    assert_eq!(segs.len(), 2);
    assert!(segs.iter().all(|s| s["reused"] == false), "{first}");
    let keys: Vec<String> = segs
        .iter()
        .map(|s| s["cache_key"].as_str().unwrap().into())
        .collect();
    assert_ne!(keys[0], keys[1], "different checkpoints, different keys");
    for k in &keys {
        assert!(dir.join("factor-cache").join(k).join("entry.json").exists());
    }

    // To tell a copy from a recomputation, plant segment 1's factors under segment 0's key
    // (with a matching hash): a reusing fit must hand exactly those bytes back.
    let e0 = dir.join("factor-cache").join(&keys[0]);
    let planted = std::fs::read(
        dir.join("factor-cache")
            .join(&keys[1])
            .join("factors.safetensors"),
    )
    .unwrap();
    std::fs::write(e0.join("factors.safetensors"), &planted).unwrap();
    let mut entry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(e0.join("entry.json")).unwrap()).unwrap();
    entry["sha256"] = source_tda::util::hash::sha256_bytes(&planted).into();
    entry["size"] = (planted.len() as u64).into();
    std::fs::write(e0.join("entry.json"), entry.to_string()).unwrap();

    let second = run_into(dir, "run2");
    let segs2 = second.as_array().unwrap();
    assert!(segs2.iter().all(|s| s["reused"] == true), "{second}");
    assert_eq!(
        std::fs::read(dir.join("run2/fit/segment-0.safetensors")).unwrap(),
        planted
    );
    assert_eq!(
        std::fs::read(dir.join("run2/fit/segment-1.safetensors")).unwrap(),
        std::fs::read(dir.join("run1/fit/segment-1.safetensors")).unwrap()
    );

    // A corrupt entry (one flipped byte) is detected, refitted and stored again.
    let mut bad = planted.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    std::fs::write(e0.join("factors.safetensors"), &bad).unwrap();
    let third = run_into(dir, "run3");
    assert_eq!(third[0]["reused"], false, "{third}");
    assert_eq!(third[1]["reused"], true, "{third}");
    assert_eq!(
        std::fs::read(dir.join("run3/fit/segment-0.safetensors")).unwrap(),
        std::fs::read(dir.join("run1/fit/segment-0.safetensors")).unwrap(),
        "the refit reproduces the first run's factors"
    );
    assert_eq!(
        std::fs::read(e0.join("factors.safetensors")).unwrap(),
        std::fs::read(dir.join("run1/fit/segment-0.safetensors")).unwrap()
    );

    // Another Fisher: other keys, a fresh fit.
    let cfg = std::fs::read_to_string(dir.join("c.toml"))
        .unwrap()
        .replace("fisher = \"true\"", "fisher = \"empirical\"");
    write(&dir.join("c.toml"), cfg);
    let fourth = run_into(dir, "run4");
    for (s, k) in fourth.as_array().unwrap().iter().zip(&keys) {
        assert_eq!(s["reused"], false, "{fourth}");
        assert_ne!(s["cache_key"].as_str().unwrap(), k);
    }

    // f32 eigendecompositions: other keys again, and bases that agree with the f64 fit's.
    let cfg = std::fs::read_to_string(dir.join("c.toml"))
        .unwrap()
        .replace(
            "[attribution]\n",
            "[attribution]\neigendecomposition = \"f32\"\n",
        );
    write(&dir.join("c.toml"), cfg);
    let fifth = run_into(dir, "run5");
    for (s, f) in fifth
        .as_array()
        .unwrap()
        .iter()
        .zip(fourth.as_array().unwrap())
    {
        assert_eq!(s["reused"], false, "{fifth}");
        assert_ne!(s["cache_key"], f["cache_key"]);
    }
    let lambda = |run: &str| -> Vec<f64> {
        let f = source_tda::curvature::load_factors(
            &dir.join(run).join("fit/segment-1.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .0;
        f.iter()
            .flat_map(|l| l.lambda.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    };
    // Λ is the data's second moment in the basis: a basis off by f32 rounding moves it little.
    let (a, b) = (lambda("run4"), lambda("run5"));
    let top = a.iter().cloned().fold(0.0, f64::max);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-3 * top,
        "Λ f64 vs f32 bases: {worst:e} of {top:e}"
    );
}

/// Reruns `fit`, `query` and `score` in `run` with the influence function and `extra` added
/// to `[attribution]` of the config saved as `base.toml` by the first call.
fn refit(dir: &Path, run: &Path, extra: &str) -> std::process::Output {
    let base = dir.join("base.toml");
    if !base.exists() {
        std::fs::copy(run.join("config.toml"), &base).unwrap();
    }
    let cfg = std::fs::read_to_string(&base).unwrap();
    // The influence function: one segment at the final model.
    let cfg = cfg.replacen("method = \"source\"\n", "method = \"influence\"\n", 1);
    let cfg = cfg.replacen("[attribution]\n", &format!("[attribution]\n{extra}\n"), 1);
    let path = dir.join("refit.toml");
    write(&path, cfg);
    let mut last = None;
    for stage in ["fit", "query", "score"] {
        let args = [
            "-q",
            stage,
            "--config",
            path.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--allow-config-change",
        ];
        let o = cli(dir, &args, &[]);
        if !o.status.success() {
            return o;
        }
        last = Some(o);
    }
    last.unwrap()
}

/// Layer names stored in a factor file (`LAYER.lambda` keys).
fn factor_layers(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = (st.names().iter())
        .filter_map(|n| n.strip_suffix(".lambda").map(str::to_string))
        .collect();
    names.sort();
    names
}

#[test]
fn attribution_layers_select_the_tracked_layers_and_the_influence_scores_add_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = common::repo_root();
    let pipeline = common::demo_eval_pipeline(dir.path());
    let args = [
        "-q",
        "run",
        pipeline.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let o = cli(&root, &[&args[..], &["--until", "finetune"]].concat(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The influence function is block-diagonal over layers (EK-FAC per layer, damping per
    // layer), so its scores over every layer are the sum of its scores over a partition.
    let o = refit(dir.path(), &run, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let all = read_scores(&run);
    let seg = run.join("fit/segment-0.safetensors");
    let all_layers = factor_layers(&seg);
    assert_eq!(all_layers.len(), 28, "{all_layers:?}");

    let mut parts = Vec::new();
    for pattern in ["*.mlp.*", "*.self_attn.*"] {
        let o = refit(dir.path(), &run, &format!("layers = [\"{pattern}\"]"));
        assert!(o.status.success(), "{}", stderr(&o));
        let kept = factor_layers(&seg);
        let word = pattern.trim_matches(|c| c == '*' || c == '.');
        assert!(
            !kept.is_empty() && kept.iter().all(|l| l.contains(word)),
            "{kept:?}"
        );
        parts.push((kept, read_scores(&run)));
    }
    let mut union: Vec<String> = parts.iter().flat_map(|p| p.0.clone()).collect();
    union.sort();
    assert_eq!(
        union, all_layers,
        "the two patterns partition the block layers"
    );
    let scale = all.0.values().fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = 0f64;
    for (k, v) in &all.0 {
        let sum = parts[0].1 .0[k] + parts[1].1 .0[k];
        worst = worst.max((v - sum).abs() / scale);
    }
    assert!(
        worst < 1e-5,
        "max relative |all − (mlp + attention)| = {worst:.2e}"
    );
    // Both parts matter (neither is zero).
    for (_, s) in &parts {
        assert!(s.0.values().any(|v| v.abs() > 1e-3 * scale));
    }

    // A pattern that matches no layer is refused, naming it and showing real names.
    let o = refit(dir.path(), &run, "layers = [\"*.mlpx.*\"]");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("`*.mlpx.*` matches no linear layer") && e.contains("model.layers.0"),
        "{e}"
    );
    // An empty list is a config error naming the key.
    let o = refit(dir.path(), &run, "layers = []");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("attribution.layers"), "{}", stderr(&o));
}
