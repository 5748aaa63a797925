//! Owns pipeline files (`pipelines/*.toml`): `Pipeline` and the stage order `STAGE_ORDER`.
//! Layer: ground — may import error, util and, in this folder, load.rs.
//!
//! Pipeline files (`pipelines/*.toml`): a config and the ordered stages to run.
//!
//! ```toml
//! config = "../configs/demo.toml"   # relative to this file
//! stages = ["fetch", "prepare"]
//! run_dir = "../runs/demo"          # optional; default runs/<pipeline name> in the current folder
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::read_toml;
use crate::error::{Error, Result};

/// The canonical order of every stage the pipeline knows. The one place it is written: the
/// stage registry (`pipeline::Registry`) arranges the implemented stages in this order and
/// refuses a set of stages that differs from it.
pub const STAGE_ORDER: [&str; 10] = [
    "fetch",
    "prepare",
    "finetune",
    "fit",
    "index",
    "query",
    "score",
    "eval-recall",
    "eval-lds",
    "report",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    config: PathBuf,
    stages: Vec<String>,
    #[serde(default)]
    run_dir: Option<PathBuf>,
    #[serde(default)]
    description: Option<String>,
}

/// A parsed pipeline: which config, which stages in which order, and the default run folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// The pipeline file itself.
    pub path: PathBuf,
    /// The config file it names (absolute).
    pub config: PathBuf,
    /// Stage names, in execution order.
    pub stages: Vec<String>,
    /// Run directory (absolute); `None` means `runs/<pipeline name>` in the current folder.
    pub run_dir: Option<PathBuf>,
    /// Free text shown by `--help`-like listings.
    pub description: Option<String>,
}

impl Pipeline {
    /// Reads and validates a pipeline file: the stages must be known, unique, and in the
    /// pipeline's canonical order (fetch, prepare, finetune, fit, query, score, report).
    pub fn load(path: &Path) -> Result<Pipeline> {
        let path = crate::util::fsx::clean_path(path);
        let raw: PipelineFile = read_toml(&path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if raw.stages.is_empty() {
            return Err(Error::config(
                &path,
                "key `stages`: is empty; list the stages to run, e.g. [\"fetch\", \"prepare\"]",
            ));
        }
        let order = STAGE_ORDER;
        let mut last = None;
        for s in &raw.stages {
            let Some(pos) = order.iter().position(|o| o == s) else {
                return Err(Error::config(
                    &path,
                    format!(
                        "key `stages`: unknown stage `{s}`; allowed: {}",
                        order.join(", ")
                    ),
                ));
            };
            if let Some(prev) = last {
                if pos <= prev {
                    return Err(Error::config(
                        &path,
                        format!(
                            "key `stages`: `{s}` is listed twice or out of order; stages run in \
                             the order {}",
                            order.join(" → ")
                        ),
                    ));
                }
            }
            last = Some(pos);
        }
        Ok(Pipeline {
            config: crate::util::fsx::clean_path(&base.join(&raw.config)),
            stages: raw.stages,
            run_dir: raw
                .run_dir
                .map(|d| crate::util::fsx::clean_path(&base.join(d))),
            description: raw.description,
            path,
        })
    }

    /// The pipeline's name (its file stem).
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".to_string())
    }
}
