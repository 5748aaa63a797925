//! Owns the rows of `source-tda status`: each recorded stage's state and timings.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`, `runner`, `stage`.
//!
//! `source-tda status`: what is done in a run directory, how long it took, and what is stale.

use std::path::Path;

use crate::config::{Config, STAGE_ORDER};
use crate::error::Result;

use super::manifest::StageStatus;
use super::query_set::QUERY_SET_STAGES;
use super::rundir::RunDir;
use super::runner::{stage_key_for, staleness};
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
    // Each stage, then its named query sets' instances (`score/query_set=NAME`).
    let mut names: Vec<(String, &str, Option<&str>)> = Vec::new();
    for name in STAGE_ORDER {
        names.push((name.to_string(), name, None));
        if QUERY_SET_STAGES.contains(&name) {
            let prefix = format!("{name}/query_set=");
            for k in manifest.stages.keys() {
                if let Some(set) = k.strip_prefix(&prefix) {
                    names.push((k.clone(), name, Some(set)));
                }
            }
        }
    }
    for (record_name, name, set) in &names {
        let Some(record) = manifest.stages.get(record_name) else {
            continue;
        };
        let state = match record.status {
            StageStatus::Running => "interrupted (or running now)".to_string(),
            StageStatus::Failed => format!(
                "failed: {}",
                record.error.as_deref().unwrap_or("unknown error")
            ),
            StageStatus::Complete => match registry.find(name) {
                Ok(stage) => match stage_key_for(stage, &config, &manifest, *set).map(|k| {
                    // A set's definition (its prompts file) is judged by `ask`, not here.
                    let spec = set.map(|s| format!("query_set:{s}"));
                    match spec.and_then(|n| record.inputs.get(&n).map(|h| (n, h.clone()))) {
                        Some((n, h)) => k.with_input(n, h),
                        None => k,
                    }
                }) {
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
            stage: record_name.clone(),
            state,
            wall_s: record.wall_s,
            peak_rss_bytes: record.peak_rss_bytes,
            finished_at: record.finished_at.clone(),
        });
    }
    Ok(rows)
}
