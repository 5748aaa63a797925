//! Owns `Gpu`: one GPU with the kernels loaded, its buffers and shape-checked kernel launchers.
//! Layer: backend — may import the ground, linalg and, in this folder, mod.rs (`KERNEL_NAMES`),
//! nvrtc.rs, precision.rs.
//!
//! One GPU with the kernels of [`KERNELS_CU`](super::KERNELS_CU) loaded, and host-side
//! launchers that check shapes before launching. Buffers are cudarc device slices, row-major.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::error::{Error, Result};

use super::nvrtc::{arch_name, compile_kernels};
use super::precision::Precision;
use super::KERNEL_NAMES;

/// A device buffer of `T` (row-major).
pub type GpuBuffer<T> = CudaSlice<T>;

const TILE: usize = 64;
const THREADS: u32 = 256;

/// An input element type the kernels read: f32, or bf16 stored as its 16-bit pattern (u16).
pub trait KernelInput: DeviceRepr + ValidAsZeroBits + Copy {
    /// The suffix of the kernel entry points for this type.
    const SUFFIX: &'static str;
}
impl KernelInput for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelInput for u16 {
    const SUFFIX: &'static str = "bf16";
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// A CUDA device, its default stream, and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// The NVRTC architecture the kernels were compiled for, e.g. "sm_90".
    pub arch: &'static str,
    /// The device's name.
    pub name: String,
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it. `Ok(None)` when there is no
    /// CUDA driver or no device (the caller falls back to the CPU or reports SKIPPED); an
    /// error when a device is there but the kernels cannot be made ready (NVRTC missing, a
    /// compilation failure).
    pub fn new(ordinal: usize) -> Result<Option<Gpu>> {
        #[cfg(not(feature = "cuda"))]
        {
            // SAFETY: only tries to dlopen the driver library by its candidate names.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Ok(None);
            }
        }
        match CudaContext::device_count() {
            Ok(n) if (n as usize) > ordinal => {}
            _ => return Ok(None),
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the CUDA device"))?;
        Gpu::from_stream(ctx.default_stream()).map(Some)
    }

