//! Resolving models and datasets to local files, three ways:
//!
//! 1. **online**: the hub's API through `hf_hub::api::sync` (downloads into the standard
//!    cache, resolving the revision to a commit first so every file comes from one commit);
//! 2. **cache**: the standard Hugging Face cache (`models--ORG--NAME/snapshots/COMMIT/…`)
//!    through `hf_hub::Cache`, when offline (`HF_HUB_OFFLINE=1`, `[hub] offline = true`) or
//!    when the hub cannot be reached;
//! 3. **local**: a plain folder or file.
//!
//! hf-hub 0.5 has no notion of `HF_HUB_OFFLINE` or `HF_HUB_CACHE`; [`HubSettings`] adds them.

mod cache;
mod online;
mod select;
mod verify;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{DatasetConfig, HubConfig, SourceKind};
use crate::error::{Error, Result};
use crate::util::hash::sha256_file_with;
use crate::util::progress;

pub use select::{dataset_files, format_of, model_files, shards_of_index, DATA_EXTENSIONS};
pub use verify::{safetensors_header, verify_model, ModelFacts};

/// Default hub address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Model or dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoKind {
    /// A model repo (`models--ORG--NAME` in the cache).
    Model,
    /// A dataset repo (`datasets--ORG--NAME` in the cache).
    Dataset,
}

impl RepoKind {
    fn hf(self) -> hf_hub::RepoType {
        match self {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        }
    }

