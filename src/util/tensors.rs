//! Owns writing candle tensors to safetensors (string metadata, atomically) and `with_f32`.
//! Layer: ground — may import error and, in this folder, fsx.rs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, IoContext, Result};

/// Saves `entries` (name, tensor; f64 kept as f64, everything else as f32) to `path` with
/// `metadata`, atomically: the file is written next to `path` one tensor at a time (only
/// one tensor's bytes exist in memory besides the tensors themselves), flushed to disk and
/// renamed over `path`.
pub fn save_tensors(
    path: &Path,
    entries: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let typed: Vec<(String, Tensor, DType)> = entries
        .iter()
        .map(|(n, t)| {
            let dtype = if t.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            (n.clone(), t.clone(), dtype)
        })
        .collect();
    save_typed_tensors(path, &typed, metadata)
}

/// [`save_tensors`] with each tensor's dtype on disk given (`DType::F64`, or `DType::F32` for
/// anything else): a tensor is converted only while its own bytes are written.
pub fn save_typed_tensors(
    path: &Path,
    entries: &[(String, Tensor, DType)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    // `View::data` cannot fail: a tensor that cannot be read back leaves its error here
    // (and zeros in the file, which is then discarded).
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let views: Vec<(&str, TensorBytes)> = entries
        .iter()
        .map(|(name, t, dtype)| (name.as_str(), TensorBytes::new(t, *dtype, &failed)))
        .collect();
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).ctx("creating directory", dir)?;
    let tmp = crate::util::fsx::temp_sibling(path);
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::Io {
            action: "writing",
            path: tmp.clone(),
            os_error: io,
        },
        other => Error::Numeric(format!("{}: {other:?}", path.display())),
    })?;
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx("syncing", &tmp)?;
    std::fs::rename(&tmp, path).ctx("renaming into place", path)?;
    Ok(())
}

/// A tensor as safetensors sees it: its bytes (little-endian f64 for f64 tensors, f32 for
/// every other dtype) are produced only when the writer asks for them.
struct TensorBytes<'a> {
    tensor: &'a Tensor,
    dtype: safetensors::Dtype,
    failed: &'a std::sync::Mutex<Option<Error>>,
}

impl<'a> TensorBytes<'a> {
    fn new(
        tensor: &'a Tensor,
        stored: DType,
        failed: &'a std::sync::Mutex<Option<Error>>,
    ) -> TensorBytes<'a> {
        let dtype = match stored {
            DType::F64 => safetensors::Dtype::F64,
            _ => safetensors::Dtype::F32,
        };
        TensorBytes {
            tensor,
            dtype,
            failed,
        }
    }

    /// The little-endian bytes, in one pass over the elements (f32 tensors are read in
    /// place; a factor file is ~2 GB for SmolLM2-135M, so the copies count).
    fn bytes(&self) -> Result<Vec<u8>> {
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(v.len() * N);
            for &x in v {
                out.extend_from_slice(&f(x));
            }
            out
        }
        // A no-op for a CPU tensor already in the stored dtype.
        let host = self.tensor.to_device(&candle_core::Device::Cpu)?;
        match self.dtype {
            safetensors::Dtype::F64 => Ok(le(
                &host.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                f64::to_le_bytes,
            )),
            _ => with_f32(&host.to_dtype(DType::F32)?, |v| le(v, f32::to_le_bytes)),
        }
    }
}

impl safetensors::View for TensorBytes<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.bytes().unwrap_or_else(|e| {
            if let Ok(mut slot) = self.failed.lock() {
                slot.get_or_insert(e);
            }
            vec![0; self.data_len()]
        }))
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.dtype.bitsize() / 8
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn saves_streamed_tensors_that_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, b"old content").unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        // Non-contiguous, f64, and a dtype stored as f32.
        let at = a.t().unwrap();
        let b = Tensor::new(&[1.5f64, -2.25, 1e-300], &dev).unwrap();
        let c = Tensor::new(&[0.5f32, 3.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let entries = vec![
            ("a_t".to_string(), at.clone()),
            ("b".to_string(), b.clone()),
            ("c".to_string(), c),
        ];
        let meta: HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        save_tensors(&path, &entries, meta).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["k"], "v");
        let f32s = |name: &str| -> Vec<f32> {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            v.data()
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
                .collect()
        };
        assert_eq!(st.tensor("a_t").unwrap().shape(), &[4, 3]);
        let want: Vec<f32> = at.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(f32s("a_t"), want);
        assert_eq!(f32s("c"), vec![0.5, 3.0]);
        let bv = st.tensor("b").unwrap();
        assert_eq!(bv.dtype(), safetensors::Dtype::F64);
        let got: Vec<f64> = bv
            .data()
            .chunks_exact(8)
            .map(|x| f64::from_le_bytes(x.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![1.5, -2.25, 1e-300]);
        // Only the file itself is left: no temporary sibling.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_missing_folder_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/t.safetensors");
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        save_tensors(&path, &[("x".into(), t)], HashMap::new()).unwrap();
        assert!(path.exists());
    }
}
