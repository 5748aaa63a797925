//! Owns `FactorCache`: the content-addressed cache of fitted factor sets, and its key hashes.
//! Layer: curvature — may import every floor from the ground up to passes and, in this folder,
//! store.rs.
//!
//! A content-addressed cache of fitted factor sets shared between runs (docs/design.md §8): a
//! factor set is reused by later runs with the same model, data and settings.
//!
//! An entry is `DIR/KEY/` with `factors.safetensors` and `entry.json` (the key's inputs, the
//! file's size and sha256). KEY is the sha256 of everything that determines the factors
//! (see [`factor_key`]). An entry is created in a temporary folder and renamed into place, so
//! a crash never leaves a half-written entry under a key; a lookup re-hashes the stored file
//! and opens it as a factor file, so a corrupt or partial entry is reported, never trusted.
//! `entry.json` records the entry's [`FACTOR_CACHE_FORMAT`]; an entry of another format is
//! never read: the lookup reports it ([`Lookup::OtherFormat`]) and removes it, so the fit
//! refits and stores an entry of this build's format in its place.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::util::fsx::remove_dir_if_exists;
use crate::util::hash::{sha256_file, sha256_json};

use super::store::FactorFile;

const FACTORS: &str = "factors.safetensors";
const ENTRY: &str = "entry.json";

/// The format of a factor cache entry (`entry.json` and the factor file's layout), recorded
/// as `format_version` in `entry.json` (entries from before the field existed are format 1).
/// Bump it with any change to either that another build would misread.
pub const FACTOR_CACHE_FORMAT: u32 = 1;

/// The cache key: sha256 of the canonical JSON of `inputs` (what determines the factors).
pub fn factor_key(inputs: &serde_json::Value) -> String {
    sha256_json(inputs)
}

/// sha256 of a checkpoint's weights: its `*.safetensors` files (except the optimizer state,
/// which does not enter the factors) and `config.json`, by name and content.
pub fn checkpoint_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ctx("listing", dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let n = n.as_deref().unwrap_or("");
            (n.ends_with(".safetensors") && n != "optimizer.safetensors") || n == "config.json"
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Pipeline(format!(
            "{}: no weights to hash for the factor cache",
            dir.display()
        )));
    }
    let mut parts = Vec::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        parts.push(json!([name, sha256_file(f)?]));
    }
    Ok(sha256_json(&json!(parts)))
}

/// sha256 of prepared documents as the fit sees them: in order, each one's token ids and loss
/// mask.
pub fn docs_hash(docs: &[PreparedDoc]) -> String {
    let mut h = Sha256::new();
    for d in docs {
        h.update((d.input_ids.len() as u64).to_le_bytes());
        for id in &d.input_ids {
            h.update(id.to_le_bytes());
        }
        h.update(&d.loss_mask);
    }
    hex::encode(h.finalize())
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A verified entry: its factor file.
    Hit(PathBuf),
    /// No entry under the key.
    Miss,
    /// An entry that fails verification (why); it has been removed.
    Corrupt(String),
    /// An entry of another [`FACTOR_CACHE_FORMAT`] (why): not read, and removed so that the
    /// refitted factors take its place.
    OtherFormat(String),
}

/// Why an entry was not used.
enum Rejected {
    Corrupt(String),
    OtherFormat(String),
}

/// A factor cache folder.
#[derive(Debug, Clone)]
pub struct FactorCache {
    dir: PathBuf,
}

impl FactorCache {
    /// The cache in `dir` (created on the first store).
    pub fn new(dir: &Path) -> FactorCache {
        FactorCache {
            dir: dir.to_path_buf(),
        }
    }

