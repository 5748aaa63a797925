//! Owns `CudaBackend`: the `Backend` that runs fit and score on the project's CUDA kernels.
//! Layer: backend — may import the ground and linalg and, in backend/, contract.rs; in this folder,
//! eigh.rs, gpu.rs, precision.rs.
//!
//! The CUDA backend: the project's kernels ([`super`]) for every heavy operation of `fit`
//! and `score`. In a `--features cuda` build the model runs on candle's CUDA device and
//! the kernels share its stream: a and δ are copied device-to-device (never through the
//! host). In a `--features cuda-kernels` build the model runs on the CPU and a, δ are
//! uploaded per batch (the GPU parity tests use this build). Factors, queries and scores
//! come back to the host, batch by batch, into the fit's sums (f32 covariances, f64 Λ).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, TensorId};

use crate::backend::contract::Backend;
use crate::config::EigenPrecision;
use crate::config::PrecisionKind;
use crate::error::{Error, Result};
use crate::linalg::{BlockDiag, Eigen, EigenBasis, FactorSum, LambdaSums, LayerQuery};

use super::eigh::eigh_gpu;
use super::gpu::{Gpu, GpuBuffer};
use super::precision::Precision;

/// One NVIDIA GPU with the project's kernels, and the candle device the model runs on.
pub struct CudaBackend {
    gpu: Gpu,
    device: Device,
    precision: Precision,
    /// Buffers uploaded once and reused across the batches of a pass (queries, eigenbases),
    /// keyed by the candle tensor they came from; [`Backend::release`] empties it.
    cache: Mutex<UploadCache>,
}

/// Device copies of host tensors, by (tensor, which copy).
type UploadCache = HashMap<(TensorId, u8), Arc<GpuBuffer<f32>>>;

