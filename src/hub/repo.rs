//! What a resolution is asked for and what it returns: repo kinds, requests, listings and
//! resolved files. Layer: hub — imports the ground (config); every other file of hub/ may
//! import it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::SourceKind;

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
    pub(super) fn hf(self) -> hf_hub::RepoType {
        match self {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        }
    }

    pub(super) fn word(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }

    /// What `huggingface-cli download` needs to name this kind (after the repo id).
    pub(super) fn cli_flag(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => " --repo-type dataset",
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
