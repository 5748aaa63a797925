//! Owns which files of a repo or folder a model or a dataset needs (`model_files`, …).
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder,
//! configs.rs.

use std::path::Path;

use crate::config::{DataFormat, DatasetConfig};
use crate::data::read::format_of;

use super::configs::config_splits;
use crate::error::{Error, Result};

/// Optional model files taken when present (`training/*`: a recorded pretraining
/// trajectory and AdamW's second moments, for `[pretrain] lr_mass = "from_model"`).
const MODEL_EXTRAS: [&str; 6] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training/trajectory.json",
    "training/optimizer.safetensors",
];

/// The files of a model among `names`: `config.json`, `tokenizer.json`, the safetensors
/// weights (a sharded checkpoint's index and every shard it names, else `model.safetensors`,
/// else every top-level `*.safetensors`), and the optional extras present. `root` is where
/// the index can be read (for sharded checkpoints).
pub fn model_files(names: &[String], root: &Path, id: &str) -> Result<Vec<String>> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let listing = || {
        let mut shown: Vec<&str> = names.iter().map(String::as_str).take(30).collect();
        if names.len() > 30 {
            shown.push("…");
        }
        shown.join(", ")
    };
    let mut out = Vec::new();
    for required in ["config.json", "tokenizer.json"] {
        if !has(required) {
            return Err(Error::Fetch(format!(
                "model `{id}` has no `{required}` (files: {}); a model needs config.json, \
                 tokenizer.json and safetensors weights",
                listing()
            )));
        }
        out.push(required.to_string());
    }
    let index = "model.safetensors.index.json";
    if has(index) {
        out.push(index.to_string());
        let index_path = root.join(index);
        // Online, the index may not be downloaded yet; the caller downloads it first.
        let shards = if index_path.exists() {
            shards_of_index(&index_path)?
        } else {
            return Err(Error::Fetch(format!(
                "model `{id}`: `{index}` is listed but not present at {}; download it first",
                index_path.display()
            )));
        };
        for shard in shards {
            if !has(&shard) {
                return Err(Error::Fetch(format!(
                    "model `{id}`: `{index}` names shard `{shard}`, which the repo does not have \
                     (files: {}); the checkpoint is incomplete",
                    listing()
                )));
            }
            out.push(shard);
        }
    } else if has("model.safetensors") {
        out.push("model.safetensors".to_string());
    } else {
        let top: Vec<String> = names
            .iter()
            .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
            .cloned()
            .collect();
        if top.is_empty() {
            let bin = names
                .iter()
                .any(|n| n.ends_with(".bin") || n.ends_with(".pt"));
            return Err(Error::Fetch(format!(
                "model `{id}` has no safetensors weights (files: {}){}",
                listing(),
                if bin {
                    "; it has PyTorch .bin weights: convert them once with \
                     `transformers`' `model.save_pretrained(dir, safe_serialization=True)` and \
                     point [model] id at that folder"
                } else {
                    ""
                }
            )));
        }
        out.extend(top);
    }
    for extra in MODEL_EXTRAS {
        if has(extra) {
            out.push(extra.to_string());
        }
    }
    Ok(out)
}