    fn word(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Hub settings after applying the environment: `HF_HUB_CACHE`, `HF_HOME`,
/// `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`. Config keys win over the environment, except
/// that `HF_HUB_OFFLINE=1` always forces offline.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub cache folder (holding `models--…` and `datasets--…`).
    pub cache_dir: PathBuf,
    /// Cache only, no network.
    pub offline: bool,
    /// Hub address.
    pub endpoint: String,
    /// How long to wait for a connection before falling back to the cache.
    pub connect_timeout: Duration,
    /// Access token for gated or private repos.
    pub token: Option<String>,
}

impl HubSettings {
    /// Settings from `[hub]` and the environment.
    pub fn from_config(hub: &HubConfig) -> HubSettings {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = hub
            .cache_dir
            .clone()
            .or_else(|| env("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| env("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| {
                let home = env("HOME").unwrap_or_else(|| ".".into());
                PathBuf::from(home).join(".cache/huggingface/hub")
            });
        let env_offline = env("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let endpoint = hub
            .endpoint
            .clone()
            .or_else(|| env("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = env("HF_TOKEN").or_else(|| hf_hub::Cache::new(cache_dir.clone()).token());
        HubSettings {
            cache_dir,
            offline: hub.offline || env_offline,
            endpoint,
            connect_timeout: Duration::from_secs_f64(hub.connect_timeout_s),
            token,
        }
    }
}

/// How a repo was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Through the hub's API (files downloaded into the cache when missing).
    Online,
    /// From the local Hugging Face cache, without network.
    Cache,
    /// From a local folder or file.
    Local,
}

/// One resolved file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedFile {
    /// Path inside the repo or folder (`model.safetensors`, `data/train.jsonl`).
    pub name: String,
    /// Absolute local path.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
}

/// A model or dataset resolved to local files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedRepo {
    /// Model or dataset.
    pub kind: RepoKind,
    /// Repo id or local path, as configured.
    pub id: String,
    /// How it was resolved.
    pub resolution: Resolution,
    /// The revision asked for (`main`, a tag, a commit); `None` for local paths.
    pub revision: Option<String>,
    /// The commit it resolved to; `None` for local paths.
    pub commit: Option<String>,
    /// The snapshot folder or local folder the files are in.
    pub root: PathBuf,
    /// The files, in a stable order.
    pub files: Vec<ResolvedFile>,
}

impl ResolvedRepo {
    /// The file named `name` (path inside the repo).
    pub fn file(&self, name: &str) -> Option<&ResolvedFile> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// A listing of a repo or folder: its root and the relative names of its files.
#[derive(Debug, Clone)]
pub(crate) struct Listing {
    pub resolution: Resolution,
    pub revision: Option<String>,
    pub commit: Option<String>,
    pub root: PathBuf,
    pub names: Vec<String>,
}

/// Where to look for a repo: a hub id with revision, or a local path.
#[derive(Debug, Clone)]
pub struct RepoRequest<'a> {
    /// Model or dataset.
    pub kind: RepoKind,
    /// Hub id or local path (already resolved by the config).
    pub id: &'a str,
    /// Revision (hub only).
    pub revision: &'a str,
    /// Hub or local (never `Auto` after config resolution).
    pub source: SourceKind,
}

/// Resolves the model named by `[model]`: config.json, tokenizer.json, safetensors weights
/// (single file or sharded with its index), and the optional tokenizer/generation configs.
pub fn resolve_model(settings: &HubSettings, req: &RepoRequest) -> Result<ResolvedRepo> {
    resolve(settings, req, &|names, root| {
        model_files(names, root, req.id)
    })
}

/// Resolves a dataset's data files for its split (or its explicit `files`).
pub fn resolve_dataset(
    settings: &HubSettings,
    req: &RepoRequest,
    ds: &DatasetConfig,
) -> Result<ResolvedRepo> {
    // A local path that is a single file is the data set itself.
    if req.source == SourceKind::Local && Path::new(req.id).is_file() {
        let path = PathBuf::from(req.id);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let root = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let files = hash_files(&root, &[name])?;
        return Ok(ResolvedRepo {
            kind: RepoKind::Dataset,
            id: req.id.to_string(),
            resolution: Resolution::Local,
            revision: None,
            commit: None,
            root,
            files,
        });
    }
    resolve(settings, req, &|names, _root| {
        dataset_files(names, ds, req.id)
    })
}

type Selector<'a> = dyn Fn(&[String], &Path) -> Result<Vec<String>> + 'a;

fn resolve(settings: &HubSettings, req: &RepoRequest, select: &Selector) -> Result<ResolvedRepo> {
    let (listing, fetch_missing): (Listing, Option<online::Online>) = match req.source {
        SourceKind::Local => (local_listing(req)?, None),
        _ if settings.offline => (cache::listing(settings, req)?, None),
        _ => match online::Online::connect(settings, req)? {
            Some(on) => (on.listing.clone(), Some(on)),
            None => (cache::listing(settings, req)?, None),
        },
    };
    // A sharded checkpoint's index says which shards to take: download it before selecting.
    if let Some(on) = &fetch_missing {
        let index = "model.safetensors.index.json".to_string();
        if req.kind == RepoKind::Model && listing.names.contains(&index) {
            on.download(std::slice::from_ref(&index))?;
        }
    }
    let wanted = select(&listing.names, &listing.root)?;
    let root = match &fetch_missing {
        Some(on) => on.download(&wanted)?,
        None => {
            cache::check_present(settings, req, &listing, &wanted)?;
            listing.root.clone()
        }
    };
    let files = hash_files(&root, &wanted)?;
    Ok(ResolvedRepo {
        kind: req.kind,
        id: req.id.to_string(),
        resolution: listing.resolution,
        revision: listing.revision,
        commit: listing.commit,
        root,
        files,
    })
}

fn local_listing(req: &RepoRequest) -> Result<Listing> {
    let root = PathBuf::from(req.id);
    if !root.is_dir() {
        return Err(Error::Fetch(format!(
            "{} `{}`: no such folder; give an existing folder (or file, for a dataset), or a hub \
             repo id",
            req.kind.word(),
            root.display()
        )));
    }
    let names = crate::util::fsx::list_files(&root)?
        .into_iter()
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .filter(|n| !n.starts_with(".git/") && !n.starts_with('.'))
        .collect();
    Ok(Listing {
        resolution: Resolution::Local,
        revision: None,
        commit: None,
        root,
        names,
    })
}

/// Hashes `names` under `root` with one progress bar over their total size.
fn hash_files(root: &Path, names: &[String]) -> Result<Vec<ResolvedFile>> {
    let mut sizes = Vec::new();
    for n in names {
        let p = root.join(n);
        let meta = std::fs::metadata(&p).map_err(|e| Error::io("reading metadata of", &p, e))?;
        sizes.push(meta.len());
    }
    let pb = progress::bytes_bar(sizes.iter().sum(), "sha256");
    let mut out = Vec::new();
    for (n, bytes) in names.iter().zip(sizes) {
        let path = root.join(n);
        let sha256 = sha256_file_with(&path, |k| pb.inc(k))?;
        // Keep the snapshot path (a symlink into blobs/ in a hub cache): it names the file.
        let path = std::path::absolute(&path).unwrap_or(path);
        out.push(ResolvedFile {
            name: n.clone(),
            path,
            bytes,
            sha256,
        });
    }
    pb.finish_and_clear();
    Ok(out)
}
