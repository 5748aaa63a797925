//! Owns SHA-256 of bytes, files and canonical JSON values, and the git blob hash of a file.
//! Layer: ground — may import error; no sibling.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// Hex SHA-256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of a file's content, streamed; `on_bytes` is called with each chunk's size
/// (for a progress bar).
pub fn sha256_file_with(path: &Path, mut on_bytes: impl FnMut(u64)) -> Result<String> {
    let mut file = std::fs::File::open(path).ctx("opening", path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ctx("reading", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        on_bytes(n as u64);
    }
    Ok(hex::encode(hasher.finalize()))
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
    let mut file = std::fs::File::open(path).ctx("opening", path)?;
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ctx("reading", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-1 (FIPS 180-4), streamed: only to check content addresses that are SHA-1 (git object
/// ids), never to protect anything new.
struct Sha1 {
    h: [u32; 5],
    block: [u8; 64],
    filled: usize,
    len: u64,
}

impl Sha1 {
    fn new() -> Sha1 {
        Sha1 {
            h: [
                0x6745_2301,
                0xEFCD_AB89,
                0x98BA_DCFE,
                0x1032_5476,
                0xC3D2_E1F0,
            ],
            block: [0; 64],
            filled: 0,
            len: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (64 - self.filled).min(data.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == 64 {
                let block = self.block;
                self.compress(&block);
                self.filled = 0;
            }
        }
    }

    fn compress(&mut self, block: &[u8; 64]) {
        let mut w = [0u32; 80];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = self.h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (h, x) in self.h.iter_mut().zip([a, b, c, d, e]) {
            *h = h.wrapping_add(x);
        }
    }

    fn finalize(mut self) -> [u8; 20] {
        let bits = self.len.wrapping_mul(8);
        self.update(&[0x80]);
        while self.filled != 56 {
            self.update(&[0]);
        }
        self.update(&bits.to_be_bytes());
        let mut out = [0u8; 20];
        for (o, h) in out.chunks_exact_mut(4).zip(self.h) {
            o.copy_from_slice(&h.to_be_bytes());
        }
        out
    }
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

    fn sha1(bytes: &[u8]) -> String {
        let mut h = Sha1::new();
        h.update(bytes);
        hex::encode(h.finalize())
    }

    #[test]
    fn sha1_known_digests() {
        assert_eq!(sha1(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(sha1(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(sha1(long), "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
        // Fed in pieces across block boundaries: the same digest.
        let a = vec![b'a'; 1_000_000];
        let mut h = Sha1::new();
        for c in a.chunks(777) {
            h.update(c);
        }
        assert_eq!(
            hex::encode(h.finalize()),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
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
