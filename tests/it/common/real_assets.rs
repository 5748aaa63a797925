//! Locating the real-model test assets and reading the reference pack's tensors.
//!
//! * The SmolLM2 GGUF from `scripts/assets/fetch-test-assets.sh` (`$SOURCE_TDA_TEST_ASSETS`, else
//!   `.cache/test-assets/`).
//! * The kronfluence reference pack, committed in `tests/data/kronfluence-smollm2-2l/` (its
//!   README says what it holds and how it was made).
//!
//! A missing GGUF fails the test under CI (`CI` set) and prints a loud `SKIPPED` line
//! elsewhere.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The GGUF file name inside the asset folder.
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `Some(path)` if it exists; otherwise fails under CI and returns `None` (with a loud
/// `SKIPPED` line) elsewhere.
pub fn require(path: PathBuf, how: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let msg = format!("{} is missing: {how}", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n=== SKIPPED (real-model test): {msg} ===\n"
    );
    None
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF.
pub fn gguf_path() -> Option<PathBuf> {
    let dir = std::env::var_os("SOURCE_TDA_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/test-assets"));
    require(
        dir.join(GGUF_NAME),
        "run scripts/assets/fetch-test-assets.sh",
    )
}

/// The kronfluence reference pack, `tests/data/kronfluence-smollm2-2l` of the repository.
pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kronfluence-smollm2-2l")
}

/// An int64 tensor: (shape, values).
pub fn i64_tensor(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let v = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

/// An f32 tensor's values, flat.
pub fn f32_tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A one-element f64 (or f32) tensor as f64.
pub fn f64_scalar(st: &safetensors::SafeTensors, name: &str) -> f64 {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    match t.dtype() {
        safetensors::Dtype::F64 => f64::from_le_bytes(t.data()[..8].try_into().unwrap()),
        safetensors::Dtype::F32 => f32::from_le_bytes(t.data()[..4].try_into().unwrap()) as f64,
        d => panic!("{name}: dtype {d:?}"),
    }
}