    /// The kernels on an existing stream (and its context): candle's CUDA device's stream
    /// in a `--features cuda` build, so that tensors candle computed are read in order and
    /// without copies between contexts.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Gpu> {
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("reading the compute capability"))?;
        let arch = arch_name(major, minor)?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let ptx = compile_kernels(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(cuda_err("loading the kernels' PTX"))?;
        let mut funcs = HashMap::new();
        for name in KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| Error::Cuda(format!("kernel {name} not in the module: {e:?}")))?;
            funcs.insert(*name, f);
        }
        Ok(Gpu {
            ctx,
            stream,
            funcs,
            arch,
            name,
        })
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Copies a host slice to the device.
    pub fn upload<T: DeviceRepr>(&self, x: &[T]) -> Result<GpuBuffer<T>> {
        self.stream
            .clone_htod(x)
            .map_err(cuda_err("copy to device"))
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, x: &GpuBuffer<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(x).map_err(cuda_err("copy to host"))
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<GpuBuffer<T>> {
        self.stream.alloc_zeros(len).map_err(cuda_err("allocating"))
    }

    /// Waits for all launched work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    fn func(&self, base: &str, suffix: &str) -> Result<&CudaFunction> {
        let key = if suffix.is_empty() {
            base.to_string()
        } else {
            format!("{base}_{suffix}")
        };
        self.funcs
            .get(key.as_str())
            .ok_or_else(|| Error::Cuda(format!("kernel {key} is not loaded")))
    }

    fn tf32_flag<T: KernelInput>(precision: Precision) -> Result<i32> {
        match (precision, T::SUFFIX) {
            (Precision::Bf16, "bf16") | (Precision::F32, "f32") => Ok(0),
            (Precision::Tf32, "f32") => Ok(1),
            (p, s) => Err(Error::Cuda(format!(
                "precision {p:?} does not go with {s} inputs (bf16 needs u16 buffers, \
                 f32 and tf32 need f32 buffers)"
            ))),
        }
    }

    /// Σ_t m_t x_t x_tᵀ added into each layer's `outs[l]` [d_l, d_l] (lower-triangle tiles;
    /// call [`mirror_lower`] on the downloaded result), for layers `xs[l]` [n, d_l] sharing
    /// the token weights `mask` \[n\]: one launch for all layers (docs/design.md §3.1).
    pub fn masked_syrk<T: KernelInput>(
        &self,
        xs: &[(&GpuBuffer<T>, usize)],
        mask: &GpuBuffer<f32>,
        outs: &mut [GpuBuffer<f32>],
        precision: Precision,
    ) -> Result<()> {
        let tf32 = Self::tf32_flag::<T>(precision)?;
        let n = mask.len();
        if xs.len() != outs.len() || xs.is_empty() {
            return Err(Error::Cuda(format!(
                "masked_syrk: {} inputs but {} outputs",
                xs.len(),
                outs.len()
            )));
        }
        let mut ptrs = Vec::new();
        let mut out_ptrs = Vec::new();
        let mut dims = Vec::new();
        let mut starts = Vec::new();
        let mut tiles = 0i64;
        for (l, ((x, d), out)) in xs.iter().zip(outs.iter_mut()).enumerate() {
            if x.len() != n * d || out.len() != d * d {
                return Err(Error::Cuda(format!(
                    "masked_syrk layer {l}: input has {} elements for [{n}, {d}], output {} \
                     for [{d}, {d}]",
                    x.len(),
                    out.len()
                )));
            }
            let (p, _g) = x.device_ptr(&self.stream);
            ptrs.push(p);
            let (po, _go) = out.device_ptr_mut(&self.stream);
            out_ptrs.push(po);
            dims.push(*d as i32);
            starts.push(tiles);
            let t = d.div_ceil(TILE) as i64;
            tiles += t * (t + 1) / 2;
        }
        let ptrs = self.upload(&ptrs)?;
        let out_ptrs = self.upload(&out_ptrs)?;
        let dims = self.upload(&dims)?;
        let starts = self.upload(&starts)?;
        let layers = xs.len() as i32;
        let n = n as i64;
        let f = self.func("masked_syrk", T::SUFFIX)?;
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(&ptrs)
            .arg(&out_ptrs)
            .arg(&dims)
            .arg(&starts)
            .arg(&layers)
            .arg(mask)
            .arg(&n)
            .arg(&tf32);
        // SAFETY: argument types and counts match masked_syrk_* in kernels.cu; every buffer's
        // length was checked against the shapes above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("masked_syrk launch"))?;
        self.synchronize()
    }

    /// out[i, j] += Σ_b ((Σ_{t ∈ b} m_t dr_t ar_tᵀ)[i, j])² for rotated gradients `dr`
    /// [docs·seq, d_out] and activations `ar` [docs·seq, d_in] (docs/design.md §3.3).
    #[allow(clippy::too_many_arguments)]
    pub fn eig_correction<T: KernelInput>(
        &self,
        dr: &GpuBuffer<T>,
        ar: &GpuBuffer<T>,
        mask: &GpuBuffer<f32>,
        out: &mut GpuBuffer<f32>,
        (docs, seq, d_out, d_in): (usize, usize, usize, usize),
        precision: Precision,
    ) -> Result<()> {
        let tf32 = Self::tf32_flag::<T>(precision)?;
        let n = docs * seq;
        if dr.len() != n * d_out || ar.len() != n * d_in || mask.len() != n {
            return Err(Error::Cuda(format!(
                "eig_correction: shapes do not match {docs} documents × {seq} tokens, \
                 d_out {d_out}, d_in {d_in}"
            )));
        }
        if out.len() != d_out * d_in {
            return Err(Error::Cuda(format!(
                "eig_correction: output has {} elements, not [{d_out}, {d_in}]",
                out.len()
            )));
        }
        let f = self.func("eig_correction", T::SUFFIX)?;
        let cfg = LaunchConfig {
            grid_dim: (d_in.div_ceil(TILE) as u32, d_out.div_ceil(TILE) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d_out, d_in, docs, seq) = (d_out as i32, d_in as i32, docs as i32, seq as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(dr)
            .arg(ar)
            .arg(mask)
            .arg(out)
            .arg(&d_out)
            .arg(&d_in)
            .arg(&docs)
            .arg(&seq)
            .arg(&tf32);
        // SAFETY: argument types match eig_correction_* in kernels.cu; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("eig_correction launch"))?;
        self.synchronize()
    }

    /// tok[q, t] += m_t δ_tᵀ U_q a_t and doc[q, b] += its sum over document b (documents of
    /// `seq` consecutive tokens) for `u` [Q, d_out, d_in], `a` [n, d_in], `delta` [n, d_out]
    /// (docs/design.md §2, token level), in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn score_tokens<T: KernelInput>(
        &self,
        u: &GpuBuffer<f32>,
        a: &GpuBuffer<T>,
        delta: &GpuBuffer<T>,
        mask: &GpuBuffer<f32>,
        tok: &mut GpuBuffer<f32>,
        doc: &mut GpuBuffer<f32>,
        (queries, d_out, d_in, seq): (usize, usize, usize, usize),
        precision: Precision,
    ) -> Result<()> {
        let tf32 = Self::tf32_flag::<T>(precision)?;
        let n = mask.len();
        let docs = n.div_ceil(seq.max(1));
        if seq == 0
            || u.len() != queries * d_out * d_in
            || a.len() != n * d_in
            || delta.len() != n * d_out
            || tok.len() != queries * n
            || doc.len() != queries * docs
        {
            return Err(Error::Cuda(format!(
                "score_tokens: shapes do not match {queries} queries, {n} tokens \
                 ({docs} documents of {seq}), d_out {d_out}, d_in {d_in}"
            )));
        }
        let f = self.func("score_tokens", T::SUFFIX)?;
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(TILE) as u32,
                (queries * d_out.div_ceil(TILE)) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (q, d_out, d_in, n, seq) = (
            queries as i32,
            d_out as i32,
            d_in as i32,
            n as i64,
            seq as i32,
        );
        let mut b = self.stream.launch_builder(f);
        b.arg(u)
            .arg(a)
            .arg(delta)
            .arg(mask)
            .arg(tok)
            .arg(doc)
            .arg(&q)
            .arg(&d_out)
            .arg(&d_in)
            .arg(&n)
            .arg(&seq)
            .arg(&tf32);
        // SAFETY: argument types match score_tokens_* in kernels.cu; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(cuda_err("score_tokens launch"))?;
        self.synchronize()
    }

    /// tok[q, t] += m_t Σ_k (δ_tᵀ P_q)\[k\] (a_tᵀ R_q)\[k\] and doc[q, b] += its sum over
    /// document b, for the low-rank query U_q = P_q R_qᵀ with `p` [Q, d_out, r] (σ-scaled
    /// left singular vectors) and `r` [Q, d_in, r]: the token contraction of
    /// [`crate::linalg::LowRankQuery`] in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn score_tokens_lowrank<T: KernelInput>(
        &self,
        p: &GpuBuffer<f32>,
        r: &GpuBuffer<f32>,
        a: &GpuBuffer<T>,
        delta: &GpuBuffer<T>,
        mask: &GpuBuffer<f32>,
        tok: &mut GpuBuffer<f32>,
        doc: &mut GpuBuffer<f32>,
        (queries, d_out, d_in, rank, seq): (usize, usize, usize, usize, usize),
        precision: Precision,
    ) -> Result<()> {
        let tf32 = Self::tf32_flag::<T>(precision)?;
        let n = mask.len();
        let docs = n.div_ceil(seq.max(1));
        if seq == 0
            || rank == 0
            || p.len() != queries * d_out * rank
            || r.len() != queries * d_in * rank
            || a.len() != n * d_in
            || delta.len() != n * d_out
            || tok.len() != queries * n
            || doc.len() != queries * docs
        {
            return Err(Error::Cuda(format!(
                "score_tokens_lowrank: shapes do not match {queries} queries of rank {rank}, \
                 {n} tokens ({docs} documents of {seq}), d_out {d_out}, d_in {d_in}"
            )));
        }
        let f = self.func("score_tokens_lowrank", T::SUFFIX)?;
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(TILE) as u32,
                (queries * rank.div_ceil(TILE)) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (q, d_out, d_in, rank, n, seq) = (
            queries as i32,
            d_out as i32,
            d_in as i32,
            rank as i32,
            n as i64,
            seq as i32,
        );
        let mut b = self.stream.launch_builder(f);
        b.arg(p)
            .arg(r)
            .arg(a)
            .arg(delta)
            .arg(mask)
            .arg(tok)
            .arg(doc)
            .arg(&q)
            .arg(&d_out)
            .arg(&d_in)
            .arg(&rank)
            .arg(&n)
            .arg(&seq)
            .arg(&tf32);
        // SAFETY: argument types match score_tokens_lowrank_* in kernels.cu; lengths checked.
        unsafe { b.launch(cfg) }.map_err(cuda_err("score_tokens_lowrank launch"))?;
        self.synchronize()
    }

    /// `x` rounded to bf16 (round to nearest even) on the device: the inputs of the bf16
    /// kernels, bit-identical to [`super::reference::to_bf16`].
    pub fn to_bf16(&self, x: &GpuBuffer<f32>) -> Result<GpuBuffer<u16>> {
        let n = x.len();
        if n == 0 {
            return Err(Error::Cuda("to_bf16: empty input".into()));
        }
        let mut y = self.zeros::<u16>(n)?;
        let f = self.func("f32_to_bf16", "")?;
        let blocks = n.div_ceil(THREADS as usize).min(65_535) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = n as i64;
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(&mut y).arg(&n);
        // SAFETY: x has n f32, y n u16 (grid-stride loop bounded by n).
        unsafe { b.launch(cfg) }.map_err(cuda_err("f32_to_bf16 launch"))?;
        Ok(y)
    }

    /// The eigenbasis primitive Q_S (W ⊙ (Q_Sᵀ V_q Q_A)) Q_Aᵀ for every vector V_q of `v`
    /// [Q, d_out, d_in] with weights `w` [d_out, d_in] (docs/design.md §3.4): four batched
    /// GEMMs, W applied inside the second.
    pub fn apply_in_basis(
        &self,
        q_s: &GpuBuffer<f32>,
        q_a: &GpuBuffer<f32>,
        w: &GpuBuffer<f32>,
        v: &GpuBuffer<f32>,
        (queries, d_out, d_in): (usize, usize, usize),
        precision: Precision,
    ) -> Result<GpuBuffer<f32>> {
        let tf32 = Self::tf32_flag::<f32>(precision)?;
        let per = d_out * d_in;
        if q_s.len() != d_out * d_out
            || q_a.len() != d_in * d_in
            || w.len() != per
            || v.len() != queries * per
        {
            return Err(Error::Cuda(format!(
                "apply_in_basis: shapes do not match {queries} queries of [{d_out}, {d_in}]"
            )));
        }
        let (o, i, pe) = (d_out as i64, d_in as i64, per as i64);
        let mut t1 = self.zeros::<f32>(queries * per)?;
        let mut t2 = self.zeros::<f32>(queries * per)?;
        // T1 = V Q_A; R = (Q_Sᵀ T1) ⊙ W; T2 = R Q_Aᵀ; out = Q_S T2.
        let g = Gemm {
            m: d_out,
            n: d_in,
            batch: queries,
            tf32,
        };
        self.gemm(&g, (v, pe, i, 1), (q_a, 0, i, 1), &mut t1, i, None)?;
        self.gemm(&g, (q_s, 0, 1, o), (&t1, pe, i, 1), &mut t2, o, Some(w))?;
        self.gemm(&g, (&t2, pe, i, 1), (q_a, 0, 1, i), &mut t1, i, None)?;
        self.gemm(&g, (q_s, 0, o, 1), (&t1, pe, i, 1), &mut t2, o, None)?;
        self.synchronize()?;
        Ok(t2)
    }

    /// x Q for `x` [rows, d] and `q` [d, d]: the rotation of activations or output
    /// gradients into a factor's eigenbasis (a Q_A, δ Q_S) before the eigenvalue correction.
    pub fn rotate_rows(
        &self,
        x: &GpuBuffer<f32>,
        q: &GpuBuffer<f32>,
        rows: usize,
        d: usize,
        precision: Precision,
    ) -> Result<GpuBuffer<f32>> {
        let tf32 = Self::tf32_flag::<f32>(precision)?;
        if x.len() != rows * d || q.len() != d * d {
            return Err(Error::Cuda(format!(
                "rotate_rows: {} and {} elements for [{rows}, {d}] and [{d}, {d}]",
                x.len(),
                q.len()
            )));
        }
        let mut out = self.zeros::<f32>(rows * d)?;
        let g = Gemm {
            m: rows,
            n: d,
            batch: 1,
            tf32,
        };
        let d = d as i64;
        self.gemm(&g, (x, 0, d, 1), (q, 0, d, 1), &mut out, d, None)?;
        self.synchronize()?;
        Ok(out)
    }

    /// C[b] = A[b] B[b] (· W elementwise when `weights` is given), with operands given
    /// as (buffer, batch stride, row stride, column stride) and C row-major [m, n].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        g: &Gemm,
        a: (&GpuBuffer<f32>, i64, i64, i64),
        b: (&GpuBuffer<f32>, i64, i64, i64),
        c: &mut GpuBuffer<f32>,
        k: i64,
        weights: Option<&GpuBuffer<f32>>,
    ) -> Result<()> {
        let f = self.func("gemm_weighted", "")?;
        let cfg = LaunchConfig {
            grid_dim: (
                g.n.div_ceil(TILE) as u32,
                g.m.div_ceil(TILE) as u32,
                g.batch as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m, n, k) = (g.m as i32, g.n as i32, k as i32);
        let null: u64 = 0;
        let mut l = self.stream.launch_builder(f);
        l.arg(a.0).arg(&a.1).arg(&a.2).arg(&a.3);
        l.arg(b.0).arg(&b.1).arg(&b.2).arg(&b.3);
        l.arg(c).arg(&m).arg(&n).arg(&k);
        match weights {
            Some(w) => l.arg(w),
            None => l.arg(&null),
        };
        l.arg(&g.tf32);
        // SAFETY: argument types match gemm_weighted in kernels.cu; the caller checked the
        // buffer lengths against m, n, k and the batch.
        unsafe { l.launch(cfg) }.map_err(cuda_err("gemm_weighted launch"))?;
        Ok(())
    }
}

struct Gemm {
    m: usize,
    n: usize,
    batch: usize,
    tf32: i32,
}

/// Copies the lower triangle of a row-major [d, d] matrix onto the upper one (the
/// covariance kernel writes lower-triangle tiles only).
pub fn mirror_lower(m: &mut [f32], d: usize) {
    for i in 0..d {
        for j in i + 1..d {
            m[i * d + j] = m[j * d + i];
        }
    }
}
