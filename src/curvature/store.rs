//! Owns factor files on disk: `save_factors`, `load_factors` and `FactorFile`.
//! Layer: curvature — may import every floor from the ground up to passes; no sibling.
//!
//! Factor sets on disk: one safetensors file per segment holding, for every layer, the
//! eigenvectors Q_A, Q_S (per block), the eigenvalues and Λ, with JSON metadata (layer names,
//! block layouts, what they were fitted on) so a later run can reuse them.
//!
//! Keys: `LAYER.q_a.K`, `LAYER.q_s.K` (block K, f32), `LAYER.eig_a`, `LAYER.eig_s` (f64),
//! `LAYER.lambda` (f32: Λ is accumulated from f32 sums, so f64 on disk would double its
//! bytes, ~40% of a factor file, without adding information; read back as f64, and files
//! written with an f64 Λ still load).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

use crate::linalg::{BlockDiag, BlockLayout, Covariances, EigenBasis, LayerFactors};

/// Bytes [`save_factors`] stores for one layer of input width `d_in` (its bias column
/// included) and `d_out` outputs under `attribution.block_size` = `block`: the eigenvector
/// blocks Q_A, Q_S in f32 (4 Σ_b b² per side), the eigenvalues in f64 (8 (d_in + d_out)) and
/// Λ in f32 (4 d_in d_out). What [`FactorFile::layer_bytes`] reads back, before the file's
/// header.
pub fn predicted_layer_bytes(d_in: usize, d_out: usize, block: Option<usize>) -> u64 {
    let squares = |d: usize| -> u64 {
        (BlockLayout::new(d, block).ranges.iter())
            .map(|&(_, b)| (b * b) as u64)
            .sum()
    };
    4 * (squares(d_in) + squares(d_out)) + 8 * (d_in + d_out) as u64 + 4 * (d_in * d_out) as u64
}

/// What the metadata records about one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LayerMeta {
    name: String,
    a_blocks: Vec<(usize, usize)>,
    s_blocks: Vec<(usize, usize)>,
}

/// Saves `factors` to `path` (atomically) with free-form `info` in the metadata.
pub fn save_factors(path: &Path, factors: &[LayerFactors], info: &serde_json::Value) -> Result<()> {
    let mut entries: Vec<(String, Tensor, DType)> = Vec::new();
    let mut layers = Vec::new();
    for f in factors {
        for (k, q) in f.basis.q_a.blocks.iter().enumerate() {
            entries.push((format!("{}.q_a.{k}", f.name), q.clone(), DType::F32));
        }
        for (k, q) in f.basis.q_s.blocks.iter().enumerate() {
            entries.push((format!("{}.q_s.{k}", f.name), q.clone(), DType::F32));
        }
        let dev = f.lambda.device();
        let vec_t = |v: &[f64]| Tensor::from_vec(v.to_vec(), v.len(), dev);
        entries.push((
            format!("{}.eig_a", f.name),
            vec_t(&f.basis.eig_a)?,
            DType::F64,
        ));
        entries.push((
            format!("{}.eig_s", f.name),
            vec_t(&f.basis.eig_s)?,
            DType::F64,
        ));
        // Converted to f32 by the writer, one layer at a time.
        entries.push((format!("{}.lambda", f.name), f.lambda.clone(), DType::F32));
        layers.push(LayerMeta {
            name: f.name.clone(),
            a_blocks: f.basis.q_a.layout.ranges.clone(),
            s_blocks: f.basis.q_s.layout.ranges.clone(),
        });
    }
    let meta = serde_json::json!({"layers": layers, "info": info, "tool_version": crate::VERSION});
    let metadata: HashMap<String, String> = [("source_tda".to_string(), meta.to_string())].into();
    entries.sort_by(|x, y| x.0.cmp(&y.0));
    crate::util::tensors::save_typed_tensors(path, &entries, metadata)
}

/// Loads a factor set saved by [`save_factors`]: every layer and the `info` metadata.
pub fn load_factors(
    path: &Path,
    device: &Device,
) -> Result<(Vec<LayerFactors>, serde_json::Value)> {
    let file = FactorFile::open(path)?;
    let names: Vec<String> = file.layer_names().map(str::to_string).collect();
    Ok((file.load_layers(&names, device)?, file.info().clone()))
}

/// A factor file opened for reading layer by layer: only the header is read at open, and
/// each tensor of the layers asked for is read with a positioned read into memory the
/// caller owns, so a layer group's factors can be loaded without the rest (docs/design.md §8).
/// The file is not memory-mapped: mapped pages would count in the process's resident
/// memory for as long as the file stays open (the whole factor set, during scoring).
pub struct FactorFile {
    path: PathBuf,
    file: std::fs::File,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    header: safetensors::tensor::Metadata,
    layers: Vec<LayerMeta>,
    info: serde_json::Value,
}

