//! A PEFT adapter named by `[model] adapter`, fetched from a hub repo (through a hand-made
//! Hugging Face cache, offline, and through the loopback hub's HTTP API, which is the code path
//! of a real download) and attributed as the fine-tuned model.
//!
//! The committed PEFT fixture (tests/data/peft-lora-tiny: a tiny random Llama and an adapter
//! made by the `peft` package) is laid out as two hub repos, `org/tiny-llama` (the base, with
//! a small word-level tokenizer) and `org/tiny-lora` (adapter-a). The pipeline's scored model
//! must be that adapter (its logits are PEFT's own, to 1e-5); the run must equal, file for
//! file, the run that names the same adapter as a local folder; the adapter's checksums are
//! recorded like the model's. Misses (a missing file, offline without the cache, another
//! base) are refused naming the repo and the file or the fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use source_tda::config::SourceKind;
use source_tda::hub::{resolve_adapter, HubSettings, RepoKind, RepoRequest, Resolution};
use source_tda::model::{LoadOptions, Model, TokenBatch};

use crate::common::mock_hub::{MockHub, MockRepo};
use crate::common::model_fixtures::{doc_refs, max_abs, max_abs_diff};
use crate::common::{cli, hand_made_repo, repo_root, stderr, write};

const BASE_COMMIT: &str = "1111111111111111111111111111111111111111";
const ADAPTER_COMMIT: &str = "2222222222222222222222222222222222222222";

fn fixture() -> PathBuf {
    repo_root().join("tests/data/peft-lora-tiny")
}

/// A word-level tokenizer.json over 17 words (the fixture's vocabulary has 40 ids).
fn tokenizer_json() -> Vec<u8> {
    let words = [
        "<unk>", "the", "cat", "dog", "sat", "ran", "on", "mat", "rug", "a", "red", "blue", "big",
        "small", "and", "is", ".",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }))
    .unwrap()
}

fn base_files() -> Vec<(&'static str, Vec<u8>)> {
    let b = fixture().join("base");
    let read = |n: &str| std::fs::read(b.join(n)).unwrap();
    vec![
        ("config.json", read("config.json")),
        ("generation_config.json", read("generation_config.json")),
        ("model.safetensors", read("model.safetensors")),
        ("tokenizer.json", tokenizer_json()),
    ]
}

/// adapter-a's two files, its config naming `base` as the base model.
fn adapter_files(base: &str) -> Vec<(&'static str, Vec<u8>)> {
    let a = fixture().join("adapter-a");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("adapter_config.json")).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = base.into();
    vec![
        (
            "adapter_config.json",
            serde_json::to_vec_pretty(&cfg).unwrap(),
        ),
        (
            "adapter_model.safetensors",
            std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        ),
    ]
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A project in `dir`: the hub cache `cache/` with both repos, local data, `c.toml` naming
/// the adapter by `adapter` (a TOML inline table) and `p.toml` with the attribution stages.
fn project(dir: &Path, adapter: &str) {
    hand_made_repo(
        &dir.join("cache"),
        "model",
        "org/tiny-llama",
        "main",
        BASE_COMMIT,
        &base_files(),
    );
    hand_made_repo(
        &dir.join("cache"),
        "model",
        "org/tiny-lora",
        "main",
        ADAPTER_COMMIT,
        &adapter_files("org/tiny-llama"),
    );
    let texts = [
        "the cat sat on the mat .",
        "a big dog ran on the rug .",
        "the small cat is red .",
        "a blue dog sat on a red mat .",
        "the dog and the cat ran .",
        "a small red rug is on the mat .",
    ];
    let train: String = texts
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{\"id\": \"d{i}\", \"text\": \"{t}\"}}\n"))
        .collect();
    write(&dir.join("train.jsonl"), train);
    write(
        &dir.join("query.jsonl"),
        "{\"id\": \"q0\", \"prompt\": \"the cat sat on the\", \"completion\": \" mat .\"}\n\
         {\"id\": \"q1\", \"prompt\": \"a big dog\", \"completion\": \" ran on the rug .\"}\n",
    );
    write(
        &dir.join("c.toml"),
        format!(
            "[hub]\ncache_dir = \"cache\"\noffline = true\n\
             [model]\nid = \"org/tiny-llama\"\nadapter = {adapter}\n\
             [data.train]\nid = \"./train.jsonl\"\nid_column = \"id\"\nmax_length = 16\n\
             [data.query]\nid = \"./query.jsonl\"\nid_column = \"id\"\nshape = \"prompt_completion\"\nmax_length = 16\n\
             [batching]\ntoken_budget = 128\nmax_batch_size = 8\n\
             [attribution]\nmethod = \"influence\"\n"
        ),
    );
    write(
        &dir.join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \
         \"score\"]\n",
    );
}

