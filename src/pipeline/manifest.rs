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
            created_by_version: crate::VERSION.to_string(),
            created_at: crate::util::now_rfc3339(),
            config_path: config_path.display().to_string(),
            config_hash,
            stages: BTreeMap::new(),
        }
    }

    /// Reads `manifest.json`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).ctx("reading", path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Pipeline(format!(
                "{}: not a valid source-tda manifest ({e}); if the run directory is damaged, \
                 remove it or choose another --run-dir",
                path.display()
            ))
        })
    }

    /// Writes `manifest.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_atomic(path, self)
    }
}
