//! Owns fetching a PEFT LoRA adapter: `resolve_adapter`, `verify_adapter`, `check_adapter_base`,
//! `adapter_files`, `AdapterFacts`.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder, mod.rs,
//! repo.rs, verify.rs.
//!
//! `[model] adapter` names an adapter repo (or folder) holding PEFT's `adapter_config.json`
//! and `adapter_model.safetensors`. It is resolved exactly as the model is (hub download into
//! the standard cache, the cache offline, or a local folder; blobs checked against their
//! content addresses, every file hashed). The adapter's options are checked here, at fetch,
//! so that an adapter this tool cannot attribute (DoRA, saved modules, …) is refused before
//! any other stage runs.
//!
//! **The base model.** An adapter's A and B mean something only over the weights it was
//! trained on, and fine-tunes of one architecture (a base and its instruct variant) have the
//! same shapes, so a wrong base loads without error and gives plausible-looking, meaningless
//! scores after hours of `fit` and `score`. [`check_adapter_base`] therefore refuses an
//! adapter whose `base_model_name_or_path` is a hub id other than `[model] id`, with advice,
//! and lets `allow_other_base = true` accept it (a mirror or a copy of the same weights).
//! Where the two cannot be compared (a local `[model]` folder, or an adapter trained over a
//! folder on another machine) it only warns.

use serde::{Deserialize, Serialize};

use super::repo::{RepoRequest, ResolvedRepo};
use super::settings::HubSettings;
use super::verify::safetensors_header;
use crate::config::{is_repo_id, LoraTargets};
use crate::error::{Error, Result};
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::LoraConfig;

/// What the checks learned about an adapter (recorded in the fetch summary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterFacts {
    /// Rank r.
    pub r: usize,
    /// s = α / r (α / √r with rsLoRA).
    pub scale: f64,
    /// `target_modules`: names, or a regex string.
    pub target_modules: LoraTargets,
    /// `base_model_name_or_path`, when the adapter names one.
    pub base_model: Option<String>,
    /// Tensors in `adapter_model.safetensors` (two per adapted module).
    pub tensors: usize,
    /// Elements over those tensors.
    pub parameters: u64,
}

/// The adapter files among `names`: `adapter_config.json` and `adapter_model.safetensors`.
pub fn adapter_files(names: &[String], id: &str) -> Result<Vec<String>> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut shown: Vec<&str> = names.iter().map(String::as_str).take(30).collect();
    if names.len() > 30 {
        shown.push("…");
    }
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        if !has(f) {
            let advice = if f == ADAPTER_WEIGHTS && has("adapter_model.bin") {
                "; it has PyTorch's adapter_model.bin only: save the adapter again with \
                 `model.save_pretrained(dir, safe_serialization=True)` (PEFT's default) and \
                 point model.adapter at that folder or repo"
            } else if f == ADAPTER_CONFIG && has("config.json") {
                "; it looks like a full model, not a PEFT adapter: name it in [model] id instead"
            } else {
                "; a PEFT adapter repo holds adapter_config.json and adapter_model.safetensors \
                 (a Trainer run keeps them in checkpoint-N/: import those with \
                 train.import_from)"
            };
            return Err(Error::Fetch(format!(
                "adapter `{id}` has no `{f}` (files: {}){advice}",
                shown.join(", ")
            )));
        }
    }
    Ok(vec![
        ADAPTER_CONFIG.to_string(),
        ADAPTER_WEIGHTS.to_string(),
    ])
}

/// Resolves the adapter named by `[model] adapter` (hub, cache or local folder) to its two
/// files, hashed and checked like the model's.
pub fn resolve_adapter(settings: &HubSettings, req: &RepoRequest) -> Result<ResolvedRepo> {
    super::resolve(settings, req, &|names, _| adapter_files(names, req.id))
        .map_err(|e| Error::Fetch(format!("model.adapter: {e}")))
}

/// Checks a resolved adapter: its config is one this tool implements (refusals name the
/// field) and its weights file has a valid safetensors header that fills the file.
pub fn verify_adapter(repo: &ResolvedRepo) -> Result<AdapterFacts> {
    let file = |n: &str| {
        repo.file(n).ok_or_else(|| {
            Error::Fetch(format!(
                "model.adapter `{}`: `{n}` was not resolved",
                repo.id
            ))
        })
    };
    let cfg_path = &file(ADAPTER_CONFIG)?.path;
    let cfg = LoraConfig::from_file(cfg_path).map_err(|e| {
        Error::Fetch(format!(
            "model.adapter `{}`: {e}; this adapter cannot be attributed",
            repo.id
        ))
    })?;
    let (tensors, parameters, _) = safetensors_header(&file(ADAPTER_WEIGHTS)?.path)?;
    Ok(AdapterFacts {
        r: cfg.r,
        scale: cfg.scale(),
        target_modules: cfg.targets.clone(),
        base_model: cfg.base_model.clone(),
        tensors,
        parameters,
    })
}

