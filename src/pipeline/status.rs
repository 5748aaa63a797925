//! Owns the rows of `source-tda status`: each recorded stage's state and timings.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`, `runner`, `stage`.
//!
//! `source-tda status`: what is done in a run directory, how long it took, and what is stale.

use std::path::Path;

use crate::config::{Config, STAGE_ORDER};
use crate::error::Result;

use super::manifest::StageStatus;
use super::rundir::RunDir;
use super::runner::{stage_key, staleness};
use super::stage::Registry;

/// One line of the status table.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    /// Stage name.
    pub stage: String,
    /// `complete`, `stale (why)`, `failed`, `interrupted`, or `not run`.
    pub state: String,
    /// Wall-clock seconds of the last run.
    pub wall_s: Option<f64>,
    /// Peak RSS of the last run, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// When it last finished.
    pub finished_at: Option<String>,
}

impl StatusRow {
    /// One word for scripts: `complete`, `stale`, `failed`, `interrupted` (or running now).
    pub fn kind(&self) -> &'static str {
        ["complete", "stale", "failed", "interrupted"]
            .into_iter()
            .find(|w| self.state.starts_with(w))
            .unwrap_or("unknown")
    }
}

/// The status of every stage recorded in `run`, in pipeline order; staleness is judged by
/// the stages of `registry`.
pub fn status_rows(registry: &Registry, run: &RunDir) -> Result<Vec<StatusRow>> {
    let manifest = run.manifest()?;
    let config_path = run.config_path();
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| crate::Error::io("reading", &config_path, e))?;
    let config = Config::from_str_at(&text, &config_path, Path::new("/"))?;
    let mut rows = Vec::new();
    for name in STAGE_ORDER {
        let Some(record) = manifest.stages.get(name) else {
            continue;
        };
        let state = match record.status {
            StageStatus::Running => "interrupted (or running now)".to_string(),
            StageStatus::Failed => format!(
                "failed: {}",
                record.error.as_deref().unwrap_or("unknown error")
            ),
            StageStatus::Complete => match registry.find(name) {
                Ok(stage) => match stage_key(stage, &config, &manifest) {
                    Ok(key) => match staleness(stage, run, record, &key)? {
                        None => "complete".to_string(),
                        Some(why) => format!("stale: {why}"),
                    },
                    Err(_) => "stale: an upstream stage is no longer complete".to_string(),
                },
                Err(_) => "complete (stage not known to this version)".to_string(),
            },
        };
        rows.push(StatusRow {
            stage: name.to_string(),
            state,
            wall_s: record.wall_s,
            peak_rss_bytes: record.peak_rss_bytes,
            finished_at: record.finished_at.clone(),
        });
    }
    Ok(rows)
}
