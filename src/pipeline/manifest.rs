//! Owns `manifest.json`: the per-stage records and the hashes that decide reuse.
//! Layer: pipeline — may import ground (error, util, config, output) only; no sibling.
//!
//! The run manifest (`manifest.json`): per stage its status, timings, peak memory, versions,
//! and the hashes that decide whether a later run may reuse its artifacts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::util::fsx::write_json_atomic;

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Started and not finished: either running now or interrupted. Never trusted.
    Running,
    /// Finished; its directory is complete.
    Complete,
    /// Failed with an error (recorded in `error`).
    Failed,
}

/// One file a stage wrote, relative to the run directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to the run directory.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// The record of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Status.
    pub status: StageStatus,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time (absent while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Wall-clock seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_s: Option<f64>,
    /// Peak resident memory of the process during the stage, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// source-tda version that ran it.
    pub tool_version: String,
    /// Git commit the binary was built from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    /// SHA-256 of the part of the config this stage depends on.
    pub config_hash: String,
    /// SHA-256 over `inputs`.
    pub inputs_hash: String,
    /// Each input the stage read (upstream stage outputs, external files) and its hash.
    pub inputs: BTreeMap<String, String>,
    /// Files the stage produced.
    #[serde(default)]
    pub outputs: Vec<OutputFile>,
    /// Stage-specific summary (counts, resolved revisions, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub summary: serde_json::Value,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StageRecord {
    /// SHA-256 over all of this stage's outputs: what downstream stages record as their input.
    pub fn outputs_hash(&self) -> String {
        let v = serde_json::to_value(&self.outputs).expect("outputs serialise");
        crate::util::hash::sha256_json(&v)
    }
}

/// The manifest of a run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `source-tda`.
    pub tool: String,
    /// The run directory's format ([`crate::FORMAT_VERSION`] of the build that created it;
    /// manifests from before the field existed are format 1). Another format is refused.
    #[serde(default = "first_format")]
    pub format_version: u32,
    /// Version of the tool that created the run directory.
    pub created_by_version: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// The config file the run was made from (as given by the user).
    pub config_path: String,
    /// SHA-256 of the resolved config.
    pub config_hash: String,
    /// Stages by name.
    #[serde(default)]
    pub stages: BTreeMap<String, StageRecord>,
}

impl Manifest {
    /// A fresh manifest.
    pub fn new(config_path: &Path, config_hash: String) -> Manifest {
        Manifest {
            tool: "source-tda".to_string(),
            format_version: crate::FORMAT_VERSION,
            created_by_version: crate::VERSION.to_string(),
            created_at: crate::util::now_rfc3339(),
            config_path: config_path.display().to_string(),
            config_hash,
            stages: BTreeMap::new(),
        }
    }

    /// Reads `manifest.json`. A run directory of another format ([`crate::FORMAT_VERSION`])
    /// is refused with advice before anything else in it is read.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        let invalid = |e: &dyn std::fmt::Display| {
            Error::Pipeline(format!(
                "{}: not a valid source-tda manifest ({e}); if the run directory is damaged, \
                 remove it or choose another --run-dir",
                path.display()
            ))
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&e))?;
        let format = match value.get("format_version") {
            None => first_format(),
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| invalid(&format!("`format_version` is {v}, not a whole number")))?,
        };
        check_format(path, format)?;
        serde_json::from_value(value).map_err(|e| invalid(&e))
    }

    /// Writes `manifest.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_atomic(path, self)
    }
}

/// The format of manifests written before `format_version` existed (the same layout).
fn first_format() -> u32 {
    1
}

/// Refuses a run directory (whose manifest is `path`) of another format than this build's.
fn check_format(path: &Path, format: u32) -> Result<()> {
    if format == crate::FORMAT_VERSION {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let newer = if format > crate::FORMAT_VERSION {
        format!(" (or read it with a newer source-tda, one that reads format {format})")
    } else {
        String::new()
    };
    Err(Error::Pipeline(format!(
        "run directory {} was written by format {format}, this build reads format {}: rerun \
         into a new --run-dir or delete it{newer}",
        dir.display(),
        crate::FORMAT_VERSION
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_records_its_format_and_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        let m = Manifest::new(Path::new("c.toml"), "h".into());
        m.save(&path).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["format_version"], crate::FORMAT_VERSION);
        assert_eq!(Manifest::load(&path).unwrap(), m);

        // Written before the field existed: format 1, which this build (format 2 and later:
        // the partitioned scores) refuses like any other format.
        v.as_object_mut().unwrap().remove("format_version");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("was written by format 1, this build reads format"),
            "{e}"
        );

        for other in [crate::FORMAT_VERSION + 1, 0] {
            v["format_version"] = other.into();
            // Even a layout this build cannot parse is refused by its format first.
            v["stages"] = serde_json::json!(["not", "a", "map"]);
            std::fs::write(&path, v.to_string()).unwrap();
            let e = Manifest::load(&path).unwrap_err().to_string();
            let want = format!(
                "run directory {} was written by format {other}, this build reads format {}: \
                 rerun into a new --run-dir or delete it",
                dir.path().display(),
                crate::FORMAT_VERSION
            );
            assert!(e.contains(&want), "{e}");
        }
        v["format_version"] = "two".into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("`format_version` is \"two\", not a whole number"),
            "{e}"
        );
    }
}
