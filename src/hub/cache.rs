//! Owns the offline side of hub: listing and checking a repo's files in the Hugging Face cache.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder, repo.rs,
//! settings.rs.
//!
//! The offline side: the standard Hugging Face cache, read through `hf_hub::Cache`.
//!
//! Layout: `CACHE/models--ORG--NAME/{refs/REVISION, snapshots/COMMIT/FILE, blobs/HASH}`
//! (`datasets--ORG--NAME` likewise). A branch or tag resolves through `refs/`; a full
//! commit hash names its snapshot folder directly (hf-hub 0.5 only follows `refs/`).

use hf_hub::{Cache, Repo};

use super::repo::{Listing, RepoKind, RepoRequest, Resolution};
use super::settings::HubSettings;
use crate::error::{Error, Result};

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
                repo_type = if req.kind == RepoKind::Dataset {
                    " --repo-type dataset"
                } else {
                    ""
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_hashes() {
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
        assert!(!is_commit_hash("0123456789abcdef"));
    }
}