fn no_gpu(ordinal: usize) -> Error {
    Error::Cuda(format!(
        "`[run] device = \"cuda\"`: no CUDA GPU found (the NVIDIA driver library libcuda.so.1 \
         could not be loaded, or it reports no device {ordinal}); run on a machine with an \
         NVIDIA GPU and its driver, or set `device = \"cpu\"`"
    ))
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles the kernels for it (NVRTC). Errors name what is
    /// missing: no driver or device, no NVRTC, an unsupported architecture.
    pub fn open(ordinal: usize, precision: PrecisionKind) -> Result<CudaBackend> {
        #[cfg(feature = "cuda")]
        let (device, gpu) = {
            match cudarc::driver::CudaContext::device_count() {
                Ok(n) if (n as usize) > ordinal => {}
                _ => return Err(no_gpu(ordinal)),
            }
            let device = Device::new_cuda(ordinal)?;
            let stream = device.as_cuda_device()?.cuda_stream();
            let gpu = Gpu::from_stream(stream)?;
            (device, gpu)
        };
        #[cfg(not(feature = "cuda"))]
        let (device, gpu) = (
            Device::Cpu,
            Gpu::new(ordinal)?.ok_or_else(|| no_gpu(ordinal))?,
        );
        let precision = match precision {
            PrecisionKind::F32 => Precision::F32,
            PrecisionKind::Tf32 => Precision::Tf32,
            PrecisionKind::Bf16 => Precision::Bf16,
        };
        tracing::info!(
            "cuda: {} ({}), kernel inputs {precision:?}, model on {:?}",
            gpu.name,
            gpu.arch,
            device.location()
        );
        Ok(CudaBackend {
            gpu,
            device,
            precision,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The GPU and its kernels.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The precision of the GEMM-shaped kernels (rotations, function application): bf16
    /// applies to the captured a and δ only, so these run in f32 then.
    fn gemm_precision(&self) -> Precision {
        match self.precision {
            Precision::Bf16 => Precision::F32,
            p => p,
        }
    }

    /// `t` (any float dtype) as a contiguous f32 device buffer: copied on the device when
    /// candle already holds it there, else uploaded.
    fn to_gpu(&self, t: &Tensor) -> Result<GpuBuffer<f32>> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        #[cfg(feature = "cuda")]
        {
            use candle_core::Storage;
            let (storage, layout) = t.storage_and_layout();
            if let Storage::Cuda(cs) = &*storage {
                let slice = cs.as_cuda_slice::<f32>()?;
                let (o, n) = (layout.start_offset(), t.elem_count());
                return self
                    .gpu
                    .stream()
                    .clone_dtod(&slice.slice(o..o + n))
                    .map_err(|e| Error::Cuda(format!("device copy: {e:?}")));
            }
        }
        let host: Vec<f32> = t.flatten_all()?.to_vec1()?;
        self.gpu.upload(&host)
    }

    /// [`to_gpu`](Self::to_gpu), uploaded once per pass for the tensor `key` (with `tag`
    /// telling apart buffers made from the same tensor).
    fn cached(
        &self,
        key: TensorId,
        tag: u8,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Arc<GpuBuffer<f32>>> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Cuda("the upload cache's lock is poisoned".into()))?;
        if let Some(b) = cache.get(&(key, tag)) {
            return Ok(b.clone());
        }
        let b = Arc::new(self.to_gpu(&make()?)?);
        cache.insert((key, tag), b.clone());
        Ok(b)
    }

    /// The dense eigenvectors of a (block-diagonal) basis on the device.
    fn basis_on_gpu(&self, q: &BlockDiag, tag: u8) -> Result<Arc<GpuBuffer<f32>>> {
        let first = q
            .blocks
            .first()
            .ok_or_else(|| Error::Numeric("an eigenbasis with no blocks".into()))?;
        self.cached(first.id(), tag, || q.to_dense())
    }

    /// The inputs in the kernels' input type: f32 as they are, or rounded to bf16 on the
    /// device.
    fn inputs(&self, xs: Vec<GpuBuffer<f32>>) -> Result<Inputs> {
        Ok(if self.precision == Precision::Bf16 {
            Inputs::Bf16(
                xs.iter()
                    .map(|x| self.gpu.to_bf16(x))
                    .collect::<Result<_>>()?,
            )
        } else {
            Inputs::F32(xs)
        })
    }
}

/// Kernel inputs in one of the two element types the kernels read.
enum Inputs {
    F32(Vec<GpuBuffer<f32>>),
    Bf16(Vec<GpuBuffer<u16>>),
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn add_covariances(
        &self,
        terms: &mut [(&mut FactorSum, &Tensor)],
        mask: &Tensor,
    ) -> Result<()> {
        let (b, t) = mask.dims2()?;
        let n = b * t;
        let mask_host: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mask = self.gpu.upload(&mask_host)?;
        // One entry per diagonal block of every term: (term, block, dim).
        let mut inputs = Vec::new();
        let mut entries = Vec::new();
        for (i, (sum, x)) in terms.iter().enumerate() {
            let d = x.dim(2)?;
            let x2 = x.reshape((n, d))?;
            for (k, &(off, len)) in sum.layout.ranges.iter().enumerate() {
                let xb = if len == d {
                    x2.clone()
                } else {
                    x2.narrow(1, off, len)?
                };
                inputs.push(self.to_gpu(&xb)?);
                entries.push((i, k, len));
            }
        }
        let mut outs: Vec<GpuBuffer<f32>> = entries
            .iter()
            .map(|&(_, _, d)| self.gpu.zeros::<f32>(d * d))
            .collect::<Result<_>>()?;
        let precision = self.precision;
        match self.inputs(inputs)? {
            Inputs::F32(xs) => {
                let args: Vec<(&GpuBuffer<f32>, usize)> =
                    xs.iter().zip(&entries).map(|(x, e)| (x, e.2)).collect();
                self.gpu.masked_syrk(&args, &mask, &mut outs, precision)?
            }
            Inputs::Bf16(xs) => {
                let args: Vec<(&GpuBuffer<u16>, usize)> =
                    xs.iter().zip(&entries).map(|(x, e)| (x, e.2)).collect();
                self.gpu.masked_syrk(&args, &mask, &mut outs, precision)?
            }
        }
        // The kernel fills the lower triangle, which is what the sums keep.
        for (out, &(i, k, _)) in outs.iter().zip(&entries) {
            terms[i].0.add_block(k, &self.gpu.download(out)?)?;
        }
        Ok(())
    }

    fn eigh_many(
        &self,
        mats: &[(Vec<f64>, usize, String)],
        _precision: EigenPrecision,
    ) -> Result<Vec<Eigen>> {
        // cuSOLVER's f64 decomposition is a small share of a GPU fit: kept in f64 always.
        mats.iter()
            .map(|(m, n, what)| eigh_gpu(&self.gpu, m, *n, what))
            .collect()
    }

    fn add_lambdas(
        &self,
        sums: &mut [LambdaSums],
        bases: &[EigenBasis],
        layers: &[(&Tensor, &Tensor)],
        attention_mask: &Tensor,
        _lengths: &[usize],
    ) -> Result<()> {
        let (docs, seq) = attention_mask.dims2()?;
        let n = docs * seq;
        let mask = self.to_gpu(attention_mask)?;
        let rot = self.gemm_precision();
        for ((&(a, delta), sum), basis) in layers.iter().zip(sums.iter_mut()).zip(bases) {
            let (d_in, d_out) = (a.dim(2)?, delta.dim(2)?);
            let q_a = self.basis_on_gpu(&basis.q_a, 1)?;
            let q_s = self.basis_on_gpu(&basis.q_s, 2)?;
            let a = self.to_gpu(a)?;
            let d = self.to_gpu(delta)?;
            // a Q_A and δ Q_S, then Σ_b ((Σ_{t∈b} m_t (δQ_S)_t (aQ_A)_tᵀ)[i,j])².
            let ar = self.gpu.rotate_rows(&a, &q_a, n, d_in, rot)?;
            let dr = self.gpu.rotate_rows(&d, &q_s, n, d_out, rot)?;
            drop((a, d));
            let mut out = self.gpu.zeros::<f32>(d_out * d_in)?;
            let shape = (docs, seq, d_out, d_in);
            let precision = self.precision;
            match self.inputs(vec![dr, ar])? {
                Inputs::F32(x) => self
                    .gpu
                    .eig_correction(&x[0], &x[1], &mask, &mut out, shape, precision)?,
                Inputs::Bf16(x) => self
                    .gpu
                    .eig_correction(&x[0], &x[1], &mask, &mut out, shape, precision)?,
            }
            let host = self.gpu.download(&out)?;
            sum.add_squares(
                &Tensor::from_vec(host, (d_out, d_in), &Device::Cpu)?,
                docs as u64,
            )?;
        }
        Ok(())
    }

    fn apply_in_basis(&self, basis: &EigenBasis, weights: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (q, d_out, d_in) = v.dims3()?;
        let q_s = self.to_gpu(&basis.q_s.to_dense()?)?;
        let q_a = self.to_gpu(&basis.q_a.to_dense()?)?;
        let w = self.to_gpu(weights)?;
        let vg = self.to_gpu(v)?;
        let out = self.gpu.apply_in_basis(
            &q_s,
            &q_a,
            &w,
            &vg,
            (q, d_out, d_in),
            self.gemm_precision(),
        )?;
        let host = self.gpu.download(&out)?;
        Ok(Tensor::from_vec(host, (q, d_out, d_in), &Device::Cpu)?)
    }

    fn token_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, d_in) = a.dims3()?;
        let d_out = delta.dim(2)?;
        let n = b * t;
        let q = u.queries()?;
        let m = self.to_gpu(mask)?;
        let mut tok = self.gpu.zeros::<f32>(q * n)?;
        let mut doc = self.gpu.zeros::<f32>(q * b)?;
        let inputs = vec![self.to_gpu(a)?, self.to_gpu(delta)?];
        let precision = self.precision;
        match u {
            LayerQuery::Dense(ut) => {
                let ug = self.cached(ut.id(), 0, || Ok(ut.clone()))?;
                let shape = (q, d_out, d_in, t);
                match self.inputs(inputs)? {
                    Inputs::F32(x) => self.gpu.score_tokens(
                        &ug, &x[0], &x[1], &m, &mut tok, &mut doc, shape, precision,
                    )?,
                    Inputs::Bf16(x) => self.gpu.score_tokens(
                        &ug, &x[0], &x[1], &m, &mut tok, &mut doc, shape, precision,
                    )?,
                }
            }
            LayerQuery::LowRank(lr) => {
                let rank = lr.rank()?;
                let p = self.cached(lr.p_scaled.id(), 0, || Ok(lr.p_scaled.clone()))?;
                let r = self.cached(lr.r.id(), 0, || Ok(lr.r.clone()))?;
                let shape = (q, d_out, d_in, rank, t);
                match self.inputs(inputs)? {
                    Inputs::F32(x) => self.gpu.score_tokens_lowrank(
                        &p, &r, &x[0], &x[1], &m, &mut tok, &mut doc, shape, precision,
                    )?,
                    Inputs::Bf16(x) => self.gpu.score_tokens_lowrank(
                        &p, &r, &x[0], &x[1], &m, &mut tok, &mut doc, shape, precision,
                    )?,
                }
            }
        }
        let host = self.gpu.download(&tok)?;
        Ok(Tensor::from_vec(host, (q, b, t), &Device::Cpu)?)
    }

    fn release(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }
}
