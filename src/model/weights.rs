//! Owns reading weights: `TensorSource`, `SafetensorsDir` and `TensorMap`.
//! Layer: model — may import the ground, linalg and backend; no sibling.
//!
//! Reading weights: a [`TensorSource`] hands out named f32 tensors of an expected shape.
//! [`SafetensorsDir`] reads a Hugging Face checkpoint directory (`model.safetensors` or a
//! sharded `model.safetensors.index.json`); [`TensorMap`] serves tensors already in memory
//! (tests, other file formats).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, IoContext, Result};

/// Something that can produce the named weight tensors of a model, as f32.
pub trait TensorSource {
    /// The tensor `name`, converted to f32 on `device`. It is an error (naming the tensor and
    /// `shape`) when the tensor is missing, has another shape, or a dtype that cannot be read.
    fn get(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor>;

    /// Whether the source holds `name` (used to detect naming variants such as GPT-2's
    /// optional `transformer.` prefix and an untied `lm_head`).
    fn contains(&self, name: &str) -> bool;

    /// True for [`ShapeOnly`]: every tensor is zeros, so a loader may create a tensor of the
    /// final shape directly instead of transforming what `get` returns.
    fn zero_filled(&self) -> bool {
        false
    }
}

/// Zeros of every requested shape, as trainable `Var`s whose memory the kernel has not yet
/// backed (a zeroed allocation is not touched until written): loading a model from
/// `config.json` alone with it gives the real parameter and layer shapes at almost no
/// resident memory, for planning memory and storage before any weight is downloaded
/// ([`super::Model::shape_only`]). Such a model must never be run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShapeOnly;

impl TensorSource for ShapeOnly {
    fn get(&self, _name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(candle_core::Var::zeros(shape, DType::F32, device)?
            .as_tensor()
            .clone())
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn zero_filled(&self) -> bool {
        true
    }
}

/// A checkpoint directory with safetensors weights, memory-mapped.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors`, or every shard listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.is_file() {
            vec!["model.safetensors".into()]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).ctx("reading", &index_path)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::Model(format!("{}: not valid JSON: {e}", index_path.display()))
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Model(format!(
                        "{}: key `weight_map` missing or not an object",
                        index_path.display()
                    ))
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            return Err(Error::Model(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        Self::from_files(dir, &shard_names)
    }

    /// Opens the one safetensors file `dir/name` (e.g. PEFT's `adapter_model.safetensors`).
    pub fn open_file(dir: &Path, name: &str) -> Result<Self> {
        Self::from_files(dir, &[name.to_string()])
    }

    fn from_files(dir: &Path, shard_names: &[String]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).ctx("opening", &path)?;
            // SAFETY: the checkpoint is read-only input; a concurrent writer would be a user
            // error that at worst yields wrong weights, which shape checks partly catch.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.ctx("memory-mapping", &path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::Model(format!("{}: not a safetensors file: {e}", path.display()))
            })?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// All tensor names in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }
}

impl TensorSource for SafetensorsDir {
    fn get(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::Model(format!(
                "{}: tensor `{name}` (expected shape {shape:?}) is missing",
                self.dir.display()
            ))
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::Model(format!("{}: tensor `{name}`: {e}", path.display())))?;
        if view.shape() != shape {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                path.display(),
                view.shape()
            )));
        }
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(Error::Model(format!(
                    "{}: tensor `{name}` (shape {shape:?}) has dtype {other:?}; supported: \
                     F32, F16, BF16, F64",
                    path.display()
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, shape, &Device::Cpu)?
            .to_dtype(DType::F32)?;
        Ok(t.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// Named tensors held in memory.
#[derive(Debug, Clone, Default)]
pub struct TensorMap(pub HashMap<String, Tensor>);

impl TensorSource for TensorMap {
    fn get(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.0.get(name).ok_or_else(|| {
            Error::Model(format!(
                "tensor `{name}` (expected shape {shape:?}) is missing"
            ))
        })?;
        if t.dims() != shape {
            return Err(Error::Model(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
            other => {
                return Err(Error::Model(format!(
                    "tensor `{name}` (shape {shape:?}) has dtype {other:?}; supported: F32, \
                     F16, BF16, F64"
                )))
            }
        }
        Ok(t.to_dtype(DType::F32)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
