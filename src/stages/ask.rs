//! Owns `source-tda ask`: scoring a file of new prompts as a named query set of a finished run.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no
//! sibling.
//!
//! `ask` reads a file of queries (JSONL, CSV or Parquet, as `[data.query]` reads them: rows of
//! a prompt, or of a prompt and a completion), defines the named query set from it and runs
//! the set's `query` and `score` stages (`RUN_DIR/{query,score}/query_set=NAME/`) on the run's
//! fetched model, fine-tune and fitted curvature, which are reused as they are; then the
//! report, which lists every set. Asking again with an unchanged file skips what is done.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{Config, DataFormat, DatasetConfig, DocShape, SourceKind};
use crate::data::read::read_rows;
use crate::error::{Error, Result};
use crate::hub::{resolve_dataset, HubSettings, RepoKind, RepoRequest};
use crate::pipeline::{
    check_set_name, run_stages_for, set_dir, Outcome, QuerySet, Registry, RunDir, RunOptions,
    StageStatus,
};

/// What `ask` did.
#[derive(Debug, Clone)]
pub struct Asked {
    /// The set's definition.
    pub set: QuerySet,
    /// Each stage run or skipped, by record name (`score/query_set=NAME`).
    pub outcomes: Vec<(String, Outcome)>,
    /// `RUN_DIR/score/query_set=NAME/`, the set's score tables.
    pub scores_dir: PathBuf,
}

/// Scores the queries of `prompts` as query set `name` (default: the file's stem) of the
/// finished run in `run`, with the run's stored config.
pub fn ask(
    registry: &Registry,
    run: &RunDir,
    prompts: &Path,
    name: Option<&str>,
    opts: &RunOptions,
) -> Result<Asked> {
    let manifest = run.manifest()?;
    let config_file = run.config_path();
    let config = Config::load(&config_file)?;
    let set = define_set(&config, prompts, name)?;
    let mut stages = vec!["query".to_string(), "score".to_string()];
    // The report lists the sets; it is brought up to date when the run has one.
    let reported = ["score", "report"].iter().all(|s| {
        manifest
            .stages
            .get(*s)
            .is_some_and(|r| r.status == StageStatus::Complete)
    });
    if reported {
        stages.push("report".into());
    }
    let outcomes = run_stages_for(
        registry,
        &config,
        &config_file,
        run,
        &stages,
        opts,
        Some(&set),
    )?;
    Ok(Asked {
        scores_dir: set_dir(run, "score", Some(&set.name)),
        set,
        outcomes,
    })
}

/// The query set of `prompts`: read as the run's `[data.query]` reads its file (columns,
/// template, lengths; defaults without one), with the shape taken from the rows (all with a
/// completion: `prompt_completion`; none: `prompt`, completed by the model) and ids from the
/// id column when every row has one.
pub fn define_set(config: &Config, prompts: &Path, name: Option<&str>) -> Result<QuerySet> {
    if !prompts.is_file() {
        return Err(Error::Data(format!(
            "--prompts {}: not a file; give a JSONL, CSV or Parquet file of queries (a `prompt` \
             column, and a `completion` column to explain a given answer)",
            prompts.display()
        )));
    }
    let path = std::path::absolute(prompts).map_err(|e| Error::io("resolving", prompts, e))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    check_set_name(&name)?;
    let mut data: DatasetConfig = match &config.data.query {
        Some(q) => q.clone(),
        None => serde_json::from_value(json!({"id": ""})).expect("a data set with an id"),
    };
    data.id = path.display().to_string();
    data.source = SourceKind::Local;
    data.split = name.clone();
    data.files = None;
    data.config = None;
    data.format = DataFormat::Auto;
    data.max_documents = None;
    data.shape = infer_shape(&path, &data)?;
    data.id_column = [data.id_column.clone(), Some("id".to_string())]
        .into_iter()
        .flatten()
        .find(|c| every_row_has(&path, c).unwrap_or(false));
    let repo = resolve_dataset(
        &HubSettings::from_config(&config.hub),
        &RepoRequest {
            kind: RepoKind::Dataset,
            id: &data.id,
            revision: &data.revision,
            source: data.source,
        },
        &data,
    )
    .map_err(|e| Error::Data(format!("--prompts {}: {e}", path.display())))?;
    let settings = match data.shape {
        DocShape::Prompt => json!({"generate": config.query, "seed": config.run.seed}),
        _ => serde_json::Value::Null,
    };
    Ok(QuerySet {
        name,
        files: repo
            .files
            .iter()
            .map(|f| (f.path.clone(), f.sha256.clone()))
            .collect(),
        data,
        settings,
    })
}

/// `prompt_completion` when every row has a non-empty completion, `prompt` when none has.
fn infer_shape(path: &Path, data: &DatasetConfig) -> Result<DocShape> {
    let cols = [data.prompt_column.as_str(), data.completion_column.as_str()];
    let rows = read_rows(path, DataFormat::Auto, &cols, &[true, false])?;
    let with: Vec<&str> = rows
        .iter()
        .filter(|r| r.values[1].as_deref().is_some_and(|c| !c.trim().is_empty()))
        .map(|r| r.location.as_str())
        .collect();
    match with.len() {
        0 => Ok(DocShape::Prompt),
        n if n == rows.len() => Ok(DocShape::PromptCompletion),
        n => Err(Error::Data(format!(
            "{}: {n} of {} rows have a `{}` (the first at {}) and the others have none; a query \
             set is either prompts to complete or prompt + completion pairs: split the file \
             into two sets",
            path.display(),
            rows.len(),
            data.completion_column,
            with[0]
        ))),
    }
}

/// Whether every row of `path` has a value in column `col`.
fn every_row_has(path: &Path, col: &str) -> Result<bool> {
    let rows = read_rows(path, DataFormat::Auto, &[col], &[false])?;
    Ok(!rows.is_empty() && rows.iter().all(|r| r.values[0].is_some()))
}
