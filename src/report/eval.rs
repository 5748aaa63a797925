//! Owns reading the eval stages' results: `EvalResults`, `read_recall` and `read_lds`.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! table.rs.
//!
//! The evaluation results the report shows when the `eval-recall` and `eval-lds` stages have
//! completed in the run directory (their contract):
//!
//! * `eval-recall/summary.json`: `{"k": [1, 5, 10], "methods": [{"method", "n_queries",
//!   "recall": {"1": r, …}, "mrr"}]}` — recall@k and mean reciprocal rank of the known
//!   source documents;
//! * `eval-lds/summary.json`: `{"subsets", "alpha", "seeds", "methods": [{"method", "lds",
//!   "ci95": [lo, hi], "per_query": {id: ρ}, "vs": {"method", "difference", "ci95"}}]}` —
//!   the linear datamodeling score (Spearman ρ between predicted and measured losses over
//!   retrained subsets) and, after the first method, the paired difference to it;
//! * `eval-lds/points.parquet`: method, query_id, subset, seed, predicted, measured.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

use super::table::Table;

/// The `eval-recall` stage's name (its folder in the run directory).
pub const RECALL_STAGE: &str = "eval-recall";
/// The `eval-lds` stage's name.
pub const LDS_STAGE: &str = "eval-lds";

/// `eval-recall/summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallSummary {
    /// The cut-offs k of recall@k.
    pub k: Vec<u32>,
    /// One entry per attribution method.
    pub methods: Vec<RecallMethod>,
}

/// Recall results of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallMethod {
    /// `source`, `influence`, `gradient_dot`, …
    pub method: String,
    /// Queries with known sources that were evaluated.
    pub n_queries: u32,
    /// recall@k by k (as a string key).
    pub recall: BTreeMap<String, f64>,
    /// Mean reciprocal rank of the first known source.
    pub mrr: f64,
}

/// `eval-lds/summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LdsSummary {
    /// M, the number of random subsets retrained on.
    pub subsets: u32,
    /// α, the fraction of the fine-tuning set in each subset.
    pub alpha: f64,
    /// R, seeds per subset.
    pub seeds: u32,
    /// One entry per attribution method.
    pub methods: Vec<LdsMethod>,
}

/// LDS of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LdsMethod {
    /// `source`, `influence`, `gradient_dot`, …
    pub method: String,
    /// Mean over queries of the Spearman correlation.
    pub lds: f64,
    /// Bootstrap 95% interval of `lds`.
    pub ci95: [f64; 2],
    /// Spearman correlation per query id.
    #[serde(default)]
    pub per_query: BTreeMap<String, f64>,
    /// This method's LDS minus the first method's, on the same subsets (every method but
    /// the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs: Option<LdsVs>,
}

/// One method's LDS compared with another's on the same retrained subsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LdsVs {
    /// The method compared with (the first in `[eval] methods`).
    pub method: String,
    /// LDS(this) − LDS(`method`).
    pub difference: f64,
    /// Paired bootstrap 95% interval of the difference.
    pub ci95: [f64; 2],
}

/// One row of `eval-lds/points.parquet`: a (method, query, subset, seed) with the predicted
/// and the measured query loss.
#[derive(Debug, Clone, PartialEq)]
pub struct LdsPoint {
    /// The attribution method.
    pub method: String,
    /// The query.
    pub query_id: String,
    /// Subset index.
    pub subset: u32,
    /// Retraining seed.
    pub seed: u32,
    /// Predicted loss (up to a per-query constant).
    pub predicted: f64,
    /// Measured loss of the model retrained on the subset.
    pub measured: f64,
}

/// Everything the evaluation stages left, when they did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalResults {
    /// Recall@k and MRR, when `eval-recall` completed.
    pub recall: Option<RecallSummary>,
    /// LDS, when `eval-lds` completed.
    pub lds: Option<LdsSummary>,
    /// LDS points (empty without `eval-lds`).
    pub points: Vec<LdsPoint>,
}

impl EvalResults {
    /// Whether there is anything to show.
    pub fn is_empty(&self) -> bool {
        self.recall.is_none() && self.lds.is_none()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, stage: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).ctx("reading", path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: does not follow the {stage} summary format ({e}); rerun `{stage}` with this \
             version of the tool",
            path.display()
        ))
    })
}

/// Reads `eval-recall/summary.json` under `dir`.
pub fn read_recall(dir: &Path) -> Result<RecallSummary> {
    read_json(&dir.join("summary.json"), RECALL_STAGE)
}

/// Reads `eval-lds/summary.json` and `eval-lds/points.parquet` (if present) under `dir`.
pub fn read_lds(dir: &Path) -> Result<(LdsSummary, Vec<LdsPoint>)> {
    let summary: LdsSummary = read_json(&dir.join("summary.json"), LDS_STAGE)?;
    let p = dir.join("points.parquet");
    if !p.exists() {
        return Ok((summary, Vec::new()));
    }
    let t = Table::read(&p)?;
    let (method, query, subset, seed, predicted, measured) = (
        t.strings("method")?,
        t.strings("query_id")?,
        t.u32s("subset")?,
        t.u32s("seed")?,
        t.floats("predicted")?,
        t.floats("measured")?,
    );
    let points = (0..t.len())
        .map(|i| LdsPoint {
            method: method[i].clone(),
            query_id: query[i].clone(),
            subset: subset[i],
            seed: seed[i],
            predicted: predicted[i],
            measured: measured[i],
        })
        .collect();
    Ok((summary, points))
}
