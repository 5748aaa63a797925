//! Owns named query sets: their names, folders and manifest record names.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`.
//!
//! A named query set is a second (third, …) list of queries scored against one fitted run:
//! its `query` and `score` stages run again for the set alone, reading the run's `fetch`,
//! `prepare`, `finetune` and `fit` as they are. Each instance writes beside the default one,
//! `RUN_DIR/STAGE/query_set=NAME/`, and is recorded in the manifest as `STAGE/query_set=NAME`
//! with its own inputs, so sets come and go without touching each other or the default set.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::DatasetConfig;
use crate::error::{Error, Result};

use super::manifest::{Manifest, StageStatus};
use super::rundir::RunDir;

/// The stages that run once per query set (the others are shared by every set).
pub const QUERY_SET_STAGES: [&str; 2] = ["query", "score"];

/// The folder prefix of a set inside a per-set stage's folder.
const PREFIX: &str = "query_set=";

/// The name of the config's own queries in the scores dataset (`score/query_set=default/`);
/// no named set may take it.
pub const DEFAULT_SET: &str = "default";

/// One named query set: where its queries come from and how they are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySet {
    /// The set's name (letters, digits, `_`, `-`, `.`).
    pub name: String,
    /// How its rows are read and tokenised (a `[data.query]` table for the set's file).
    pub data: DatasetConfig,
    /// The files the queries are read from, with their sha256.
    pub files: Vec<(PathBuf, String)>,
    /// Further settings its queries depend on that the `query` stage's config view leaves
    /// out for the default set (the `[query]` generation settings and seed of a prompt-only
    /// set); part of [`QuerySet::spec_hash`].
    #[serde(default)]
    pub settings: serde_json::Value,
}

impl QuerySet {
    /// SHA-256 over everything that defines the set (its data settings and file contents):
    /// the `query_set:NAME` input of its `query` stage.
    pub fn spec_hash(&self) -> String {
        crate::util::hash::sha256_json(&serde_json::to_value(self).expect("query set serialises"))
    }
}

/// Checks a set name: non-empty letters, digits, `_`, `-`, `.` (not starting with `.`), since
/// it names folders (`score/query_set=NAME/`).
pub fn check_set_name(name: &str) -> Result<()> {
    if name == DEFAULT_SET {
        return Err(Error::Pipeline(format!(
            "query set name `{name}` is taken by the config's own queries (their scores are \
             in score/query_set={DEFAULT_SET}/); choose another name"
        )));
    }
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Pipeline(format!(
            "query set name `{name}` is not allowed; allowed: letters, digits, `_`, `-` and `.` \
             (not first), since it names the folders STAGE/query_set=NAME/"
        )))
    }
}

/// The manifest record name of `stage` for set `set` (`score/query_set=NAME`), or the stage's
/// own name for the default set.
pub fn record_name(stage: &str, set: Option<&str>) -> String {
    match set {
        Some(s) if QUERY_SET_STAGES.contains(&stage) => format!("{stage}/{PREFIX}{s}"),
        _ => stage.to_string(),
    }
}

/// The folder of `stage`'s outputs for set `set` (`RUN_DIR/score/query_set=NAME/`), or the
/// stage's folder for the default set.
pub fn set_dir(run: &RunDir, stage: &str, set: Option<&str>) -> PathBuf {
    run.path().join(record_name(stage, set))
}

/// The scores dataset folder of set `set` (`RUN_DIR/score/query_set=NAME/`, with
/// [`DEFAULT_SET`] for the config's own queries), holding `shard=I/part-*.parquet`. Every set's
/// folder sits side by side in `score/`, so `score/query_set=*/shard=*/*.parquet` read with
/// hive partitioning is every set's scores as one table.
pub fn scores_root(run: &RunDir, set: Option<&str>) -> PathBuf {
    run.stage_dir("score")
        .join(format!("{PREFIX}{}", set.unwrap_or(DEFAULT_SET)))
}

/// Where set `set`'s `score` stage writes its scores dataset inside its own output folder:
/// `query_set=default/` for the default set (whose folder is `score/`), the folder itself for
/// a named set (whose folder is `score/query_set=NAME/`); see [`scores_root`].
pub fn scores_root_in_stage(set: Option<&str>) -> PathBuf {
    match set {
        Some(_) => PathBuf::new(),
        None => PathBuf::from(format!("{PREFIX}{DEFAULT_SET}")),
    }
}

/// Whether `entry` (a file name inside a per-set stage's folder) is a named set's folder, which
/// the default instance of the stage keeps when it reruns (the default set's own scores
/// folder, `query_set=default`, is the default instance's output).
pub fn is_set_folder(entry: &str) -> bool {
    entry.starts_with(PREFIX) && entry != format!("{PREFIX}{DEFAULT_SET}")
}

/// The names of the sets whose `stage` has a complete record in `manifest`, in name order.
pub fn complete_sets(manifest: &Manifest, stage: &str) -> Vec<String> {
    let prefix = format!("{stage}/{PREFIX}");
    manifest
        .stages
        .iter()
        .filter(|(_, r)| r.status == StageStatus::Complete)
        .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_are_checked_and_name_records_and_folders() {
        for ok in ["demo", "v2.1", "a_b-c"] {
            check_set_name(ok).unwrap();
        }
        for bad in ["", ".x", "a/b", "a b", "..", "é"] {
            let e = check_set_name(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}` is not allowed")), "{e}");
        }
        assert_eq!(record_name("score", Some("x")), "score/query_set=x");
        assert_eq!(record_name("score", None), "score");
        assert_eq!(
            record_name("fit", Some("x")),
            "fit",
            "fit is shared by every set"
        );
        assert!(is_set_folder("query_set=x") && !is_set_folder("token_scores.parquet"));
        assert!(
            !is_set_folder("query_set=default"),
            "the default set's own scores"
        );
        let e = check_set_name("default").unwrap_err().to_string();
        assert!(e.contains("taken by the config's own queries"), "{e}");
    }
}
