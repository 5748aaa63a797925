//! `fetch`: models and datasets resolved from a hand-made Hugging Face cache (offline), from
//! the hub's HTTP API (a loopback stand-in), and from local folders; revisions and sha256
//! recorded; misses explained.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use source_tda::config::{DatasetConfig, SourceKind};
use source_tda::hub::{
    resolve_dataset, resolve_model, HubSettings, RepoKind, RepoRequest, Resolution,
};

use crate::common::mock_hub::{MockHub, MockRepo};
use crate::common::{hand_made_repo, model_files, tiny_safetensors, write};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT2: &str = "fedcba9876543210fedcba9876543210fedcba98";

fn settings(cache: &Path, offline: bool, endpoint: &str) -> HubSettings {
    HubSettings {
        cache_dir: cache.to_path_buf(),
        offline,
        endpoint: endpoint.to_string(),
        connect_timeout: Duration::from_secs(2),
        token: None,
    }
}

fn offline(cache: &Path) -> HubSettings {
    settings(cache, true, "http://127.0.0.1:1")
}

fn model_req<'a>(id: &'a str, revision: &'a str, source: SourceKind) -> RepoRequest<'a> {
    RepoRequest {
        kind: RepoKind::Model,
        id,
        revision,
        source,
    }
}

fn dataset(split: &str) -> DatasetConfig {
    toml::from_str(&format!("id = \"org/data\"\nsplit = \"{split}\"\n")).unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn model_from_hand_made_cache_records_commit_and_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let files = model_files();
    hand_made_repo(dir.path(), "model", "org/model", "main", COMMIT, &files);
    let r = resolve_model(
        &offline(dir.path()),
        &model_req("org/model", "main", SourceKind::Hub),
    )
    .unwrap();
    assert_eq!(r.resolution, Resolution::Cache);
    assert_eq!(r.revision.as_deref(), Some("main"));
    assert_eq!(r.commit.as_deref(), Some(COMMIT));
    let names: Vec<&str> = r.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["config.json", "tokenizer.json", "model.safetensors"]
    );
    for (name, bytes) in &files {
        let f = r.file(name).unwrap();
        assert_eq!(f.sha256, sha(bytes), "{name}");
        assert_eq!(f.bytes, bytes.len() as u64);
        assert_eq!(std::fs::read(&f.path).unwrap(), *bytes);
        assert!(f
            .path
            .starts_with(dir.path().join("models--org--model/snapshots").join(COMMIT)));
    }
}

#[test]
fn sharded_checkpoint_takes_index_and_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = model_files();
    files.retain(|(n, _)| *n != "model.safetensors");
    let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
    files.push(("model.safetensors.index.json", index.as_bytes().to_vec()));
    files.push(("model-00001-of-00002.safetensors", tiny_safetensors("a", 3)));
    files.push(("model-00002-of-00002.safetensors", tiny_safetensors("b", 4)));
    hand_made_repo(dir.path(), "model", "org/sharded", "main", COMMIT, &files);
    let r = resolve_model(
        &offline(dir.path()),
        &model_req("org/sharded", "main", SourceKind::Hub),
    )
    .unwrap();
    let names: Vec<&str> = r.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let facts = source_tda::hub::verify_model(&r).unwrap();
    assert_eq!(facts.tensors, 2);
    assert_eq!(facts.parameters, 7);

    // A shard named by the index but absent from the repo is an error naming it.
    files.retain(|(n, _)| *n != "model-00002-of-00002.safetensors");
    let dir2 = tempfile::tempdir().unwrap();
    hand_made_repo(dir2.path(), "model", "org/sharded", "main", COMMIT, &files);
    let e = resolve_model(
        &offline(dir2.path()),
        &model_req("org/sharded", "main", SourceKind::Hub),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("names shard `model-00002-of-00002.safetensors`"),
        "{e}"
    );
}