/// Largest header accepted (safetensors' own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl FactorFile {
    /// Opens `path` and reads its header and metadata (no tensor data).
    pub fn open(path: &Path) -> Result<FactorFile> {
        use std::io::Read;
        let not_factors = |why: String| {
            Error::Numeric(format!(
                "{}: not a factor file ({why}); rerun the fit stage",
                path.display()
            ))
        };
        let mut file = std::fs::File::open(path).ctx("opening", path)?;
        let len = file.metadata().ctx("reading the size of", path)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| not_factors(format!("{len} bytes, shorter than a header")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || 8 + n > len {
            return Err(not_factors(format!(
                "a header of {n} bytes in a file of {len}"
            )));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text).ctx("reading", path)?;
        let header: safetensors::tensor::Metadata = serde_json::from_slice(&text)
            .map_err(|e| not_factors(format!("unreadable header: {e}")))?;
        let data_len = header.data_len() as u64;
        if 8 + n + data_len != len {
            return Err(not_factors(format!(
                "the header describes {data_len} bytes of tensors but the file holds {}; was \
                 it truncated?",
                len - 8 - n
            )));
        }
        let meta: serde_json::Value = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("source_tda"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::Numeric(format!(
                    "{}: no source-tda metadata; not a factor file written by the fit stage",
                    path.display()
                ))
            })?;
        let layers: Vec<LayerMeta> = serde_json::from_value(meta["layers"].clone())
            .map_err(|e| Error::Numeric(format!("{}: bad layer metadata: {e}", path.display())))?;
        Ok(FactorFile {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            header,
            layers,
            info: meta["info"].clone(),
        })
    }

    /// The layers in the file, in stored order.
    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.name.as_str())
    }

    /// The free-form `info` the fit stage stored.
    pub fn info(&self) -> &serde_json::Value {
        &self.info
    }

    fn layer(&self, name: &str) -> Result<&LayerMeta> {
        self.layers.iter().find(|l| l.name == name).ok_or_else(|| {
            Error::Numeric(format!(
                "{}: no factors for layer `{name}`; the factors were fitted for other layers \
                 (rerun the fit stage)",
                self.path.display()
            ))
        })
    }

    fn keys(l: &LayerMeta) -> Vec<String> {
        let mut k: Vec<String> = (0..l.a_blocks.len())
            .map(|i| format!("{}.q_a.{i}", l.name))
            .chain((0..l.s_blocks.len()).map(|i| format!("{}.q_s.{i}", l.name)))
            .collect();
        for t in ["eig_a", "eig_s", "lambda"] {
            k.push(format!("{}.{t}", l.name));
        }
        k
    }

    fn info_of(&self, k: &str) -> Result<&safetensors::tensor::TensorInfo> {
        self.header.info(k).ok_or_else(|| {
            Error::Numeric(format!(
                "{}: tensor `{k}` is missing (rerun the fit stage)",
                self.path.display()
            ))
        })
    }

    /// Bytes of layer `name`'s stored tensors (what loading it takes in memory).
    pub fn layer_bytes(&self, name: &str) -> Result<u64> {
        let l = self.layer(name)?;
        let mut total = 0u64;
        for k in Self::keys(l) {
            let (start, end) = self.info_of(&k)?.data_offsets;
            total += (end - start) as u64;
        }
        Ok(total)
    }

    /// Reads tensor `k` (f32 or f64 as stored) onto `device`.
    fn read(&self, k: &str, device: &Device) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let info = self.info_of(k)?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            other => {
                return Err(Error::Numeric(format!(
                    "{}: tensor `{k}` is {other:?}; factor files hold f32 and f64 (rerun the \
                     fit stage)",
                    self.path.display()
                )))
            }
        };
        let (start, end) = info.data_offsets;
        let want = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end.checked_sub(start) != Some(want) {
            return Err(Error::Numeric(format!(
                "{}: tensor `{k}` of shape {:?} spans bytes {start}..{end}; the file is \
                 corrupt (rerun the fit stage)",
                self.path.display(),
                info.shape
            )));
        }
        let mut buf = vec![0u8; want];
        self.file
            .read_exact_at(&mut buf, self.data_start + start as u64)
            .ctx("reading", &self.path)?;
        Ok(Tensor::from_raw_buffer(&buf, dtype, &info.shape, device)?)
    }

    /// Reads the factors of the layers `names` (in that order) onto `device`.
    pub fn load_layers(&self, names: &[String], device: &Device) -> Result<Vec<LayerFactors>> {
        let get = |k: &str| -> Result<Tensor> { self.read(k, device) };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let l = self.layer(name)?;
            let blocks = |which: &str, ranges: &[(usize, usize)]| -> Result<Vec<Tensor>> {
                (0..ranges.len())
                    .map(|k| get(&format!("{}.{which}.{k}", l.name)))
                    .collect()
            };
            let layout = |ranges: &[(usize, usize)]| BlockLayout {
                dim: ranges.iter().map(|(_, n)| n).sum(),
                ranges: ranges.to_vec(),
            };
            let a_layout = layout(&l.a_blocks);
            let s_layout = layout(&l.s_blocks);
            let basis = EigenBasis {
                q_a: BlockDiag {
                    layout: a_layout.clone(),
                    blocks: blocks("q_a", &l.a_blocks)?,
                },
                q_s: BlockDiag {
                    layout: s_layout.clone(),
                    blocks: blocks("q_s", &l.s_blocks)?,
                },
                eig_a: get(&format!("{}.eig_a", l.name))?.to_vec1()?,
                eig_s: get(&format!("{}.eig_s", l.name))?.to_vec1()?,
            };
            out.push(LayerFactors {
                lambda: get(&format!("{}.lambda", l.name))?.to_dtype(DType::F64)?,
                covariances: Covariances {
                    a_layout,
                    s_layout,
                    a: Vec::new(),
                    s: Vec::new(),
                },
                basis,
                name: l.name.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_to_the_stored_precision() {
        let dev = Device::Cpu;
        let f = crate::linalg::test_support::random_factors(
            "model.layers.0.mlp.up_proj",
            (3, 4, 5, 3),
            Some(2),
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        save_factors(
            &p,
            std::slice::from_ref(&f),
            &serde_json::json!({"segment": 1}),
        )
        .unwrap();
        let (back, info) = load_factors(&p, &dev).unwrap();
        assert_eq!(info["segment"], 1);
        assert_eq!(back[0].name, f.name);
        assert_eq!(back[0].basis.eig_a, f.basis.eig_a);
        assert_eq!(back[0].basis.q_a.layout, f.basis.q_a.layout);
        let l1: Vec<f64> = back[0].lambda.flatten_all().unwrap().to_vec1().unwrap();
        // Λ is stored in f32: it comes back as the f32 rounding of what was saved.
        let l0: Vec<f64> = f
            .lambda
            .to_dtype(DType::F32)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(l0, l1);
        // One layer alone, by name, read from the file.
        let file = FactorFile::open(&p).unwrap();
        assert_eq!(
            file.layer_names().collect::<Vec<_>>(),
            vec![f.name.as_str()]
        );
        let one = file
            .load_layers(std::slice::from_ref(&f.name), &dev)
            .unwrap();
        let l2: Vec<f64> = one[0].lambda.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(l0, l2);
        // The stored bytes: f32 eigenvector blocks, f64 eigenvalues, f32 Λ.
        let want: u64 = f
            .basis
            .q_a
            .blocks
            .iter()
            .chain(&f.basis.q_s.blocks)
            .map(|q| 4 * q.elem_count() as u64)
            .sum::<u64>()
            + 8 * (f.basis.eig_a.len() + f.basis.eig_s.len()) as u64
            + 4 * f.lambda.elem_count() as u64;
        assert_eq!(file.layer_bytes(&f.name).unwrap(), want);
        let e = file
            .load_layers(&["nope".to_string()], &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no factors for layer `nope`"), "{e}");
        for (x, y) in back[0].basis.q_s.blocks.iter().zip(&f.basis.q_s.blocks) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y);
        }
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_with_advice() {
        let f = crate::linalg::test_support::random_factors("l", (3, 4, 5, 3), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        save_factors(&p, std::slice::from_ref(&f), &serde_json::json!({})).unwrap();
        let bytes = std::fs::read(&p).unwrap();

        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        let e = FactorFile::open(&cut).err().unwrap().to_string();
        assert!(
            e.contains("cut.safetensors") && e.contains("truncated"),
            "{e}"
        );
        assert!(e.contains("rerun the fit stage"), "{e}");

        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"hello, not a factor file at all").unwrap();
        let e = FactorFile::open(&junk).err().unwrap().to_string();
        assert!(e.contains("not a factor file"), "{e}");

        let empty = dir.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let e = FactorFile::open(&empty).err().unwrap().to_string();
        assert!(e.contains("shorter than a header"), "{e}");
    }
}