/// The shard file names a `model.safetensors.index.json` maps tensors to, sorted, unique.
pub fn shards_of_index(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Fetch(format!("{}: not valid JSON: {e}", path.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::Fetch(format!(
            "{}: no `weight_map` object; a sharded safetensors index maps tensor names to shard \
             files",
            path.display()
        ))
        })?;
    let mut shards: Vec<String> = map
        .values()
        .map(|v| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                Error::Fetch(format!(
                    "{}: `weight_map` values must be file names",
                    path.display()
                ))
            })
        })
        .collect::<Result<_>>()?;
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// The data files among `names` for the dataset's explicit `files`, or for its `config` and
/// `split` as the `datasets` library selects them ([`config_splits`]) from the names and the
/// dataset card `readme` (README.md's text, when the repo has one). With `format` set, only
/// files of that format are kept. Every file must be one this crate reads (JSONL, JSON, CSV,
/// Parquet).
pub fn dataset_files(
    names: &[String],
    ds: &DatasetConfig,
    id: &str,
    readme: Option<&str>,
) -> Result<Vec<String>> {
    let shown = || {
        let data: Vec<&str> = names
            .iter()
            .filter(|n| format_of(n, DataFormat::Auto).is_some())
            .map(String::as_str)
            .take(30)
            .collect();
        if data.is_empty() {
            "none".to_string()
        } else {
            data.join(", ")
        }
    };
    if let Some(files) = &ds.files {
        for f in files {
            if !names.iter().any(|n| n == f) {
                return Err(Error::Fetch(format!(
                    "dataset `{id}`: file `{f}` from `files` is not there; data files present: {}",
                    shown()
                )));
            }
        }
        return Ok(files.clone());
    }
    let spec = ds
        .split_spec()
        .map_err(|e| Error::Fetch(format!("dataset `{id}`: split {e}")))?;
    let split = spec.name.as_str();
    let config = config_splits(names, readme, ds.config.as_deref())
        .map_err(|e| Error::Fetch(format!("dataset `{id}`: {e}")))?;
    // Only for a dataset read without a config: a named config's splits are its own.
    let named = match ds.config {
        None => named_split(names, split),
        Some(_) => Vec::new(),
    };
    let found = config
        .splits
        .iter()
        .find(|(s, _)| s == split)
        .map(|(_, f)| f)
        .or_else(|| {
            (!named.is_empty()).then(|| {
                tracing::info!(
                    "dataset `{id}`: `{split}` is not a split the `datasets` library finds; \
                     taking the files named after it: {}",
                    named.join(", ")
                );
                &named
            })
        });
    let Some(files) = found else {
        let splits: Vec<&str> = config.splits.iter().map(|(s, _)| s.as_str()).collect();
        return Err(Error::Fetch(format!(
            "dataset `{id}` (config `{}`): no split `{split}`; its splits are: {}. Set `split` \
             to one of them (a split is found as the `datasets` library finds it: shard names \
             `data/SPLIT-00000-of-0000N.*`, folders or file names with `train`/`training`, \
             `validation`/`valid`/`dev`/`val`, `test`/`testing`/`eval`/`evaluation`, or the \
             dataset card's `configs:`), or list the files in `files`",
            config.name,
            splits.join(", ")
        )));
    };
    let out: Vec<String> = files
        .iter()
        .filter(|n| {
            ds.format == DataFormat::Auto || format_of(n, DataFormat::Auto) == Some(ds.format)
        })
        .cloned()
        .collect();
    if out.is_empty() {
        return Err(Error::Fetch(format!(
            "dataset `{id}` (config `{}`): split `{split}` has no {:?} file (its files: {}); \
             remove `format` or change it",
            config.name,
            ds.format,
            files.join(", ")
        )));
    }
    if let Some(bad) = out
        .iter()
        .find(|n| format_of(n, DataFormat::Auto).is_none())
    {
        return Err(Error::Fetch(format!(
            "dataset `{id}` (config `{}`): split `{split}` is made of files like `{bad}`, a \
             format this tool does not read (it reads .jsonl, .json, .ndjson, .csv and .parquet); \
             use the hub's Parquet conversion (`revision = \"refs/convert/parquet\"`) or convert \
             the files",
            config.name
        )));
    }
    Ok(out)
}

/// Data files named after `split` that the `datasets` rules do not make a split of: file
/// stem `split` (`data/queries.jsonl` for `queries`) or a folder `split/` (the layout earlier
/// versions of this tool, and datasets made for it, name custom splits by).
fn named_split(names: &[String], split: &str) -> Vec<String> {
    names
        .iter()
        .filter(|n| format_of(n, DataFormat::Auto).is_some())
        .filter(|n| {
            let path = Path::new(n.as_str());
            let stem = path.file_stem().and_then(|s| s.to_str());
            let folder = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|s| s.to_str());
            stem == Some(split) || folder == Some(split)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(split: &str) -> DatasetConfig {
        let text = format!("id = \"x/y\"\nsplit = \"{split}\"\n");
        toml::from_str(&text).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn split_by_folder_and_by_name() {
        let n = names(&[
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "default/train/0000.parquet",
            "trainer.jsonl",
            "train.jsonl",
        ]);
        // Shard names win over every other file, as in `datasets`.
        let got = dataset_files(&n, &ds("train[:10]"), "x/y", None).unwrap();
        assert_eq!(
            got,
            names(&[
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
            ])
        );
        let got = dataset_files(&n, &ds("test"), "x/y", None).unwrap();
        assert_eq!(got, names(&["data/test-00000-of-00001.parquet"]));
    }

    #[test]
    fn a_custom_split_is_the_file_named_after_it() {
        let n = names(&[
            "README.md",
            "data/train-00000-of-00001.parquet",
            "data/queries.jsonl",
            "data/pretrain.jsonl",
            "extra/0000.parquet",
        ]);
        let got = dataset_files(&n, &ds("queries"), "x/y", None).unwrap();
        assert_eq!(got, names(&["data/queries.jsonl"]));
        let got = dataset_files(&n, &ds("extra"), "x/y", None).unwrap();
        assert_eq!(got, names(&["extra/0000.parquet"]));
        let got = dataset_files(&n, &ds("train"), "x/y", None).unwrap();
        assert_eq!(got, names(&["data/train-00000-of-00001.parquet"]));
    }

    #[test]
    fn missing_split_lists_files() {
        let n = names(&["train.jsonl", "test.jsonl"]);
        let e = dataset_files(&n, &ds("validation"), "x/y", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no split `validation`"), "{e}");
        assert!(e.contains("train, test"), "{e}");
    }

    #[test]
    fn model_without_weights_explains_bin() {
        let n = names(&["config.json", "tokenizer.json", "pytorch_model.bin"]);
        let e = model_files(&n, Path::new("/nonexistent"), "a/b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no safetensors weights"), "{e}");
        assert!(e.contains("safe_serialization"), "{e}");
    }
}
