//! Owns a dataset repo's configs (subsets) and their splits: `ConfigSplits`, read from the
//! README's YAML `configs:` section, or from a folder, or inferred as `datasets` does.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder,
//! patterns.rs.
//!
//! A dataset card (`README.md`) may start with a YAML header whose `configs:` list declares
//! the subsets: `config_name`, `data_files` (one pattern, a list of patterns — both the
//! `train` split —, or a list of `{split, path}` with `path` one pattern or a list) or
//! `data_dir` (a folder whose splits are inferred), and `default: true` on the one used when
//! none is named. Without that section a config is a folder of the repo (as `data_dir` in
//! `datasets`); `default` is the whole repo.

use crate::error::{Error, Result};

use super::patterns::{
    default_split_patterns, has_magic, infer_module, is_data_file, of_module, resolve,
};

/// One config's splits: each split's data files, relative to the repo root, in the order
/// `datasets` lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSplits {
    /// The config (`default` when the repo has one).
    pub name: String,
    /// Split name → files.
    pub splits: Vec<(String, Vec<String>)>,
}

/// One entry of the README's `configs:` list.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    /// Split → patterns; `None`: inferred from the files under `data_dir`.
    data_files: Option<Vec<(String, Vec<String>)>>,
    data_dir: Option<String>,
    default: bool,
}

/// The YAML header of a dataset card (between the leading `---` lines), as JSON.
fn card_header(readme: &str) -> Result<Option<serde_json::Value>> {
    let text = readme.trim_start_matches('\u{feff}');
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return Ok(None);
    };
    let end = rest
        .lines()
        .scan(0usize, |pos, line| {
            let at = *pos;
            *pos += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, l)| l.trim_end() == "---")
        .map(|(at, _)| at);
    let Some(end) = end else {
        return Ok(None);
    };
    serde_yaml_ng::from_str(&rest[..end])
        .map(Some)
        .map_err(|e| {
            Error::Fetch(format!(
                "README.md: the YAML header is not valid YAML ({e}); fix the dataset card or list \
                 the data files in `files`"
            ))
        })
}

fn strings(v: &serde_json::Value, what: &str) -> Result<Vec<String>> {
    match v {
        serde_json::Value::String(s) => Ok(vec![s.clone()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    Error::Fetch(format!("README.md: {what} must be strings, found {i}"))
                })
            })
            .collect(),
        other => Err(Error::Fetch(format!(
            "README.md: {what} must be a pattern or a list of patterns, found {other}"
        ))),
    }
}