#[test]
fn missing_files_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = model_files();
    files.retain(|(n, _)| *n != "tokenizer.json");
    hand_made_repo(dir.path(), "model", "org/notok", "main", COMMIT, &files);
    let e = resolve_model(
        &offline(dir.path()),
        &model_req("org/notok", "main", SourceKind::Hub),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has no `tokenizer.json`"), "{e}");

    // A snapshot symlink whose blob was deleted.
    hand_made_repo(
        dir.path(),
        "model",
        "org/broken",
        "main",
        COMMIT,
        &model_files(),
    );
    let blobs = dir.path().join("models--org--broken/blobs");
    let victim = std::fs::read_link(
        dir.path()
            .join("models--org--broken/snapshots")
            .join(COMMIT)
            .join("model.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(blobs.join(victim.file_name().unwrap())).unwrap();
    let e = resolve_model(
        &offline(dir.path()),
        &model_req("org/broken", "main", SourceKind::Hub),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`model.safetensors` was looked for at"), "{e}");
    assert!(e.contains(COMMIT), "{e}");
}

#[test]
fn truncated_safetensors_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = model_files();
    let mut st = tiny_safetensors("w", 6);
    st.truncate(st.len() - 4);
    files[2].1 = st;
    hand_made_repo(dir.path(), "model", "org/trunc", "main", COMMIT, &files);
    let r = resolve_model(
        &offline(dir.path()),
        &model_req("org/trunc", "main", SourceKind::Hub),
    )
    .unwrap();
    let e = source_tda::hub::verify_model(&r).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn offline_miss_says_where_it_looked_and_how_to_provide_it() {
    let dir = tempfile::tempdir().unwrap();
    hand_made_repo(
        dir.path(),
        "model",
        "org/model",
        "main",
        COMMIT,
        &model_files(),
    );
    let e = resolve_model(
        &offline(dir.path()),
        &model_req("org/model", "v2", SourceKind::Hub),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("revision `v2` is not in the Hugging Face cache"),
        "{e}"
    );
    assert!(
        e.contains(
            &dir.path()
                .join("models--org--model/refs/v2")
                .display()
                .to_string()
        ),
        "{e}"
    );
    assert!(e.contains("while offline"), "{e}");
    assert!(
        e.contains("huggingface-cli download org/model --revision v2"),
        "{e}"
    );

    let e = resolve_model(
        &offline(dir.path()),
        &model_req("org/absent", "main", SourceKind::Hub),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("models--org--absent/refs/main"), "{e}");
}

#[test]
fn commit_revision_resolves_without_a_ref() {
    let dir = tempfile::tempdir().unwrap();
    hand_made_repo(
        dir.path(),
        "model",
        "org/model",
        "main",
        COMMIT,
        &model_files(),
    );
    let r = resolve_model(
        &offline(dir.path()),
        &model_req("org/model", COMMIT, SourceKind::Hub),
    )
    .unwrap();
    assert_eq!(r.commit.as_deref(), Some(COMMIT));
    assert_eq!(r.revision.as_deref(), Some(COMMIT));
}

#[test]
fn dataset_splits_and_parquet_conversion_from_cache() {
    let dir = tempfile::tempdir().unwrap();
    let files = vec![
        ("README.md", b"card".to_vec()),
        ("data/train-00000-of-00002.parquet", b"t0".to_vec()),
        ("data/train-00001-of-00002.parquet", b"t1".to_vec()),
        ("data/test-00000-of-00001.parquet", b"x".to_vec()),
    ];
    hand_made_repo(dir.path(), "dataset", "org/data", "main", COMMIT, &files);
    // The hub's Parquet conversion lives on the `refs/convert/parquet` revision.
    let conv = vec![("default/train/0000.parquet", b"c".to_vec())];
    hand_made_repo(
        dir.path(),
        "dataset",
        "org/data",
        "refs/convert/parquet",
        COMMIT2,
        &conv,
    );

    let s = offline(dir.path());
    let req = |rev| RepoRequest {
        kind: RepoKind::Dataset,
        id: "org/data",
        revision: rev,
        source: SourceKind::Hub,
    };
    let r = resolve_dataset(&s, &req("main"), &dataset("train")).unwrap();
    let names: Vec<&str> = r.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ]
    );
    assert!(r.root.starts_with(dir.path().join("datasets--org--data")));
    let r = resolve_dataset(&s, &req("main"), &dataset("test")).unwrap();
    assert_eq!(r.files.len(), 1);
    let r = resolve_dataset(&s, &req("refs/convert/parquet"), &dataset("train")).unwrap();
    assert_eq!(r.commit.as_deref(), Some(COMMIT2));
    assert_eq!(r.files[0].name, "default/train/0000.parquet");
    assert_eq!(r.files[0].sha256, sha(b"c"));

    let e = resolve_dataset(&s, &req("main"), &dataset("validation"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no split `validation`"), "{e}");
    assert!(e.contains("its splits are: train, test"), "{e}");
}

#[test]
fn local_folder_and_local_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in model_files() {
        write(&dir.path().join("m").join(name), bytes);
    }
    write(&dir.path().join("m/notes.txt"), "ignored");
    let m = dir.path().join("m");
    let m = m.to_str().unwrap();
    let r = resolve_model(
        &offline(dir.path()),
        &model_req(m, "main", SourceKind::Local),
    )
    .unwrap();
    assert_eq!(r.resolution, Resolution::Local);
    assert_eq!(r.commit, None);
    assert_eq!(r.files.len(), 3);

    write(&dir.path().join("d/train.jsonl"), "{\"text\": \"a\"}\n");
    write(&dir.path().join("d/test.jsonl"), "{\"text\": \"b\"}\n");
    let d = dir.path().join("d");
    let req = RepoRequest {
        kind: RepoKind::Dataset,
        id: d.to_str().unwrap(),
        revision: "main",
        source: SourceKind::Local,
    };
    let r = resolve_dataset(&offline(dir.path()), &req, &dataset("test")).unwrap();
    assert_eq!(r.files[0].name, "test.jsonl");

    let f = dir.path().join("d/train.jsonl");
    let req = RepoRequest {
        id: f.to_str().unwrap(),
        ..req
    };
    let r = resolve_dataset(&offline(dir.path()), &req, &dataset("ignored")).unwrap();
    assert_eq!(r.files[0].name, "train.jsonl");
    assert_eq!(r.files[0].sha256, sha(b"{\"text\": \"a\"}\n"));

    let req = RepoRequest {
        id: "/nonexistent/folder",
        ..req
    };
    let e = resolve_dataset(&offline(dir.path()), &req, &dataset("train"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/folder"), "{e}");
}

#[test]
fn unreachable_hub_falls_back_to_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    hand_made_repo(
        dir.path(),
        "model",
        "org/model",
        "main",
        COMMIT,
        &model_files(),
    );
    // Not offline, but nothing listens on port 1: the fallback must be the cache.
    let s = settings(dir.path(), false, "http://127.0.0.1:1");
    let r = resolve_model(&s, &model_req("org/model", "main", SourceKind::Hub)).unwrap();
    assert_eq!(r.resolution, Resolution::Cache);
    assert_eq!(r.commit.as_deref(), Some(COMMIT));
}

fn mock_model_repo() -> MockRepo {
    let files: BTreeMap<String, Vec<u8>> = model_files()
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .chain([("README.md".to_string(), b"card".to_vec())])
        .collect();
    MockRepo {
        kind: "models",
        id: "org/model".into(),
        revisions: vec!["main".into(), COMMIT.into()],
        commit: COMMIT.into(),
        files,
    }
}

#[test]
fn online_download_fills_the_cache_and_then_works_offline() {
    let hub = MockHub::start(vec![
        mock_model_repo(),
        MockRepo {
            kind: "datasets",
            id: "org/data".into(),
            revisions: vec!["main".into(), COMMIT2.into()],
            commit: COMMIT2.into(),
            files: [(
                "data/train.jsonl".to_string(),
                b"{\"text\": \"hi\"}\n".to_vec(),
            )]
            .into(),
        },
    ]);
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), false, &hub.endpoint);
    let r = resolve_model(&s, &model_req("org/model", "main", SourceKind::Hub)).unwrap();
    assert_eq!(r.resolution, Resolution::Online);
    assert_eq!(r.commit.as_deref(), Some(COMMIT));
    for (name, bytes) in model_files() {
        assert_eq!(r.file(name).unwrap().sha256, sha(&bytes), "{name}");
        assert_eq!(std::fs::read(&r.file(name).unwrap().path).unwrap(), bytes);
    }
    assert!(
        r.file("README.md").is_none(),
        "only the files a model needs"
    );
    assert_eq!(hub.count("/api/models/org/model/revision/main"), 1);
    assert!(
        hub.count("/resolve/") >= 3,
        "{:?}",
        hub.requests.lock().unwrap()
    );

    // The cache now has the standard layout: a second, offline resolution needs no network.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("models--org--model/refs/main")).unwrap(),
        COMMIT
    );
    let r2 = resolve_model(
        &offline(dir.path()),
        &model_req("org/model", "main", SourceKind::Hub),
    )
    .unwrap();
    assert_eq!(r2.resolution, Resolution::Cache);
    let shas = |r: &source_tda::hub::ResolvedRepo| {
        r.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>()
    };
    assert_eq!(shas(&r), shas(&r2));

    // Datasets go through `/api/datasets/…` and `/datasets/…/resolve/…`.
    let req = RepoRequest {
        kind: RepoKind::Dataset,
        id: "org/data",
        revision: "main",
        source: SourceKind::Hub,
    };
    let d = resolve_dataset(&s, &req, &dataset("train")).unwrap();
    assert_eq!(d.commit.as_deref(), Some(COMMIT2));
    assert_eq!(d.files[0].sha256, sha(b"{\"text\": \"hi\"}\n"));
    assert_eq!(
        hub.count("/datasets/org/data/resolve/"),
        2,
        "{:?}",
        hub.requests.lock().unwrap()
    );
}

