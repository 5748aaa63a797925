//! Owns `verify_model` and `safetensors_header`: cheap integrity checks of fetched model files.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder, repo.rs.
//!
//! Cheap integrity checks of fetched model files: config.json parses, every safetensors file
//! has a valid header whose tensors exactly fill the file (a truncated download fails here).

use std::path::Path;

use super::repo::ResolvedRepo;
use crate::error::{Error, IoContext, Result};

/// What the checks learned about a model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelFacts {
    /// `model_type` from config.json, when present.
    pub model_type: Option<String>,
    /// Number of tensors over all safetensors files.
    pub tensors: usize,
    /// Number of parameters (elements) over all tensors.
    pub parameters: u64,
    /// Distinct dtypes seen (`F32`, `BF16`, ...).
    pub dtypes: Vec<String>,
}

/// Checks config.json and the safetensors files of a resolved model.
pub fn verify_model(repo: &ResolvedRepo) -> Result<ModelFacts> {
    let mut facts = ModelFacts::default();
    if let Some(cfg) = repo.file("config.json") {
        let text = std::fs::read_to_string(&cfg.path).ctx("reading", &cfg.path)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::Fetch(format!(
                "{}: config.json is not valid JSON ({e}); the download may be damaged",
                cfg.path.display()
            ))
        })?;
        facts.model_type = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .map(str::to_string);
    }
    for f in repo
        .files
        .iter()
        .filter(|f| f.name.ends_with(".safetensors"))
    {
        let (tensors, params, dtypes) = safetensors_header(&f.path)?;
        if f.name.starts_with("training/") {
            continue; // training state shipped with the model, not weights
        }
        facts.tensors += tensors;
        facts.parameters += params;
        for d in dtypes {
            if !facts.dtypes.contains(&d) {
                facts.dtypes.push(d);
            }
        }
    }
    facts.dtypes.sort();
    Ok(facts)
}

/// Tensor count, element count and dtypes of one safetensors file, validating its header
/// against the file size.
pub fn safetensors_header(path: &Path) -> Result<(usize, u64, Vec<String>)> {
    let file = std::fs::File::open(path).ctx("opening", path)?;
    // SAFETY: the file is opened read-only and only read while mapped; only the header pages
    // are touched by `read_metadata`.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.ctx("mapping", path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        Error::Fetch(format!(
            "{}: not a valid safetensors file ({e:?}); the download may be truncated or damaged: \
             delete it and fetch again",
            path.display()
        ))
    })?;
    let mut params = 0u64;
    let mut dtypes = Vec::new();
    let tensors = meta.tensors();
    for info in tensors.values() {
        params += info.shape.iter().map(|&d| d as u64).product::<u64>();
        let d = format!("{:?}", info.dtype);
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
    }
    Ok((tensors.len(), params, dtypes))
}