/// `data_files` as `datasets` reads it: split → patterns.
fn split_patterns(v: &serde_json::Value, config: &str) -> Result<Vec<(String, Vec<String>)>> {
    let what = format!("`data_files` of config `{config}`");
    if let Some(map) = v.as_object() {
        return map
            .iter()
            .map(|(k, p)| Ok((k.clone(), strings(p, &what)?)))
            .collect();
    }
    let items = match v.as_array() {
        Some(items) if items.iter().any(|i| i.is_object()) => items,
        _ => return Ok(vec![("train".into(), strings(v, &what)?)]),
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for item in items {
        let split = item.get("split").and_then(|s| s.as_str());
        let (Some(split), Some(path)) = (split, item.get("path")) else {
            return Err(Error::Fetch(format!(
                "README.md: {what} has an entry without `split` and `path` ({item}); each entry is \
                 {{split: NAME, path: PATTERN or [PATTERNS]}}"
            )));
        };
        if out.iter().any(|(s, _)| s == split) {
            return Err(Error::Fetch(format!(
                "README.md: {what} lists split `{split}` twice"
            )));
        }
        out.push((split.to_string(), strings(path, &what)?));
    }
    Ok(out)
}

/// The configs the README declares (empty: it declares none).
fn declared(readme: Option<&str>) -> Result<Vec<Declared>> {
    let Some(header) = readme.map(card_header).transpose()?.flatten() else {
        return Ok(Vec::new());
    };
    let Some(list) = header.get("configs") else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or_else(|| {
        Error::Fetch("README.md: `configs` must be a list of {config_name, data_files}".into())
    })?;
    let mut out = Vec::new();
    for c in list {
        let name = c
            .get("config_name")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let data_files = c
            .get("data_files")
            .map(|v| split_patterns(v, &name))
            .transpose()?;
        out.push(Declared {
            data_dir: c
                .get("data_dir")
                .and_then(|d| d.as_str())
                .map(str::to_string),
            default: c.get("default").and_then(|d| d.as_bool()).unwrap_or(false),
            name,
            data_files,
        });
    }
    Ok(out)
}

/// The names under `base` (`""`: the root), relative to it.
fn under(names: &[String], base: &str) -> Vec<String> {
    if base.is_empty() {
        return names.to_vec();
    }
    let prefix = format!("{}/", base.trim_end_matches('/'));
    names
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// Resolves split → patterns under `base` to split → files (relative to the root).
fn files_of(
    names: &[String],
    base: &str,
    patterns: Vec<(String, Vec<String>)>,
) -> Result<Vec<(String, Vec<String>)>> {
    let rel = under(names, base);
    let join = |f: String| {
        if base.is_empty() {
            f
        } else {
            format!("{}/{f}", base.trim_end_matches('/'))
        }
    };
    let mut out = Vec::new();
    for (split, pats) in patterns {
        let mut files: Vec<String> = Vec::new();
        for p in &pats {
            let found = resolve(p, &rel);
            if found.is_empty() && !has_magic(p) {
                return Err(Error::Fetch(format!(
                    "split `{split}` names the file `{}`, which is not in the repo (or is not a \
                     data file)",
                    join(p.clone())
                )));
            }
            for f in found.into_iter().map(join) {
                if !files.contains(&f) {
                    files.push(f);
                }
            }
        }
        out.push((split, files));
    }
    Ok(out)
}

/// Splits inferred from the files under `base` (no `data_files`), keeping each split's
/// files of the one format inferred over all of them.
fn inferred(names: &[String], base: &str, config: &str) -> Result<Vec<(String, Vec<String>)>> {
    let rel = under(names, base);
    let patterns = default_split_patterns(&rel).ok_or_else(|| {
        Error::Fetch(format!(
            "config `{config}`: no data file under `{}`",
            if base.is_empty() {
                "the repo root"
            } else {
                base
            }
        ))
    })?;
    let splits = files_of(names, base, patterns)?;
    let modules: Vec<Option<&str>> = splits.iter().map(|(_, f)| infer_module(f)).collect();
    let module = modules[0];
    if modules.iter().any(|m| *m != module) {
        return Err(Error::Fetch(format!(
            "config `{config}`: the splits' files are of different formats ({}); `datasets` \
             refuses this too: list the files of the split in `files`",
            splits
                .iter()
                .zip(&modules)
                .map(|((s, _), m)| format!("{s}: {}", m.unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(splits
        .into_iter()
        .map(|(s, f)| {
            let kept = f
                .into_iter()
                .filter(|n| module.is_none_or(|m| of_module(n, m)))
                .collect();
            (s, kept)
        })
        .collect())
}

/// The top-level folders of the repo that hold data files (the configs of a repo without a
/// `configs:` section).
pub fn data_folders(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| is_data_file(n))
        .filter_map(|n| n.split_once('/').map(|(d, _)| d.to_string()))
        .filter(|d| !d.starts_with('.') && !d.starts_with("__"))
        .collect();
    out.dedup();
    out.sort();
    out.dedup();
    out
}

/// The splits of config `config` (`None`: the default one) of a repo with files `names`
/// (relative to its root) and dataset card `readme`, as `datasets`' `load_dataset_builder`
/// finds them.
pub fn config_splits(
    names: &[String],
    readme: Option<&str>,
    config: Option<&str>,
) -> Result<ConfigSplits> {
    let declared = declared(readme)?;
    if declared.is_empty() {
        let base = match config {
            None => "",
            Some("default") if !names.iter().any(|n| n.starts_with("default/")) => "",
            Some(c) => {
                let folders = data_folders(names);
                if !folders.iter().any(|f| f == c) {
                    return Err(Error::Fetch(format!(
                        "config `{c}` is not there: the README declares no `configs:`, so a \
                         config is a folder of the repo, and the folders with data files are: \
                         {}. Set `config` to one of them (or remove it to read the whole repo)",
                        if folders.is_empty() {
                            "none".to_string()
                        } else {
                            folders.join(", ")
                        }
                    )));
                }
                c
            }
        };
        return Ok(ConfigSplits {
            name: config.unwrap_or("default").to_string(),
            splits: inferred(names, base, config.unwrap_or("default"))?,
        });
    }
    let available = || {
        declared
            .iter()
            .map(|d| format!("`{}`", d.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = match config {
        Some(c) => declared.iter().find(|d| d.name == c).ok_or_else(|| {
            Error::Fetch(format!(
                "config `{c}` is not one the README's `configs:` declares; available: {}. Set \
                 `config` to one of them",
                available()
            ))
        })?,
        None => match declared.iter().find(|d| d.default) {
            Some(d) => d,
            None if declared.len() == 1 => &declared[0],
            None => {
                return Err(Error::Fetch(format!(
                    "the dataset has several configs and none is the default; set `config` to \
                     one of {}",
                    available()
                )))
            }
        },
    };
    let base = chosen.data_dir.clone().unwrap_or_default();
    let splits = match &chosen.data_files {
        Some(patterns) => files_of(names, &base, patterns.clone())?,
        None => inferred(names, &base, &chosen.name)?,
    };
    Ok(ConfigSplits {
        name: chosen.name.clone(),
        splits,
    })
}
