//! Writing candle tensors to a safetensors file with string metadata, atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Saves `entries` (name, tensor; f64 kept as f64, everything else as f32) to `path` with
/// `metadata`, via a temporary file and a rename.
pub fn save_tensors(
    path: &Path,
    entries: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut raw: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in entries {
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F64 => (
                safetensors::Dtype::F64,
                t.flatten_all()?
                    .to_vec1::<f64>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::F32,
                t.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        };
        raw.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, d, s, b)| {
            let v = safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map_err(|e| Error::Numeric(format!("{n}: {e:?}")))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    let out = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Numeric(format!("{}: {e:?}", path.display())))?;
    crate::util::fsx::write_atomic(path, &out)
}

/// Runs `f` on the elements of an f32 CPU tensor, row-major, without copying when `t` is
/// contiguous (the hot loops of fit and score read captured activations this way).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    use candle_core::{CpuStorage, Storage};
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Ok(f(&v[start..start + t.elem_count()]))
        }
        _ => Err(Error::Numeric(format!(
            "expected an f32 tensor in host memory, got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        ))),
    }
}
