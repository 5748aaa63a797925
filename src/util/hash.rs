//! Owns SHA-256 of bytes, files and canonical JSON values, and the git blob hash of a file.
//! Layer: ground — may import error; no sibling.

use std::io::Read;
use std::path::Path;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// Hex SHA-256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of a file's content, streamed; `on_bytes` is called with each chunk's size
/// (for a progress bar).
pub fn sha256_file_with(path: &Path, mut on_bytes: impl FnMut(u64)) -> Result<String> {
    let mut hasher = Sha256::new();
    stream(path, |chunk| {
        hasher.update(chunk);
        on_bytes(chunk.len() as u64);
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// Feeds a file's content to `f` in chunks of at most 1 MiB.
fn stream(path: &Path, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut file = std::fs::File::open(path).ctx("opening", path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ctx("reading", path)?;
        if n == 0 {
            return Ok(());
        }
        f(&buf[..n]);
    }
}

/// Hex SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_file_with(path, |_| {})
}

/// Hex SHA-256 of a JSON value in canonical form (object keys sorted, no whitespace), so that
/// equal values hash equally whatever order they were built in.
pub fn sha256_json(value: &serde_json::Value) -> String {
    // serde_json's Map is a BTreeMap (no `preserve_order` feature), so keys are sorted.
    sha256_bytes(value.to_string().as_bytes())
}

/// Hex git blob hash of a file: SHA-1 of `blob LEN\0` followed by the content, the object id
/// git gives the file (and the name the Hugging Face cache gives a file stored in git rather
/// than in LFS).
pub fn git_blob_sha1_file(path: &Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .ctx("reading metadata of", path)?
        .len();
    // SHA-1 only to check content addresses that are SHA-1 (git object ids).
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    stream(path, |chunk| hasher.update(chunk))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn json_hash_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        assert_eq!(sha256_json(&a), sha256_json(&b));
        let c: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":4}}"#).unwrap();
        assert_ne!(sha256_json(&a), sha256_json(&c));
    }

    #[test]
    fn git_blob_hash_is_gits_object_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        // `git hash-object` of an empty file, and of "hello world\n".
        assert_eq!(
            git_blob_sha1_file(&p).unwrap(),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
        std::fs::write(&p, b"hello world\n").unwrap();
        assert_eq!(
            git_blob_sha1_file(&p).unwrap(),
            "3b18e512dba79e4c8300dd08aeb37f8e728b8dad"
        );
    }
}
