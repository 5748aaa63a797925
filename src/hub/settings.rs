//! Hub settings: `[hub]` with the Hugging Face environment variables applied.
//! Layer: hub — imports the ground (config); every other file of hub/ may import it.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::HubConfig;

/// Default hub address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Hub settings after applying the environment: `HF_HUB_CACHE`, `HF_HOME`,
/// `HF_HUB_OFFLINE`, `HF_ENDPOINT`, and the token as [`token_from`] finds it. Config keys win over the environment, except
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

/// The access token as `huggingface_hub.get_token()` finds it: `HF_TOKEN`, else the file
/// `HF_TOKEN_PATH`, else `HF_HOME/token` (`HF_HOME` defaulting to
/// `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`) — where `huggingface-cli
/// login` writes it, whatever `HF_HUB_CACHE` says. Surrounding whitespace is dropped; an
/// empty value counts as none. `env` reads a variable (the process environment in use).
pub fn token_from(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let nonempty = |s: String| Some(s.trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = env("HF_TOKEN").and_then(nonempty) {
        return Some(t);
    }
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let path = set("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| {
        set("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                set("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(set("HOME").unwrap_or_else(|| ".".into())).join(".cache")
                    })
                    .join("huggingface")
            })
            .join("token")
    });
    std::fs::read_to_string(path).ok().and_then(nonempty)
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
        let token = token_from(&|k| std::env::var(k).ok());
        HubSettings {
            cache_dir,
            offline: hub.offline || env_offline,
            endpoint,
            connect_timeout: Duration::from_secs_f64(hub.connect_timeout_s),
            token,
        }
    }
}