#[test]
fn online_not_found_is_an_error_not_a_fallback() {
    let hub = MockHub::start(vec![mock_model_repo()]);
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), false, &hub.endpoint);
    let e = resolve_model(&s, &model_req("org/other", "main", SourceKind::Hub))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found on the hub (HTTP 404)"), "{e}");
}

#[test]
fn cli_honours_hf_hub_offline_and_hf_hub_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hfcache");
    hand_made_repo(&cache, "model", "org/model", "main", COMMIT, &model_files());
    write(
        &dir.path().join("train.jsonl"),
        "{\"text\": \"hello world\"}\n",
    );
    // No [hub] section: the cache comes from HF_HUB_CACHE, and HF_HUB_OFFLINE=1 forbids the
    // network even though an endpoint is set (it would fail: nothing listens there).
    write(
        &dir.path().join("c.toml"),
        "[model]\nid = \"org/model\"\n[data.train]\nid = \"./train.jsonl\"\n",
    );
    let out = common::cli(
        dir.path(),
        &["fetch", "--config", "c.toml", "--run-dir", "run"],
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "http://127.0.0.1:1"),
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let resolved = common::fetched(&dir.path().join("run"));
    assert_eq!(resolved["model"]["resolution"], "cache");
    assert_eq!(resolved["model"]["commit"], COMMIT);
    assert_eq!(resolved["data"]["train"]["resolution"], "local");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/manifest.json")).unwrap(),
    )
    .unwrap();
    let summary = &manifest["stages"]["fetch"]["summary"];
    assert_eq!(summary["model"]["revision"], "main");
    assert_eq!(summary["model"]["commit"], COMMIT);
    assert_eq!(
        summary["model"]["files"][0]["sha256"],
        sha(&model_files()[0].1),
        "manifest records the sha256 of every file"
    );

    // Without HF_HUB_CACHE the default cache (under HOME) is empty: the miss is explained.
    let out = common::cli(
        dir.path(),
        &["fetch", "--config", "c.toml", "--run-dir", "run2"],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    );
    assert!(!out.status.success());
    let e = common::stderr(&out);
    assert!(
        e.contains(".cache/huggingface/hub/models--org--model/refs/main"),
        "{e}"
    );
}

