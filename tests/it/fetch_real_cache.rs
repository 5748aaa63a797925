//! `fetch` against a cache written by the official Python client, `huggingface_hub`: it
//! downloads a model and a dataset from a loopback stand-in of the hub into a fresh cache,
//! and source-tda must then resolve them offline with the right commit and sha256.
//!
//! Needs the Python environment made by `scripts/assets/setup-test-python.sh` (CI runs it). Without
//! it the test fails in CI and says so loudly elsewhere.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use source_tda::config::{DatasetConfig, SourceKind};
use source_tda::hub::{resolve_dataset, resolve_model, HubSettings, RepoKind, RepoRequest};

use crate::common::mock_hub::{MockHub, MockRepo};

const COMMIT: &str = "1111111111222222222233333333334444444444";
const DATA_COMMIT: &str = "aaaaaaaaaabbbbbbbbbbccccccccccdddddddddd";
const CONV_COMMIT: &str = "9999999999888888888877777777776666666666";

#[test]
fn cache_written_by_huggingface_hub_resolves_offline() {
    let Some(py) = common::reference_python("cache_written_by_huggingface_hub_resolves_offline")
    else {
        return;
    };
    let model: BTreeMap<String, Vec<u8>> = common::model_files()
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .collect();
    let data: BTreeMap<String, Vec<u8>> = [
        (
            "data/train-00000-of-00001.jsonl".to_string(),
            b"{\"text\": \"a\"}\n".to_vec(),
        ),
        (
            "data/test-00000-of-00001.jsonl".to_string(),
            b"{\"text\": \"b\"}\n".to_vec(),
        ),
    ]
    .into();
    let converted: BTreeMap<String, Vec<u8>> = [(
        "default/train/0000.parquet".to_string(),
        b"PAR1-not-read-here".to_vec(),
    )]
    .into();
    let hub = MockHub::start(vec![
        MockRepo {
            kind: "models",
            id: "org/model".into(),
            revisions: vec!["main".into(), COMMIT.into()],
            commit: COMMIT.into(),
            files: model.clone(),
        },
        MockRepo {
            kind: "datasets",
            id: "org/data".into(),
            revisions: vec!["main".into()],
            commit: DATA_COMMIT.into(),
            files: data.clone(),
        },
        MockRepo {
            kind: "datasets",
            id: "org/data".into(),
            revisions: vec!["refs/convert/parquet".into()],
            commit: CONV_COMMIT.into(),
            files: converted.clone(),
        },
    ]);

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let script = r#"
from huggingface_hub import hf_hub_download
for f in ["config.json", "tokenizer.json", "model.safetensors"]:
    hf_hub_download("org/model", f)
for f in ["data/train-00000-of-00001.jsonl", "data/test-00000-of-00001.jsonl"]:
    hf_hub_download("org/data", f, repo_type="dataset")
hf_hub_download("org/data", "default/train/0000.parquet", repo_type="dataset",
                revision="refs/convert/parquet")
"#;
    let out = std::process::Command::new(&py)
        .args(["-c", script])
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "huggingface_hub failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let settings = HubSettings {
        cache_dir: cache.clone(),
        offline: true,
        endpoint: "http://127.0.0.1:1".into(),
        connect_timeout: Duration::from_secs(1),
        token: None,
    };
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    let r = resolve_model(
        &settings,
        &RepoRequest {
            kind: RepoKind::Model,
            id: "org/model",
            revision: "main",
            source: SourceKind::Hub,
        },
    )
    .unwrap();
    assert_eq!(r.commit.as_deref(), Some(COMMIT));
    assert_eq!(r.files.len(), 3);
    for f in &r.files {
        assert_eq!(f.sha256, sha(&model[&f.name]), "{}", f.name);
    }

    let ds = |split: &str| -> DatasetConfig {
        toml::from_str(&format!("id = \"org/data\"\nsplit = \"{split}\"\n")).unwrap()
    };
    let req = |rev| RepoRequest {
        kind: RepoKind::Dataset,
        id: "org/data",
        revision: rev,
        source: SourceKind::Hub,
    };
    let d = resolve_dataset(&settings, &req("main"), &ds("test")).unwrap();
    assert_eq!(d.commit.as_deref(), Some(DATA_COMMIT));
    assert_eq!(d.files[0].name, "data/test-00000-of-00001.jsonl");
    assert_eq!(
        d.files[0].sha256,
        sha(&data["data/test-00000-of-00001.jsonl"])
    );
    let c = resolve_dataset(&settings, &req("refs/convert/parquet"), &ds("train")).unwrap();
    assert_eq!(c.commit.as_deref(), Some(CONV_COMMIT));
    assert_eq!(
        c.files[0].sha256,
        sha(&converted["default/train/0000.parquet"])
    );
}
