//! Hub: models and datasets resolved to local files (the hub, its cache, or a local path).
//! Layer: hub — may import ground (error, util, config, output), linalg, backend, model, data.
//!
//! Three ways:
//!
//! 1. **online**: the hub's API through `hf_hub::api::sync` (downloads into the standard
//!    cache, resolving the revision to a commit first so every file comes from one commit);
//! 2. **cache**: the standard Hugging Face cache (`models--ORG--NAME/snapshots/COMMIT/…`)
//!    through `hf_hub::Cache`, when offline (`HF_HUB_OFFLINE=1`, `[hub] offline = true`) or
//!    when the hub cannot be reached;
//! 3. **local**: a plain folder or file.
//!
//! Files from the hub or its cache are checked against their blobs' content addresses
//! (`cache::verify_blobs`); local folders are hashed and recorded only.
//!
//! A PEFT adapter (`[model] adapter`) resolves the same three ways ([`resolve_adapter`]).
//!
//! hf-hub 0.5 has no notion of `HF_HUB_OFFLINE` or `HF_HUB_CACHE`; [`HubSettings`] adds them.

mod adapter;
mod cache;
mod configs;
mod online;
mod patterns;
mod repo;
mod select;
mod settings;
mod verify;

use std::path::{Path, PathBuf};

use crate::config::{DatasetConfig, SourceKind};
use crate::error::{Error, Result};
use crate::util::hash::sha256_file_with;
use crate::util::progress;

pub use adapter::{
    adapter_files, check_adapter_base, resolve_adapter, verify_adapter, AdapterFacts,
};
pub use configs::{config_splits, ConfigSplits};
use repo::Listing;
pub use repo::{RepoKind, RepoRequest, Resolution, ResolvedFile, ResolvedRepo};
pub use select::{dataset_files, model_files, shards_of_index};
pub use settings::{token_from, HubSettings, DEFAULT_ENDPOINT};
pub use verify::{safetensors_header, verify_model, ModelFacts};

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
    resolve(settings, req, &|names, root| {
        // The dataset card's YAML header declares the configs and their data files.
        let readme = names
            .iter()
            .any(|n| n == "README.md")
            .then(|| std::fs::read_to_string(root.join("README.md")))
            .transpose()
            .map_err(|e| Error::io("reading", root.join("README.md"), e))?;
        dataset_files(names, ds, req.id, readme.as_deref())
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
    // A sharded checkpoint's index says which shards to take, a dataset card which files
    // make each config: download it before selecting.
    let first = match req.kind {
        RepoKind::Model => "model.safetensors.index.json",
        RepoKind::Dataset => "README.md",
    }
    .to_string();
    let mut select_root = listing.root.clone();
    if let Some(on) = &fetch_missing {
        if listing.names.contains(&first) {
            select_root = on.download(std::slice::from_ref(&first))?;
        }
    }
    let wanted = select(&listing.names, &select_root)?;
    let root = match &fetch_missing {
        Some(on) => on.download(&wanted)?,
        None => {
            cache::check_present(settings, req, &listing, &wanted)?;
            listing.root.clone()
        }
    };
    let files = hash_files(&root, &wanted)?;
    if listing.resolution != Resolution::Local {
        cache::verify_blobs(req, &files)?;
    }
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