/// A copy of the shipped demo cache (assets/hf-cache, blobs named by their SHA-256) in a temp
/// folder, symlinks kept.
fn demo_cache() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(common::repo_root().join("assets/hf-cache"))
        .arg(dir.path().join("cache"))
        .status()
        .unwrap();
    assert!(ok.success());
    dir
}

fn demo_model(cache: &Path) -> source_tda::Result<source_tda::hub::ResolvedRepo> {
    resolve_model(
        &offline(cache),
        &model_req("source-tda/demo-llama", "main", SourceKind::Hub),
    )
}

/// The snapshot link of `file` in the demo model and the blob it points to.
fn demo_blob(cache: &Path, file: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = cache.join("models--source-tda--demo-llama");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    let link = repo.join("snapshots").join(commit.trim()).join(file);
    let blob = std::fs::canonicalize(&link).unwrap();
    (link, blob)
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_damaged_cache_blob_is_refused_naming_the_repo_file_and_fix() {
    let dir = demo_cache();
    let cache = dir.path().join("cache");
    let r = demo_model(&cache).unwrap();
    assert_eq!(r.resolution, Resolution::Cache);
    let (_, blob) = demo_blob(&cache, "model.safetensors");
    assert_eq!(
        r.file("model.safetensors").unwrap().sha256,
        blob.file_name().unwrap().to_string_lossy(),
        "the demo's blobs are named by their SHA-256"
    );

    // Same size, one byte flipped: the weights still parse, but the blob is not its name.
    flip_a_byte(&blob);
    let e = demo_model(&cache).unwrap_err().to_string();
    assert!(e.contains("model `source-tda/demo-llama`"), "{e}");
    assert!(e.contains("file `model.safetensors`"), "{e}");
    assert!(e.contains("is damaged"), "{e}");
    assert!(
        e.contains(&format!(
            "Delete the blob {} and fetch again",
            blob.display()
        )),
        "{e}"
    );
    assert!(
        e.contains("huggingface-cli download source-tda/demo-llama model.safetensors"),
        "{e}"
    );

    // A local folder holding the same damaged file is hashed and recorded, not judged.
    let (link, _) = demo_blob(&cache, "model.safetensors");
    let local = resolve_model(
        &offline(&cache),
        &model_req(
            link.parent().unwrap().to_str().unwrap(),
            "main",
            SourceKind::Local,
        ),
    )
    .unwrap();
    assert_eq!(local.resolution, Resolution::Local);
    assert_eq!(
        local.file("model.safetensors").unwrap().sha256,
        sha(&std::fs::read(&blob).unwrap())
    );
}

#[test]
fn a_blob_stored_in_git_is_checked_against_its_git_blob_hash() {
    let dir = demo_cache();
    let cache = dir.path().join("cache");
    // Lay config.json out as a real cache does for a file stored in git (not LFS): its blob
    // is named by the git object id, SHA-1 of "blob LEN\0" + content.
    let (link, blob) = demo_blob(&cache, "config.json");
    let bytes = std::fs::read(&blob).unwrap();
    // (git_blob_sha1_file's own tests check it against `git hash-object`.)
    let git_id = source_tda::util::hash::git_blob_sha1_file(&blob).unwrap();
    assert_eq!(git_id.len(), 40);
    let git_blob = blob.with_file_name(&git_id);
    std::fs::rename(&blob, &git_blob).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{git_id}"), &link).unwrap();
    let r = demo_model(&cache).unwrap();
    assert_eq!(r.file("config.json").unwrap().sha256, sha(&bytes));

    flip_a_byte(&git_blob);
    let e = demo_model(&cache).unwrap_err().to_string();
    assert!(e.contains("file `config.json`"), "{e}");
    assert!(e.contains("git blob hash"), "{e}");
    assert!(e.contains(&git_blob.display().to_string()), "{e}");
}
