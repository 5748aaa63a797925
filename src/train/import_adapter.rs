//! Owns importing PEFT adapter checkpoints: `adapter_checkpoint`, `adapter_over_base`,
//! `peft_param_name`.
//! Layer: train — may import the ground, linalg, backend, model, data, hub; no sibling.
//!
//! A Trainer run over a PEFT model saves `checkpoint-N/` with `adapter_config.json` and
//! `adapter_model.safetensors` (the lora_A / lora_B matrices) instead of model weights. Its
//! `base_model_name_or_path` is usually a hub id, which this tool cannot load without the
//! fetch stage's folder; so the import writes each adapter into the run directory as
//! `adapters/checkpoint-N/` whose config names the fetched base folder, and the trajectory
//! points there. The adapter's options are checked on the way ([`LoraConfig::from_file`]
//! refuses DoRA, saved modules, adapter biases, …).

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::LoraConfig;
use crate::util::fsx::write_atomic;

/// When `cdir` is a PEFT adapter checkpoint: writes `out/adapters/checkpoint-STEP/` (its
/// adapter config naming `base_dir`, and its weights) and returns that folder. None for a
/// full-model checkpoint.
pub(crate) fn adapter_checkpoint(
    cdir: &Path,
    step: u64,
    base_dir: &Path,
    out: &Path,
) -> Result<Option<PathBuf>> {
    let cfg_path = cdir.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Ok(None);
    }
    LoraConfig::from_file(&cfg_path)?;
    let weights = cdir.join(ADAPTER_WEIGHTS);
    if !weights.is_file() {
        return Err(Error::Pipeline(format!(
            "{} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save with \
             save_safetensors = True (the default)",
            cdir.display()
        )));
    }
    let dst = out.join("adapters").join(format!("checkpoint-{step}"));
    adapter_over_base(cdir, base_dir, &dst)?;
    Ok(Some(dst))
}

/// Writes the PEFT adapter of folder `src` into `dst` (atomically, file by file) with its
/// `adapter_config.json`'s `base_model_name_or_path` set to `base_dir` (made absolute), so
/// that `dst` loads over that folder ([`crate::model::Model::load`]); every other field and
/// the weights are kept as they are.
pub fn adapter_over_base(src: &Path, base_dir: &Path, dst: &Path) -> Result<()> {
    let cfg_path = src.join(ADAPTER_CONFIG);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).ctx("reading", &cfg_path)?)
            .map_err(|e| Error::Pipeline(format!("{}: not JSON ({e})", cfg_path.display())))?;
    let base = std::fs::canonicalize(base_dir).ctx("resolving", base_dir)?;
    cfg["base_model_name_or_path"] = base.display().to_string().into();
    std::fs::create_dir_all(dst).ctx("creating", dst)?;
    let text = serde_json::to_vec_pretty(&cfg).expect("JSON value serialises");
    write_atomic(&dst.join(ADAPTER_CONFIG), &text)?;
    let weights = src.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights).ctx("reading", &weights)?;
    write_atomic(&dst.join(ADAPTER_WEIGHTS), &bytes)
}

/// A parameter name of a PEFT model as this tool names it: PEFT's `named_parameters()` puts
/// the adapter name between `lora_A`/`lora_B` and `weight` (`….lora_A.default.weight`);
/// `adapter_model.safetensors` and this tool leave it out.
pub(crate) fn peft_param_name(name: &str) -> String {
    for which in ["lora_A", "lora_B"] {
        let marker = format!(".{which}.");
        if let Some(i) = name.find(&marker) {
            let rest = &name[i + marker.len()..];
            if let Some(j) = rest.find('.') {
                if &rest[j..] == ".weight" {
                    return format!("{}.{which}.weight", &name[..i]);
                }
            }
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_lose_the_adapter_name() {
        assert_eq!(
            peft_param_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            ),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(peft_param_name("x.lora_B.weight"), "x.lora_B.weight");
        assert_eq!(peft_param_name("model.norm.weight"), "model.norm.weight");
    }
}