/// Compares the adapter's `base_model_name_or_path` with `[model] id`. `Ok(None)`: they
/// agree (hub ids compared without case, as the hub does). `Ok(Some(warning))`: they cannot
/// be compared, or differ and `allow_other_base` accepts it. `Err`: two different hub ids,
/// with what to change.
pub fn check_adapter_base(
    adapter_id: &str,
    adapter_base: Option<&str>,
    model_id: &str,
    model_is_local: bool,
    allow_other_base: bool,
) -> Result<Option<String>> {
    let norm = |s: &str| s.trim().trim_end_matches('/').to_ascii_lowercase();
    let Some(base) = adapter_base.map(str::trim).filter(|b| !b.is_empty()) else {
        return Ok(Some(format!(
            "model.adapter `{adapter_id}`: {ADAPTER_CONFIG} names no base_model_name_or_path, \
             so it cannot be checked that the adapter was trained on [model] `{model_id}`"
        )));
    };
    // A legacy id without an organisation (`gpt2`) is the hub's redirect to the organisation's
    // repo (`openai-community/gpt2`): compare names alone then.
    let name = |s: &str| norm(s).rsplit('/').next().unwrap_or_default().to_string();
    let legacy = !base.contains('/') || !model_id.contains('/');
    if norm(base) == norm(model_id) || (legacy && name(base) == name(model_id)) {
        return Ok(None);
    }
    if !is_repo_id(base) {
        return Ok(Some(format!(
            "model.adapter `{adapter_id}` was trained over the folder `{base}` (its \
             base_model_name_or_path); make sure [model] `{model_id}` holds the same weights: \
             an adapter over other weights loads but its attribution means nothing"
        )));
    }
    if model_is_local {
        return Ok(Some(format!(
            "model.adapter `{adapter_id}` was trained on `{base}`; [model] is the local folder \
             `{model_id}`, which is taken to hold the weights of `{base}`"
        )));
    }
    if allow_other_base {
        return Ok(Some(format!(
            "model.adapter `{adapter_id}` was trained on `{base}`, not [model] `{model_id}`; \
             used anyway (model.adapter.allow_other_base = true)"
        )));
    }
    Err(Error::Fetch(format!(
        "model.adapter `{adapter_id}` was trained on `{base}` (base_model_name_or_path in its \
         {ADAPTER_CONFIG}), but [model] id = `{model_id}`. An adapter's matrices mean something \
         only over the weights they were trained on, and a wrong base of the same shapes would \
         load and give meaningless scores. Set [model] id = \"{base}\"; or, if `{model_id}` \
         holds the same weights (a mirror or a copy), set model.adapter.allow_other_base = true"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn adapter_files_are_the_two_peft_files_and_misses_advise() {
        let n = names(&[
            "README.md",
            ADAPTER_WEIGHTS,
            ADAPTER_CONFIG,
            "training_args.bin",
        ]);
        assert_eq!(
            adapter_files(&n, "o/a").unwrap(),
            [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        );
        let e = adapter_files(&names(&[ADAPTER_CONFIG, "adapter_model.bin"]), "o/a")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`o/a` has no `adapter_model.safetensors`")
                && e.contains("safe_serialization"),
            "{e}"
        );
        let e = adapter_files(&names(&["config.json", "model.safetensors"]), "o/m")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no `adapter_config.json`") && e.contains("[model] id"),
            "{e}"
        );
    }

    #[test]
    fn the_base_must_be_the_configured_model_or_say_why_not() {
        let check = |base: Option<&str>, model: &str, local: bool, allow: bool| {
            check_adapter_base("o/ad", base, model, local, allow)
        };
        // Same repo, up to case and a trailing slash; a legacy id without its organisation.
        assert_eq!(
            check(Some("Org/Base/"), "org/base", false, false).unwrap(),
            None
        );
        assert_eq!(
            check(Some("gpt2"), "openai-community/gpt2", false, false).unwrap(),
            None
        );
        assert!(check(Some("gpt2"), "openai-community/gpt2-medium", false, false).is_err());
        // Another hub repo: refused with both names and both fixes; allowed on request.
        let e = check(Some("org/base-instruct"), "org/base", false, false)
            .unwrap_err()
            .to_string();
        for want in [
            "`org/base-instruct`",
            "`org/base`",
            "allow_other_base",
            "[model] id = \"org/base-instruct\"",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(check(Some("org/other"), "org/base", false, true)
            .unwrap()
            .unwrap()
            .contains("allow_other_base = true"));
        // Not comparable: warned, not refused.
        for (base, model, local) in [
            (None, "org/base", false),
            (Some(""), "org/base", false),
            (Some("/home/me/llama"), "org/base", false),
            (Some("../base"), "org/base", false),
            (Some("org/base"), "/models/base", true),
        ] {
            let w = check(base, model, local, false).unwrap();
            assert!(w.is_some_and(|w| w.contains("o/ad")), "{base:?} {model}");
        }
    }
}
