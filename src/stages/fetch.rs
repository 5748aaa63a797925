//! Owns the `fetch` stage and what it resolved (`Fetched`), which later stages read.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no sibling.
//!
//! `fetch`: resolves the model and every data set to local files (hub download, hub cache,
//! or local paths), hashes them, checks the model's files, and records the result for later
//! stages, one file per part: `fetch/model.json` (the model and its facts, and the
//! `[model] adapter` with its facts when one is named) and
//! `fetch/data/ROLE.json` (each data set), so that a stage that does not read a data set does
//! not depend on it (new queries leave `finetune` and `fit` current). Run directories of
//! earlier builds hold all of it in one `fetch/resolved.json`, still read. Nothing is copied:
//! the files stay in the cache or folder they were found in, and later stages read them from
//! there.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::hub::{
    check_adapter_base, resolve_adapter, resolve_dataset, resolve_model, verify_adapter,
    verify_model, AdapterFacts, HubSettings, ModelFacts, RepoKind, RepoRequest, Resolution,
    ResolvedRepo,
};
use crate::pipeline::{RunDir, Stage, StageContext, StageRecord};
use crate::util::fsx::write_json_atomic;

/// What `fetch` resolved (`fetch/model.json` and `fetch/data/ROLE.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetched {
    /// The model.
    pub model: ResolvedRepo,
    /// What the checks learned about the model.
    pub model_facts: ModelFacts,
    /// Data sets by role (`train`, `query`, `pretrain`).
    pub data: BTreeMap<String, ResolvedRepo>,
    /// The PEFT adapter of `[model] adapter`, with what its checks learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<FetchedAdapter>,
}

/// The resolved `[model] adapter` and what its checks learned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchedAdapter {
    /// Its two files, hashed.
    pub repo: ResolvedRepo,
    /// Rank, scale, targets and the base model it names.
    pub facts: AdapterFacts,
}

impl Fetched {
    /// Reads `RUN_DIR/fetch/model.json` and `RUN_DIR/fetch/data/*.json`, or the single
    /// `fetch/resolved.json` of a run directory made before the parts were split.
    pub fn load(run: &RunDir) -> Result<Fetched> {
        let dir = run.stage_dir("fetch");
        let legacy = dir.join("resolved.json");
        if legacy.is_file() && !dir.join("model.json").exists() {
            return read_json(&legacy);
        }
        let model: ModelPart = read_json(&dir.join("model.json"))?;
        let mut data = BTreeMap::new();
        let data_dir = dir.join("data");
        if data_dir.is_dir() {
            for entry in std::fs::read_dir(&data_dir).ctx("listing", &data_dir)? {
                let path = entry.ctx("listing", &data_dir)?.path();
                if let Some(role) = path.file_name().and_then(|n| n.to_str()) {
                    if let Some(role) = role.strip_suffix(".json") {
                        data.insert(role.to_string(), read_json(&path)?);
                    }
                }
            }
        }
        Ok(Fetched {
            model: model.model,
            model_facts: model.model_facts,
            data,
            adapter: model.adapter,
        })
    }

    /// The folder holding the adapter's files (its cache snapshot or local folder), when
    /// `[model] adapter` named one.
    pub fn adapter_dir(&self) -> Option<&Path> {
        self.adapter
            .as_ref()?
            .repo
            .file(crate::model::lora::ADAPTER_CONFIG)?
            .path
            .parent()
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

/// `fetch/model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ModelPart {
    model: ResolvedRepo,
    model_facts: ModelFacts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    adapter: Option<FetchedAdapter>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).ctx("reading", path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Pipeline(format!(
            "{}: unreadable ({e}); rerun the fetch stage (`--force fetch`)",
            path.display()
        ))
    })
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
        let mut view = json!({
            "hub": {"cache_dir": c.hub.cache_dir, "offline": c.hub.offline, "endpoint": c.hub.endpoint},
            "model": {"id": c.model.id, "revision": c.model.revision, "source": c.model.source},
            "data": data,
        });
        // Only when set, so that the hashes of runs without an adapter stay what they were.
        if let Some(a) = &c.model.adapter {
            view["model"]["adapter"] = json!(a);
        }
        view
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
        let adapter = match &c.model.adapter {
            None => None,
            Some(a) => {
                let repo = resolve_adapter(
                    &settings,
                    &RepoRequest {
                        kind: RepoKind::Model,
                        id: &a.id,
                        revision: &a.revision,
                        source: a.source,
                    },
                )?;
                let facts = verify_adapter(&repo)?;
                let local = model.resolution == Resolution::Local;
                let base = facts.base_model.as_deref();
                if let Some(w) =
                    check_adapter_base(&a.id, base, &c.model.id, local, a.allow_other_base)?
                {
                    tracing::warn!("{w}");
                }
                Some(FetchedAdapter { repo, facts })
            }
        };
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
            adapter,
        };
        write_json_atomic(
            &ctx.out("model.json"),
            &ModelPart {
                model: fetched.model.clone(),
                model_facts: fetched.model_facts.clone(),
                adapter: fetched.adapter.clone(),
            },
        )?;
        for (role, repo) in &fetched.data {
            write_json_atomic(&ctx.out(format!("data/{role}.json")), repo)?;
        }

        let all_files = std::iter::once(&fetched.model)
            .chain(fetched.adapter.iter().map(|a| &a.repo))
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
        let mut summary = json!({
            "model": describe(&fetched.model),
            "model_facts": fetched.model_facts,
            "data": data_summary,
            "file_stats": file_stats,
        });
        if let Some(FetchedAdapter { repo, facts }) = &fetched.adapter {
            tracing::info!(
                "adapter {} ({}, commit {}): r = {}, s = {}, {} tensors",
                repo.id,
                format!("{:?}", repo.resolution).to_lowercase(),
                repo.commit.as_deref().unwrap_or("-"),
                facts.r,
                crate::util::num::sig(facts.scale, 4),
                facts.tensors
            );
            summary["adapter"] = describe(repo);
            summary["adapter_facts"] = json!(facts);
        }
        Ok(summary)
    }
}
