//! Owns `DocStore`: documents' token ids and loss masks kept in a scratch file, read back by
//! index, so that a pass can batch any subset of many documents without holding them.
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, tokenize.rs.
//!
//! Document i is n_i little-endian u32 ids followed by its n_i mask bytes, at an offset kept
//! in memory (8 bytes per document). A document read back has its ids and mask only: its id,
//! text and source stay in the prepared table.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

use super::tokenize::PreparedDoc;

/// Token ids and loss masks of documents 0..len, in a file.
pub struct DocStore {
    path: PathBuf,
    file: File,
    /// Byte offset of each document, and the end: len + 1 entries.
    offsets: Vec<u64>,
}

/// Writes a [`DocStore`] one document at a time.
pub struct DocStoreWriter {
    path: PathBuf,
    out: BufWriter<File>,
    offsets: Vec<u64>,
}

impl DocStore {
    /// Creates (or truncates) the store's file `path`.
    pub fn create(path: &Path) -> Result<DocStoreWriter> {
        let file = File::create(path).ctx("creating", path)?;
        Ok(DocStoreWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
            offsets: vec![0],
        })
    }

    /// Documents stored.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether no document is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of tokens of document `i`.
    pub fn n_tokens(&self, i: usize) -> usize {
        ((self.offsets[i + 1] - self.offsets[i]) / 5) as usize
    }

    /// Every document's number of tokens, in order.
    pub fn lengths(&self) -> Vec<usize> {
        (0..self.len()).map(|i| self.n_tokens(i)).collect()
    }

    /// Document `i`'s ids and mask (its other fields empty).
    pub fn get(&mut self, i: usize) -> Result<PreparedDoc> {
        let n = self.n_tokens(i);
        let mut bytes = vec![0u8; 5 * n];
        self.file
            .seek(SeekFrom::Start(self.offsets[i]))
            .ctx("seeking in", &self.path)?;
        self.file
            .read_exact(&mut bytes)
            .ctx("reading", &self.path)?;
        let (ids, mask) = bytes.split_at(4 * n);
        Ok(PreparedDoc {
            doc_id: String::new(),
            text: String::new(),
            prompt: None,
            completion: None,
            input_ids: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            loss_mask: mask.to_vec(),
            truncated_tokens: 0,
            source: String::new(),
        })
    }
}

impl DocStoreWriter {
    /// Appends `doc`'s ids and mask as the next document.
    pub fn push(&mut self, doc: &PreparedDoc) -> Result<()> {
        assert_eq!(
            doc.input_ids.len(),
            doc.loss_mask.len(),
            "one mask byte per id"
        );
        for id in &doc.input_ids {
            self.out
                .write_all(&id.to_le_bytes())
                .ctx("writing", &self.path)?;
        }
        self.out
            .write_all(&doc.loss_mask)
            .ctx("writing", &self.path)?;
        let end = self.offsets.last().expect("starts at 0") + 5 * doc.input_ids.len() as u64;
        self.offsets.push(end);
        Ok(())
    }

    /// Flushes the file and opens it for reading.
    pub fn finish(self) -> Result<DocStore> {
        self.out
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("writing", &self.path)?;
        let file = File::open(&self.path).ctx("opening", &self.path)?;
        Ok(DocStore {
            path: self.path,
            file,
            offsets: self.offsets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_read_back_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<PreparedDoc> = [vec![], vec![7u32], vec![1, 70000, u32::MAX]]
            .into_iter()
            .map(|ids| PreparedDoc {
                doc_id: "x".into(),
                text: "t".into(),
                prompt: None,
                completion: None,
                loss_mask: ids.iter().map(|&i| (i % 2) as u8).collect(),
                input_ids: ids,
                truncated_tokens: 0,
                source: String::new(),
            })
            .collect();
        let mut w = DocStore::create(&dir.path().join("d.bin")).unwrap();
        for d in &docs {
            w.push(d).unwrap();
        }
        let mut s = w.finish().unwrap();
        assert_eq!((s.len(), s.lengths()), (3, vec![0, 1, 3]));
        for i in [2, 0, 1, 2] {
            let d = s.get(i).unwrap();
            assert_eq!(
                (&d.input_ids, &d.loss_mask),
                (&docs[i].input_ids, &docs[i].loss_mask)
            );
        }
    }
}
