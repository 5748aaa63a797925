//! Owns the offline side of hub: listing and checking a repo's files in the Hugging Face cache.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder, repo.rs,
//! settings.rs.
//!
//! The offline side: the standard Hugging Face cache, read through `hf_hub::Cache`.
//!
//! Layout: `CACHE/models--ORG--NAME/{refs/REVISION, snapshots/COMMIT/FILE, blobs/HASH}`
//! (`datasets--ORG--NAME` likewise). A branch or tag resolves through `refs/`; a full
//! commit hash names its snapshot folder directly (hf-hub 0.5 only follows `refs/`).
//!
//! A blob's name is its content address: the SHA-256 of a file stored in LFS (64 hex digits),
//! the git blob hash of one stored in git (40 hex digits). [`verify_blobs`] checks every
//! resolved file against it, so a damaged cached copy is refused rather than used.

use hf_hub::{Cache, Repo};

use std::path::{Path, PathBuf};

use super::repo::{Listing, RepoRequest, Resolution, ResolvedFile};
use super::settings::HubSettings;
use crate::error::{Error, Result};
use crate::util::hash::git_blob_sha1_file;

/// Whether `rev` is a full 40-hex commit hash.
pub(crate) fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Lists the snapshot of `req` in the cache.
pub(crate) fn listing(settings: &HubSettings, req: &RepoRequest) -> Result<Listing> {
    let cache = Cache::new(settings.cache_dir.clone());
    let repo = Repo::with_revision(req.id.to_string(), req.kind.hf(), req.revision.to_string());
    let folder = settings.cache_dir.join(repo.folder_name());
    let ref_path = folder.join("refs").join(req.revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        Err(_) if is_commit_hash(req.revision) => req.revision.to_string(),
        Err(_) => {
            return Err(Error::Fetch(format!(
                "{kind} `{id}` revision `{rev}` is not in the Hugging Face cache: looked for \
                 {ref_path} (missing){why}. To provide it: run once with network access (without \
                 HF_HUB_OFFLINE), or download it elsewhere with `huggingface-cli download \
                 {id}{repo_type} --revision {rev}` and copy that cache here, or point \
                 HF_HUB_CACHE / [hub] cache_dir at a cache that has it, or set the id to a local \
                 folder.",
                kind = req.kind.word(),
                id = req.id,
                rev = req.revision,
                ref_path = ref_path.display(),
                why = if settings.offline {
                    " while offline"
                } else {
                    " and the hub could not be reached"
                },
                repo_type = req.kind.cli_flag(),
            )))
        }
    };
    let root = cache.repo(repo).pointer_path(&commit);
    if !root.is_dir() {
        return Err(Error::Fetch(format!(
            "{} `{}` revision `{}` points to commit {commit}, but its snapshot folder {} is \
             missing from the cache; the cache is incomplete: download the revision again",
            req.kind.word(),
            req.id,
            req.revision,
            root.display()
        )));
    }
    let names = crate::util::fsx::list_files(&root)
        .map_err(|e| Error::Fetch(format!("listing cache snapshot: {e}")))?
        .into_iter()
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    Ok(Listing {
        resolution: Resolution::Cache,
        revision: Some(req.revision.to_string()),
        commit: Some(commit),
        root,
        names,
    })
}

/// Checks through `hf_hub::Cache` that every wanted file is in the snapshot (for branch and
/// tag revisions; commit revisions are checked on the snapshot folder directly).
pub(crate) fn check_present(
    settings: &HubSettings,
    req: &RepoRequest,
    listing: &Listing,
    wanted: &[String],
) -> Result<()> {
    let through_refs = listing.resolution == Resolution::Cache && !is_commit_hash(req.revision);
    for name in wanted {
        let present = if through_refs {
            let repo =
                Repo::with_revision(req.id.to_string(), req.kind.hf(), req.revision.to_string());
            Cache::new(settings.cache_dir.clone())
                .repo(repo)
                .get(name)
                .is_some()
        } else {
            listing.root.join(name).exists()
        };
        if !present {
            return Err(Error::Fetch(format!(
                "{} `{}`: file `{name}` was looked for at {} and is missing (a broken symlink \
                 into blobs/ means the blob was deleted); download the revision again",
                req.kind.word(),
                req.id,
                listing.root.join(name).display()
            )));
        }
    }
    Ok(())
}

/// How a blob's file name addresses its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Address {
    /// 64 hex digits: the SHA-256 of the content (files stored in LFS).
    Sha256,
    /// 40 hex digits: the git blob hash, SHA-1 of `blob LEN\0` + content (files in git).
    GitBlob,
}

fn address_of(name: &str) -> Option<Address> {
    let hex = name.chars().all(|c| c.is_ascii_hexdigit());
    match name.len() {
        64 if hex => Some(Address::Sha256),
        40 if hex => Some(Address::GitBlob),
        _ => None,
    }
}

/// The blob a snapshot file links to (`…/blobs/NAME`), when it is a link into a `blobs/`
/// folder (a cache written without symlinks has plain copies: nothing to check).
fn blob_of(path: &Path) -> Option<PathBuf> {
    if !std::fs::symlink_metadata(path)
        .ok()?
        .file_type()
        .is_symlink()
    {
        return None;
    }
    let blob = std::fs::canonicalize(path).ok()?;
    (blob.parent()?.file_name()? == "blobs").then_some(blob)
}

/// Checks each file resolved from the Hugging Face cache against the content address its
/// blob is named by: the SHA-256 (already computed in `files`) or the git blob hash. A blob
/// named otherwise is not checked. A mismatch is an error naming the repo, the file, the
/// blob and the fix.
pub(crate) fn verify_blobs(req: &RepoRequest, files: &[ResolvedFile]) -> Result<()> {
    for f in files {
        let Some(blob) = blob_of(&f.path) else {
            continue;
        };
        let name = blob
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let (what, actual) = match address_of(&name) {
            Some(Address::Sha256) => ("SHA-256", f.sha256.clone()),
            Some(Address::GitBlob) => ("git blob hash", git_blob_sha1_file(&blob)?),
            None => continue,
        };
        if actual != name {
            return Err(Error::Fetch(format!(
                "{kind} `{id}`: file `{file}` in the Hugging Face cache is damaged: its blob {blob} \
                 is named by its content's {what}, but the content hashes to {actual}. Delete \
                 the blob {blob} and fetch again with network access (or download the file again \
                 with `huggingface-cli download {id} {file}{repo_type} --revision {rev}`)",
                kind = req.kind.word(),
                id = req.id,
                file = f.name,
                blob = blob.display(),
                rev = req.revision,
                repo_type = req.kind.cli_flag(),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_hashes() {
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
        assert!(!is_commit_hash("0123456789abcdef"));
    }

    #[test]
    fn blob_names_say_how_they_address_their_content() {
        assert_eq!(address_of(&"a".repeat(64)), Some(Address::Sha256));
        assert_eq!(address_of(&"0".repeat(40)), Some(Address::GitBlob));
        assert_eq!(address_of("etag-12-config.json"), None);
        assert_eq!(address_of(&"g".repeat(64)), None);
    }
}