    /// The folder of the entry `key`.
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Looks `key` up and verifies the entry (its format, recorded size and sha256, a
    /// readable factor file). A corrupt entry is removed and reported as [`Lookup::Corrupt`];
    /// an entry of another format is removed unread and reported as [`Lookup::OtherFormat`].
    pub fn lookup(&self, key: &str) -> Result<Lookup> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Ok(Lookup::Miss);
        }
        match self.verify(&dir) {
            Ok(file) => Ok(Lookup::Hit(file)),
            Err(rejected) => {
                remove_dir_if_exists(&dir)?;
                Ok(match rejected {
                    Rejected::Corrupt(why) => Lookup::Corrupt(why),
                    Rejected::OtherFormat(why) => Lookup::OtherFormat(why),
                })
            }
        }
    }

    fn verify(&self, dir: &Path) -> std::result::Result<PathBuf, Rejected> {
        let entry_path = dir.join(ENTRY);
        let text = std::fs::read_to_string(&entry_path)
            .map_err(|e| Rejected::Corrupt(format!("{}: {e}", entry_path.display())))?;
        let entry: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Rejected::Corrupt(format!("{}: not JSON ({e})", entry_path.display())))?;
        let format = entry.get("format_version").map_or(Some(1), |v| v.as_u64());
        if format != Some(u64::from(FACTOR_CACHE_FORMAT)) {
            let written = entry.get("format_version").cloned().unwrap_or_default();
            return Err(Rejected::OtherFormat(format!(
                "{} was written by factor cache format {written}, this build reads format \
                 {FACTOR_CACHE_FORMAT}",
                entry_path.display()
            )));
        }
        self.verify_file(dir, &entry).map_err(Rejected::Corrupt)
    }

    fn verify_file(
        &self,
        dir: &Path,
        entry: &serde_json::Value,
    ) -> std::result::Result<PathBuf, String> {
        let file = dir.join(FACTORS);
        let size = std::fs::metadata(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .len();
        if entry["size"].as_u64() != Some(size) {
            return Err(format!(
                "{} has {size} bytes, the entry records {}",
                file.display(),
                entry["size"]
            ));
        }
        let sha = sha256_file(&file).map_err(|e| e.to_string())?;
        if entry["sha256"].as_str() != Some(sha.as_str()) {
            return Err(format!(
                "{}: sha256 {sha} differs from the recorded {}",
                file.display(),
                entry["sha256"]
            ));
        }
        FactorFile::open(&file).map_err(|e| e.to_string())?;
        Ok(file)
    }

    /// Stores `factors` (a factor file) under `key` with the key's `inputs`; atomic: the
    /// entry is assembled in a temporary folder and renamed into place. An entry that appears
    /// meanwhile (another run stored the same key) is kept.
    pub fn store(&self, key: &str, factors: &Path, inputs: &serde_json::Value) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).ctx("creating the factor cache", &self.dir)?;
        let tmp = self.dir.join(format!(".tmp-{key}-{}", std::process::id()));
        remove_dir_if_exists(&tmp)?;
        std::fs::create_dir_all(&tmp).ctx("creating", &tmp)?;
        let file = tmp.join(FACTORS);
        std::fs::copy(factors, &file).ctx("copying into the factor cache", factors)?;
        let entry = json!({
            "format_version": FACTOR_CACHE_FORMAT,
            "key": key, "inputs": inputs, "sha256": sha256_file(&file)?,
            "size": std::fs::metadata(&file).ctx("reading", &file)?.len(),
            "tool_version": crate::VERSION, "created": crate::util::now_rfc3339(),
        });
        crate::util::fsx::write_json_atomic(&tmp.join(ENTRY), &entry)?;
        let dest = self.entry_dir(key);
        if std::fs::rename(&tmp, &dest).is_err() {
            // Someone else stored the key first; theirs is as good as ours.
            remove_dir_if_exists(&tmp)?;
        }
        Ok(dest.join(FACTORS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factor_file(dir: &Path, seed_name: &str) -> PathBuf {
        let f = crate::linalg::test_support::random_factors(seed_name, (3, 4, 5, 3), None);
        let p = dir.join(format!("{seed_name}.safetensors"));
        crate::curvature::save_factors(&p, &[f], &json!({})).unwrap();
        p
    }

    #[test]
    fn store_then_hit_and_corruption_is_detected_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FactorCache::new(&tmp.path().join("cache"));
        let src = factor_file(tmp.path(), "l");
        let key = factor_key(&json!({"a": 1}));
        assert_ne!(key, factor_key(&json!({"a": 2})));
        assert_eq!(cache.lookup(&key).unwrap(), Lookup::Miss);
        let stored = cache.store(&key, &src, &json!({"a": 1})).unwrap();
        assert_eq!(cache.lookup(&key).unwrap(), Lookup::Hit(stored.clone()));
        assert_eq!(
            std::fs::read(&stored).unwrap(),
            std::fs::read(&src).unwrap()
        );

        // A flipped byte: the hash no longer matches.
        let mut bytes = std::fs::read(&stored).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&stored, &bytes).unwrap();
        match cache.lookup(&key).unwrap() {
            Lookup::Corrupt(why) => assert!(why.contains("sha256"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(
            !cache.entry_dir(&key).exists(),
            "a corrupt entry is removed"
        );

        // A partial entry (no entry.json) is corrupt too; a truncated file by its size.
        cache.store(&key, &src, &json!({})).unwrap();
        std::fs::remove_file(cache.entry_dir(&key).join(ENTRY)).unwrap();
        assert!(matches!(cache.lookup(&key).unwrap(), Lookup::Corrupt(_)));
        let stored = cache.store(&key, &src, &json!({})).unwrap();
        std::fs::write(&stored, &std::fs::read(&src).unwrap()[..100]).unwrap();
        match cache.lookup(&key).unwrap() {
            Lookup::Corrupt(why) => assert!(why.contains("bytes"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_entry_of_another_format_is_not_used_and_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FactorCache::new(&tmp.path().join("cache"));
        let src = factor_file(tmp.path(), "l");
        let key = factor_key(&json!({"a": 1}));
        let stored = cache.store(&key, &src, &json!({"a": 1})).unwrap();
        let entry_path = cache.entry_dir(&key).join(ENTRY);
        let mut entry: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&entry_path).unwrap()).unwrap();
        assert_eq!(entry["format_version"], FACTOR_CACHE_FORMAT);

        // Written before the field existed: the same layout, read as format 1.
        entry.as_object_mut().unwrap().remove("format_version");
        std::fs::write(&entry_path, entry.to_string()).unwrap();
        assert_eq!(cache.lookup(&key).unwrap(), Lookup::Hit(stored.clone()));

        // Another format, even with a file whose size and sha256 match, is never read.
        let other = FACTOR_CACHE_FORMAT + 1;
        entry["format_version"] = other.into();
        std::fs::write(&entry_path, entry.to_string()).unwrap();
        match cache.lookup(&key).unwrap() {
            Lookup::OtherFormat(why) => assert!(
                why.contains(&format!(
                    "written by factor cache format {other}, this build reads format \
                     {FACTOR_CACHE_FORMAT}"
                )) && why.contains("entry.json"),
                "{why}"
            ),
            found => panic!("{found:?}"),
        }
        assert!(!cache.entry_dir(&key).exists(), "removed, to be replaced");
        let again = cache.store(&key, &src, &json!({"a": 1})).unwrap();
        assert_eq!(cache.lookup(&key).unwrap(), Lookup::Hit(again));
    }
}
