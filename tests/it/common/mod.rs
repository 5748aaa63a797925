//! Helpers shared by the integration tests: paths to shipped assets, a hand-built Hugging
//! Face cache, and running the CLI binary; the submodules hold a mock hub, small model
//! fixtures, the real-model assets and the SmolLM2 reference helpers.
#![allow(dead_code)]

pub mod mock_hub;
pub mod model_fixtures;
pub mod real_assets;
pub mod smollm2;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::Digest;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter of the Python reference environment (pyarrow, DuckDB, huggingface_hub)
/// that `scripts/assets/setup-test-python.sh` makes in `$SOURCE_TDA_PYTHON_ENV`, default
/// `.cache/py`. Missing: under CI the test `what` fails; elsewhere it prints a loud `SKIPPED`
/// line and gets `None`.
pub fn reference_python(what: &str) -> Option<PathBuf> {
    let env = std::env::var_os("SOURCE_TDA_PYTHON_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/py"));
    let py = env.join("bin/python");
    if py.exists() {
        return Some(py);
    }
    let msg = format!(
        "{what}: {} is missing: run scripts/assets/setup-test-python.sh",
        py.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n=== SKIPPED {msg} ===\n");
    None
}

/// The demo tokenizer shipped in assets/hf-cache (a byte-level BPE).
pub fn demo_tokenizer() -> PathBuf {
    let snaps = repo_root().join("assets/hf-cache/models--source-tda--demo-llama/snapshots");
    let snap = std::fs::read_dir(&snaps)
        .expect("demo assets are committed under assets/hf-cache")
        .next()
        .expect("one snapshot")
        .unwrap()
        .path();
    snap.join("tokenizer.json")
}

/// A pipeline file in `dir` that runs configs/demo-eval.toml (the demo's model and data with
/// the short T = 57 fine-tune and the given completions) from `fetch` through `report`, no
/// evaluation stages: the quick demo run most tests build on (configs/demo.toml's fine-tune
/// is 10x longer).
pub fn demo_eval_pipeline(dir: &Path) -> PathBuf {
    let path = dir.join("demo-eval-pipeline.toml");
    let config = repo_root().join("configs/demo-eval.toml");
    write(
        &path,
        format!(
            "config = {:?}\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \
             \"score\", \"report\"]\n",
            config.display().to_string()
        ),
    );
    path
}

/// Writes `bytes` to `path`, creating parent folders.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Builds one repo of the standard hub cache layout by hand, the way huggingface_hub lays it
/// out: `ROOT/{models,datasets}--ORG--NAME/blobs/ETAG`, `snapshots/COMMIT/PATH` as relative
/// symlinks into blobs, and `refs/REVISION` holding COMMIT.
pub fn hand_made_repo(
    cache: &Path,
    kind: &str,
    id: &str,
    revision: &str,
    commit: &str,
    files: &[(&str, Vec<u8>)],
) {
    let folder = cache.join(format!("{kind}s--{}", id.replace('/', "--")));
    for (name, bytes) in files {
        // The blob's name is its content's SHA-256, as for LFS files in a real cache.
        let etag = hex::encode(sha2::Sha256::digest(bytes));
        write(&folder.join("blobs").join(&etag), bytes);
        let link = folder.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(name.matches('/').count() + 2);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), &link).unwrap();
    }
    write(&folder.join("refs").join(revision), commit);
}

/// A minimal safetensors file with one f32 tensor of `n` elements.
pub fn tiny_safetensors(name: &str, n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], &data).unwrap();
    safetensors::serialize(vec![(name.to_string(), view)], None).unwrap()
}

/// config.json + tokenizer.json (the demo's) + one safetensors file: a model folder's files.
pub fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("config.json", br#"{"model_type": "llama"}"#.to_vec()),
        ("tokenizer.json", std::fs::read(demo_tokenizer()).unwrap()),
        ("model.safetensors", tiny_safetensors("w", 6)),
    ]
}

/// Runs the source-tda binary with `args` and extra environment, in `cwd`.
pub fn cli(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_source-tda"));
    cmd.current_dir(cwd).args(args);
    for var in [
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("runs the binary")
}

/// Every record batch of a Parquet file (through the library's non-generic reader).
pub fn batches(path: &Path) -> Vec<arrow_array::RecordBatch> {
    source_tda::output::parquet::read_batches(path).unwrap_or_else(|e| panic!("{e}"))
}

/// stderr of an output, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What the fetch stage of run directory `run` resolved, as one JSON object shaped
/// `{"model", "model_facts", "data": {ROLE: …}}` (from `fetch/model.json` and
/// `fetch/data/ROLE.json`).
pub fn fetched(run: &Path) -> serde_json::Value {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let mut v = read(&run.join("fetch/model.json"));
    let mut data = serde_json::Map::new();
    for entry in std::fs::read_dir(run.join("fetch/data")).unwrap() {
        let p = entry.unwrap().path();
        let role = p.file_stem().unwrap().to_string_lossy().into_owned();
        data.insert(role, read(&p));
    }
    v["data"] = serde_json::Value::Object(data);
    v
}

/// JSONL of `n` ordinary fine-tuning documents `d00`, `d01`, … ("The city of PokasI lies on
/// the river Braen. Its markets sell blue glass.") for small end-to-end runs on the demo model.
pub fn city_docs_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"d{i:02}\", \"text\": \"The city of Pokas{i} lies on the river Braen. Its markets sell blue glass.\"}}\n"
            )
        })
        .collect()
}

/// Asserts that token factors multiply out to the dense gradients they stand for:
/// max |Δ_qᵀ A_q − V_q| ≤ 1e-5 max |V| (and V is not all zero); `what` names the layer.
pub fn assert_factors_are_dense(
    f: &source_tda::linalg::TokenFactors,
    v: &candle_core::Tensor,
    what: &str,
) {
    let max = |t: &candle_core::Tensor| -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    };
    let (scale, err) = (max(v), max(&(f.dense().unwrap() - v).unwrap()));
    assert!(
        scale > 0.0 && err <= 1e-5 * scale,
        "token factors of {what}: {err:e} of {scale:e}"
    );
}
