//! Owns `Online`: resolving a revision to a commit and downloading into the standard cache.
//! Layer: hub — may import the ground, linalg, backend, model, data and, in this folder, repo.rs,
//! settings.rs.
//!
//! The online side: `hf_hub::api::sync`, downloading into the standard cache.
//!
//! The revision is first resolved to a commit (the repo info call), then every file is
//! fetched at that commit, so a push to the branch mid-download cannot mix two commits. The
//! requested revision's ref is written into the cache so a later offline run finds it.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};

use super::repo::{Listing, RepoRequest, Resolution};
use super::settings::HubSettings;
use crate::error::{Error, Result};
use crate::util::progress;

/// A repo reachable through the hub's API.
pub(crate) struct Online {
    api: Api,
    repo_at_commit: Repo,
    cache: Cache,
    pub listing: Listing,
    what: String,
}

impl Online {
    /// Connects and lists the repo. `Ok(None)` means the hub cannot be reached (no network,
    /// refused, timed out): the caller falls back to the cache. HTTP errors (not found,
    /// unauthorised) are real errors.
    pub fn connect(settings: &HubSettings, req: &RepoRequest) -> Result<Option<Online>> {
        if let Err(why) = reachable(&settings.endpoint, settings.connect_timeout) {
            tracing::warn!(
                "the hub at {} cannot be reached ({why}); using the local cache {}",
                settings.endpoint,
                settings.cache_dir.display()
            );
            return Ok(None);
        }
        let cache = Cache::new(settings.cache_dir.clone());
        let api = ApiBuilder::from_cache(cache.clone())
            .with_endpoint(settings.endpoint.clone())
            .with_token(settings.token.clone())
            .with_progress(!progress::is_quiet())
            .with_retries(2)
            .build()
            .map_err(|e| Error::Fetch(format!("setting up the hub client: {e}")))?;
        let what = format!(
            "{} `{}` revision `{}`",
            req.kind.word(),
            req.id,
            req.revision
        );
        let repo = Repo::with_revision(req.id.to_string(), req.kind.hf(), req.revision.to_string());
        let info = match api.repo(repo.clone()).info() {
            Ok(info) => info,
            Err(e) if is_transport(&e) => {
                tracing::warn!("{what}: the hub did not answer ({e}); using the local cache");
                return Ok(None);
            }
            Err(e) => return Err(Error::Fetch(http_advice(&what, &e))),
        };
        cache
            .repo(repo)
            .create_ref(&info.sha)
            .map_err(|e| Error::io("writing a ref into", &settings.cache_dir, e))?;
        let repo_at_commit =
            Repo::with_revision(req.id.to_string(), req.kind.hf(), info.sha.clone());
        let root = cache.repo(repo_at_commit.clone()).pointer_path(&info.sha);
        let mut names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        names.sort();
        Ok(Some(Online {
            api,
            repo_at_commit,
            cache,
            listing: Listing {
                resolution: Resolution::Online,
                revision: Some(req.revision.to_string()),
                commit: Some(info.sha),
                root,
                names,
            },
            what,
        }))
    }

    /// Downloads the files not yet in the cache; returns the snapshot folder.
    pub fn download(&self, names: &[String]) -> Result<PathBuf> {
        let repo = self.api.repo(self.repo_at_commit.clone());
        for name in names {
            let cached = self.cache.repo(self.repo_at_commit.clone()).get(name);
            if cached.is_some() {
                continue;
            }
            tracing::info!("downloading {name}");
            repo.download(name)
                .map_err(|e| Error::Fetch(format!("{}: downloading `{name}`: {e}", self.what)))?;
        }
        Ok(self.listing.root.clone())
    }
}

fn is_transport(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(inner) => !matches!(**inner, ureq::Error::StatusCode(_)),
        ApiError::IoError(_) => true,
        _ => false,
    }
}

fn http_advice(what: &str, e: &ApiError) -> String {
    let status = match e {
        ApiError::RequestError(inner) => match **inner {
            ureq::Error::StatusCode(s) => Some(s),
            _ => None,
        },
        _ => None,
    };
    match status {
        Some(401) | Some(403) => format!(
            "{what}: the hub refused access (HTTP {}); the repo is gated or private: accept its \
             terms on the hub and set HF_TOKEN to a token that can read it",
            status.unwrap_or_default()
        ),
        Some(404) => format!(
            "{what}: not found on the hub (HTTP 404); check the repo id and the revision (branch, \
             tag or commit), and whether it is a model or a dataset"
        ),
        _ => format!("{what}: {e}"),
    }
}

/// Tries a TCP connection to the endpoint's host within `timeout`.
fn reachable(endpoint: &str, timeout: std::time::Duration) -> std::result::Result<(), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("`{endpoint}` is not a URL"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let default_port = if scheme == "http" { 80 } else { 443 };
    let addr = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_port_is_unreachable() {
        // Port 1 on loopback is closed on any sane machine: refused at once.
        let r = reachable("http://127.0.0.1:1", std::time::Duration::from_secs(2));
        assert!(r.is_err());
    }

    #[test]
    fn open_port_is_reachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let r = reachable(
            &format!("http://127.0.0.1:{port}/x"),
            std::time::Duration::from_secs(2),
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
