//! Owns `ScratchMatrix`: a rows × cols matrix of f64 kept in a scratch file instead of memory,
//! added to a row at a time and read back in row order (`RowReader`) or by row.
//! Layer: ground — may import error; no sibling.
//!
//! The score stage keeps each segment's document scores here ([N][Q], row m the Q scores of
//! document m), so that its memory does not grow with the number of documents. Values are
//! stored as little-endian f64 and read back bit for bit; a row starts at 0.0 (the file is
//! created zero-filled), so adding v to a fresh row stores 0.0 + v, as an in-memory
//! accumulator started at 0.0 would.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// A rows × cols f64 matrix in a file (row-major), zero at creation.
pub struct ScratchMatrix {
    path: PathBuf,
    file: File,
    rows: usize,
    cols: usize,
    buf: Vec<u8>,
}

impl ScratchMatrix {
    /// Creates (or truncates) `path` as a zero matrix of `rows` × `cols`.
    pub fn create(path: &Path, rows: usize, cols: usize) -> Result<ScratchMatrix> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ctx("creating", path)?;
        file.set_len((rows * cols * 8) as u64).ctx("sizing", path)?;
        Ok(ScratchMatrix {
            path: path.to_path_buf(),
            file,
            rows,
            cols,
            buf: vec![0; cols * 8],
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn seek_row(&mut self, i: usize) -> Result<()> {
        assert!(
            i < self.rows,
            "row {i} of a {}-row scratch matrix",
            self.rows
        );
        self.file
            .seek(SeekFrom::Start((i * self.cols * 8) as u64))
            .ctx("seeking in", &self.path)?;
        Ok(())
    }

    /// Row `i` += `v` (cols values), element by element.
    pub fn add_row(&mut self, i: usize, v: &[f64]) -> Result<()> {
        assert_eq!(v.len(), self.cols, "a row of {} values", self.cols);
        self.seek_row(i)?;
        self.file
            .read_exact(&mut self.buf)
            .ctx("reading", &self.path)?;
        for (c, x) in self.buf.chunks_exact_mut(8).zip(v) {
            let old = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            c.copy_from_slice(&(old + x).to_le_bytes());
        }
        self.seek_row(i)?;
        self.file.write_all(&self.buf).ctx("writing", &self.path)?;
        Ok(())
    }

    /// A reader of the rows in order, on a handle of its own.
    pub fn reader(&self) -> Result<RowReader> {
        let file = File::open(&self.path).ctx("opening", &self.path)?;
        Ok(RowReader {
            path: self.path.clone(),
            rows: self.rows,
            file: BufReader::with_capacity(1 << 16, file),
            buf: vec![0; self.cols * 8],
        })
    }
}

fn decode(bytes: &[u8], out: &mut [f64]) {
    assert_eq!(bytes.len(), out.len() * 8);
    for (c, o) in bytes.chunks_exact(8).zip(out) {
        *o = f64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
}

/// Reads a [`ScratchMatrix`]'s rows in order, or by row.
pub struct RowReader {
    path: PathBuf,
    rows: usize,
    file: BufReader<File>,
    buf: Vec<u8>,
}

impl RowReader {
    /// The next row into `out` (cols values).
    pub fn next_row(&mut self, out: &mut [f64]) -> Result<()> {
        self.file
            .read_exact(&mut self.buf)
            .ctx("reading", &self.path)?;
        decode(&self.buf, out);
        Ok(())
    }

    /// Row `i` into `out` (cols values); the next row is then i + 1.
    pub fn read_at(&mut self, i: usize, out: &mut [f64]) -> Result<()> {
        assert!(
            i < self.rows,
            "row {i} of a {}-row scratch matrix",
            self.rows
        );
        let at = (i * self.buf.len()) as u64;
        self.file
            .seek(SeekFrom::Start(at))
            .ctx("seeking in", &self.path)?;
        self.next_row(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums kept on disk equal the same sums in memory bit for bit, read in order or by row.
    #[test]
    fn rows_add_up_as_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (5usize, 3usize);
        let mut m = ScratchMatrix::create(&dir.path().join("m.f64"), rows, cols).unwrap();
        let mut want = vec![vec![0f64; cols]; rows];
        let mut state = 3u64;
        for pass in 0..3 {
            for i in (0..rows).rev().filter(|i| (i + pass) % 2 == 0 || pass == 0) {
                let v: Vec<f64> = (0..cols)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                    })
                    .collect();
                m.add_row(i, &v).unwrap();
                for (w, x) in want[i].iter_mut().zip(&v) {
                    *w += x;
                }
            }
        }
        let mut r = m.reader().unwrap();
        let mut out = vec![0f64; cols];
        for w in &want {
            r.next_row(&mut out).unwrap();
            assert_eq!(
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        assert!(r.next_row(&mut out).is_err(), "past the last row");
        r.read_at(2, &mut out).unwrap();
        assert_eq!(out, want[2]);
        r.read_at(0, &mut out).unwrap();
        assert_eq!(out, want[0]);
        // -0.0 added to a fresh row is 0.0 + -0.0 = 0.0, as in memory.
        let mut z = ScratchMatrix::create(&dir.path().join("z.f64"), 1, 1).unwrap();
        z.add_row(0, &[-0.0]).unwrap();
        z.reader().unwrap().next_row(&mut out[..1]).unwrap();
        assert_eq!(out[0].to_bits(), (0.0f64 + -0.0).to_bits());
    }
}