fn run_pipeline(dir: &Path, run: &str) -> std::process::Output {
    cli(
        dir,
        &["-q", "run", "p.toml", "--run-dir", run],
        &[("HF_ENDPOINT", "http://127.0.0.1:1")],
    )
}

/// Every file under `dir` (relative path → bytes).
fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Whether two safetensors files hold the same tensors, bit for bit.
fn same_tensors(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (
        safetensors::SafeTensors::deserialize(a).unwrap(),
        safetensors::SafeTensors::deserialize(b).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut other = b.names();
    other.sort();
    names == other
        && names.iter().all(|n| {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            x.shape() == y.shape() && x.dtype() == y.dtype() && x.data() == y.data()
        })
}

/// Whether two Parquet files hold the same columns, value for value.
fn same_columns(a: &Path, b: &Path) -> bool {
    let read = |p: &Path| -> Vec<arrow_array::RecordBatch> {
        let f = std::fs::File::open(p).unwrap();
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let (x, y) = (read(a), read(b));
    x.len() == y.len()
        && x.iter().zip(&y).all(|(p, q)| {
            let ok = p.schema().fields() == q.schema().fields() && p.columns() == q.columns();
            if !ok {
                for (f, (c, d)) in p
                    .schema()
                    .fields()
                    .iter()
                    .zip(p.columns().iter().zip(q.columns()))
                {
                    if c != d {
                        eprintln!("{}: column `{}` differs", a.display(), f.name());
                    }
                }
            }
            ok
        })
}

#[test]
fn a_hub_adapter_is_fetched_with_checksums_and_attributed_as_the_fine_tuned_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    project(dir, "{ id = \"org/tiny-lora\", revision = \"main\" }");
    let o = run_pipeline(dir, "hub");
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.join("hub");

    // fetch: resolved from the cache at its commit, every file hashed and recorded.
    let fetched = crate::common::fetched(&run);
    let ad = &fetched["adapter"];
    assert_eq!(ad["repo"]["id"], "org/tiny-lora");
    assert_eq!(ad["repo"]["resolution"], "cache");
    assert_eq!(ad["repo"]["commit"], ADAPTER_COMMIT);
    assert_eq!(ad["facts"]["r"], 4);
    assert_eq!(ad["facts"]["base_model"], "org/tiny-llama");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    let recorded = &manifest["stages"]["fetch"]["summary"]["adapter"]["files"];
    for (name, bytes) in adapter_files("org/tiny-llama") {
        let f = recorded
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} not recorded: {recorded}"));
        assert_eq!(f["sha256"], sha(&bytes), "{name}");
    }

    // finetune: nothing trained; the trajectory's one checkpoint is the adapter over the
    // fetched base, and it is PEFT's model: its logits are peft's own.
    let traj = source_tda::train::Trajectory::load(&run.join("finetune/trajectory.json")).unwrap();
    assert_eq!(traj.segments.len(), 1);
    assert_eq!(traj.segments[0].n_docs, 6);
    let scored = run.join(&traj.final_checkpoint().path);
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<Vec<u32>> = r["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let docs: Vec<(Vec<u32>, Vec<u8>)> = ids
        .into_iter()
        .map(|d| {
            let mut m = vec![1u8; d.len()];
            m[0] = 0;
            (d, m)
        })
        .collect();
    let batch = TokenBatch::new(&doc_refs(&docs), 0, None, &Device::Cpu).unwrap();
    let m = Model::load(&scored, &LoadOptions::default(), &Device::Cpu).unwrap();
    let logits = m.forward(&batch.input_ids).unwrap();
    let err = max_abs_diff(&logits, &r["logits.a"]);
    assert!(err <= 1e-5, "scored model vs peft: {err}");
    assert!(max_abs(&logits) > 0.05);
    // The base the adapter loaded over is the cache's snapshot of org/tiny-llama.
    let base = m.base_dir().unwrap().display().to_string();
    assert!(base.contains("models--org--tiny-llama"), "{base}");

    // fit and query ran over the adapter matrices only (5 modules × 2 layers × A, B).
    let g = candle_core::safetensors::load(run.join("query/gradients.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(g.len(), 20, "{:?}", g.keys());
    assert!(g.keys().all(|k| k.contains(".lora_")), "{:?}", g.keys());

    // The same adapter as a local folder: the same run, file for file, from fit on.
    let local = dir.join("local-adapter");
    for (name, bytes) in adapter_files("org/tiny-llama") {
        write(&local.join(name), bytes);
    }
    let cfg = std::fs::read_to_string(dir.join("c.toml")).unwrap();
    let cfg = cfg.replace(
        "{ id = \"org/tiny-lora\", revision = \"main\" }",
        "{ id = \"./local-adapter\" }",
    );
    write(&dir.join("c.toml"), cfg);
    let o = run_pipeline(dir, "local");
    assert!(o.status.success(), "{}", stderr(&o));
    let lrun = dir.join("local");
    assert_eq!(
        crate::common::fetched(&lrun)["adapter"]["repo"]["resolution"],
        "local"
    );
    for stage in ["finetune/adapter", "fit", "query", "score"] {
        let (a, b) = (
            files_under(&run.join(stage)),
            files_under(&lrun.join(stage)),
        );
        assert!(!a.is_empty(), "{stage} is empty");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{stage}"
        );
        for (k, v) in &a {
            if k.ends_with(".json") {
                continue; // records name the run's own folders
            }
            // Tensors and columns bitwise (the files' metadata may name the run's folders).
            let same = if k.ends_with(".safetensors") {
                same_tensors(v, &b[k])
            } else if k.ends_with(".parquet") {
                same_columns(&run.join(stage).join(k), &lrun.join(stage).join(k))
            } else {
                *v == b[k]
            };
            assert!(
                same,
                "{stage}/{k} differs between the hub and the local adapter"
            );
        }
    }
}

#[test]
fn adapter_misses_and_another_base_are_refused_naming_the_repo_and_the_fix() {
    let fetch_into = |dir: &Path, run: &str| {
        let o = cli(
            dir,
            &["-q", "fetch", "--config", "c.toml", "--run-dir", run],
            &[("HF_ENDPOINT", "http://127.0.0.1:1")],
        );
        (o.status.success(), stderr(&o))
    };
    let fetch = |dir: &Path| fetch_into(dir, "run");
    // Offline, and the cache does not have the adapter's revision.
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "{ id = \"org/tiny-lora\", revision = \"v2\" }");
    let (ok, e) = fetch(tmp.path());
    assert!(!ok);
    for want in [
        "model.adapter",
        "`org/tiny-lora`",
        "revision `v2`",
        "refs/v2",
        "offline",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }

    // The repo lacks the weights file.
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "{ id = \"org/no-weights\" }");
    let cfg_only = adapter_files("org/tiny-llama")[..1].to_vec();
    hand_made_repo(
        &tmp.path().join("cache"),
        "model",
        "org/no-weights",
        "main",
        ADAPTER_COMMIT,
        &cfg_only,
    );
    let (ok, e) = fetch(tmp.path());
    assert!(!ok);
    assert!(
        e.contains("`org/no-weights` has no `adapter_model.safetensors`"),
        "{e}"
    );

    // Trained on another base: refused with both names and both fixes, then accepted when
    // the user says the weights are the same.
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "{ id = \"org/other-base-lora\" }");
    hand_made_repo(
        &tmp.path().join("cache"),
        "model",
        "org/other-base-lora",
        "main",
        ADAPTER_COMMIT,
        &adapter_files("org/tiny-llama-instruct"),
    );
    let (ok, e) = fetch(tmp.path());
    assert!(!ok);
    for want in [
        "`org/tiny-llama-instruct`",
        "`org/tiny-llama`",
        "allow_other_base",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    let cfg = std::fs::read_to_string(tmp.path().join("c.toml")).unwrap();
    write(
        &tmp.path().join("c.toml"),
        cfg.replace(
            "{ id = \"org/other-base-lora\" }",
            "{ id = \"org/other-base-lora\", allow_other_base = true }",
        ),
    );
    let (ok, e) = fetch_into(tmp.path(), "run-allowed");
    assert!(ok, "{e}");
    assert!(e.contains("allow_other_base = true"), "warned: {e}");

    // An adapter cannot be trained on or imported into at the same time.
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), "{ id = \"org/tiny-lora\" }");
    let cfg = std::fs::read_to_string(tmp.path().join("c.toml")).unwrap();
    write(
        &tmp.path().join("c.toml"),
        format!("{cfg}[train.lora]\nr = 2\ntarget_modules = [\"q_proj\"]\n"),
    );
    let (ok, e) = fetch(tmp.path());
    assert!(!ok);
    assert!(
        e.contains("train.lora") && e.contains("model.adapter"),
        "{e}"
    );
}

