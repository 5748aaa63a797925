//! Owns the `fetch` stage and `fetch/resolved.json` (`Fetched`), which later stages read.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no sibling.
//!
//! `fetch`: resolves the model and every data set to local files (hub download, hub cache,
//! or local paths), hashes them, checks the model's files, and records the result in
//! `fetch/resolved.json` for later stages. Nothing is copied: the files stay in the cache or
//! folder they were found in, and later stages read them from there.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::hub::{
    resolve_dataset, resolve_model, verify_model, HubSettings, ModelFacts, RepoKind, RepoRequest,
    ResolvedRepo,
};
use crate::pipeline::{RunDir, Stage, StageContext, StageRecord};
use crate::util::fsx::write_json_atomic;

/// The content of `fetch/resolved.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetched {
    /// The model.
    pub model: ResolvedRepo,
    /// What the checks learned about the model.
    pub model_facts: ModelFacts,
    /// Data sets by role (`train`, `query`, `pretrain`).
    pub data: BTreeMap<String, ResolvedRepo>,
}

impl Fetched {
    /// Reads `RUN_DIR/fetch/resolved.json`.
    pub fn load(run: &RunDir) -> Result<Fetched> {
        let path = run.stage_dir("fetch").join("resolved.json");
        let text = std::fs::read_to_string(&path).ctx("reading", &path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Pipeline(format!(
                "{}: unreadable ({e}); rerun the fetch stage (`--force fetch`)",
                path.display()
            ))
        })
    }

    /// The model's tokenizer.json.
    pub fn tokenizer_path(&self) -> &Path {
        &self
            .model
            .file("tokenizer.json")
            .expect("fetch always resolves tokenizer.json")
            .path
    }
}

/// File stats kept in the manifest summary, to notice files that changed after fetching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileStat {
    path: String,
    bytes: u64,
    mtime_ns: Option<u128>,
}

fn stat(path: &Path) -> Option<FileStat> {
    let m = std::fs::metadata(path).ok()?;
    let mtime_ns = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    Some(FileStat {
        path: path.display().to_string(),
        bytes: m.len(),
        mtime_ns,
    })
}

/// The `fetch` stage.
pub struct FetchStage;

impl Stage for FetchStage {
    fn name(&self) -> &'static str {
        "fetch"
    }

    fn describe(&self) -> &'static str {
        "resolve the model and data sets (hub, hub cache, or local paths) and hash every file"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let data: BTreeMap<&str, serde_json::Value> = c
            .data
            .roles()
            .into_iter()
            .map(|(role, d)| {
                (
                    role,
                    json!({"id": d.id, "revision": d.revision, "source": d.source,
                           "split": d.split, "files": d.files, "format": d.format}),
                )
            })
            .collect();
        json!({
            "hub": {"cache_dir": c.hub.cache_dir, "offline": c.hub.offline, "endpoint": c.hub.endpoint},
            "model": {"id": c.model.id, "revision": c.model.revision, "source": c.model.source},
            "data": data,
        })
    }

    fn still_valid(&self, _run: &RunDir, record: &StageRecord) -> Result<bool> {
        let stats: Vec<FileStat> = match record.summary.get("file_stats") {
            Some(v) => serde_json::from_value(v.clone()).unwrap_or_default(),
            None => return Ok(false),
        };
        Ok(stats
            .iter()
            .all(|s| stat(Path::new(&s.path)).as_ref() == Some(s)))
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let c = ctx.config;
        let settings = HubSettings::from_config(&c.hub);
        tracing::info!(
            "hub cache {}{}",
            settings.cache_dir.display(),
            if settings.offline { " (offline)" } else { "" }
        );
        let model = resolve_model(
            &settings,
            &RepoRequest {
                kind: RepoKind::Model,
                id: &c.model.id,
                revision: &c.model.revision,
                source: c.model.source,
            },
        )?;
        let model_facts = verify_model(&model)?;
        ctx.failpoint("after-model")?;
        let mut data = BTreeMap::new();
        for (role, ds) in c.data.roles() {
            let repo = resolve_dataset(
                &settings,
                &RepoRequest {
                    kind: RepoKind::Dataset,
                    id: &ds.id,
                    revision: &ds.revision,
                    source: ds.source,
                },
                ds,
            )
            .map_err(|e| Error::Fetch(format!("data.{role}: {e}")))?;
            data.insert(role.to_string(), repo);
        }
        let fetched = Fetched {
            model,
            model_facts,
            data,
        };
        write_json_atomic(&ctx.out("resolved.json"), &fetched)?;

        let all_files = std::iter::once(&fetched.model)
            .chain(fetched.data.values())
            .flat_map(|r| r.files.iter());
        let file_stats: Vec<FileStat> = all_files.clone().filter_map(|f| stat(&f.path)).collect();
        let describe = |r: &ResolvedRepo| {
            json!({
                "id": r.id, "resolution": r.resolution, "revision": r.revision, "commit": r.commit,
                "files": r.files.iter().map(|f| json!({"name": f.name, "bytes": f.bytes, "sha256": f.sha256})).collect::<Vec<_>>(),
            })
        };
        let data_summary: BTreeMap<&String, serde_json::Value> =
            fetched.data.iter().map(|(k, r)| (k, describe(r))).collect();
        tracing::info!(
            "model {} ({}, commit {}): {} tensors, {} parameters",
            fetched.model.id,
            format!("{:?}", fetched.model.resolution).to_lowercase(),
            fetched.model.commit.as_deref().unwrap_or("-"),
            crate::util::num::count(fetched.model_facts.tensors as u64),
            crate::util::num::count(fetched.model_facts.parameters as u64)
        );
        Ok(json!({
            "model": describe(&fetched.model),
            "model_facts": fetched.model_facts,
            "data": data_summary,
            "file_stats": file_stats,
        }))
    }
}