#[test]
fn a_hub_adapter_downloads_into_the_cache_and_then_resolves_offline() {
    let files: BTreeMap<String, Vec<u8>> = adapter_files("org/tiny-llama")
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .chain([("README.md".to_string(), b"card".to_vec())])
        .collect();
    let hub = MockHub::start(vec![MockRepo {
        kind: "models",
        id: "org/tiny-lora".into(),
        revisions: vec!["main".into(), ADAPTER_COMMIT.into()],
        commit: ADAPTER_COMMIT.into(),
        files: files.clone(),
    }]);
    let tmp = tempfile::tempdir().unwrap();
    let settings = |offline: bool| HubSettings {
        cache_dir: tmp.path().to_path_buf(),
        offline,
        endpoint: hub.endpoint.clone(),
        connect_timeout: Duration::from_secs(2),
        token: None,
    };
    let req = RepoRequest {
        kind: RepoKind::Model,
        id: "org/tiny-lora",
        revision: "main",
        source: SourceKind::Hub,
    };
    let online = resolve_adapter(&settings(false), &req).unwrap();
    assert_eq!(online.resolution, Resolution::Online);
    assert_eq!(online.commit.as_deref(), Some(ADAPTER_COMMIT));
    let names: Vec<&str> = online.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    for f in &online.files {
        assert_eq!(f.sha256, sha(&files[&f.name]), "{}", f.name);
    }
    assert!(
        hub.count("/resolve/") >= 2,
        "{:?}",
        hub.requests.lock().unwrap()
    );
    assert_eq!(hub.count("README.md"), 0, "only the adapter's files");
    let offline = resolve_adapter(&settings(true), &req).unwrap();
    assert_eq!(offline.resolution, Resolution::Cache);
    assert_eq!(offline.files, online.files);
    // An adapter repo that is not on the hub is an error, not a fallback.
    let e = resolve_adapter(
        &settings(false),
        &RepoRequest {
            id: "org/nowhere",
            ..req
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.adapter") && e.contains("org/nowhere"),
        "{e}"
    );
}
