//! Owns the capture's custom ops: `linear_input_grad_only`, `cross_entropy_rows`, `gemm_into`.
//! Layer: model — may import the ground, linalg, backend and, in this folder, fused.rs.
//!
//! Two candle custom ops with hand-written backward passes that make a capture (one forward +
//! backward that only needs ∂L/∂(layer outputs)) cheaper in time and memory on the CPU:
//!
//! * [`linear_input_grad_only`]: y = x Wᵀ whose backward returns ∂L/∂x = (∂L/∂y) W and
//!   nothing for W. candle's own matmul backward always forms ∂L/∂W as well (2·n·d_in·d_out
//!   FLOPs and a [d_out, d_in] gradient per layer, for the tied head a [V, d] one), which a
//!   capture never reads.
//! * [`cross_entropy_rows`]: ℓ_n = m_n (logsumexp(z_n) − z_n\[y_n\]) per row of logits z [N, V],
//!   fused: one pass forms the losses and softmax(z_n) − e_{y_n}, which the backward scales
//!   in place by m_n ∂L/∂ℓ_n. The composed log-softmax keeps about ten [N, V] tensors alive
//!   (shifted, exp, log-softmax and each of their gradients); this keeps two (z and ∂L/∂z).
//!
//! Both give the same values and gradients as the composed ops (tests below, and the
//! finite-difference and kronfluence tests of the whole model).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::Result;

use super::fused::{f32_slice, storage_f32};

/// Worker threads for the row loops: the cores available (RAYON_NUM_THREADS if set, as
/// candle's and faer's pools use).
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("custom op state lock poisoned".into())
}

/// Where the backward of [`linear_input_grad_only`] leaves ∂L/∂y (δ of a tracked layer).
pub type DeltaSlot = std::sync::Arc<Mutex<Option<Tensor>>>;

/// dst [m, n] = a [m, k] · b, with b given by its strides (row-major dst and a).
///
/// # Safety
/// `a` holds m·k elements, `b` addresses k × n elements through `(b_rs, b_cs)`, `dst` has
/// room for m·n elements; `dst` is written, never read.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: *const f32,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
) {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m, n, k, dst, 1, n as isize, false, a, 1, k as isize, b, b_cs, b_rs, 0.0, 1.0, false,
        false, false, par,
    );
}

struct InputGradLinear {
    shape: Shape,
    /// W [d_out, d_in], detached, contiguous.
    w: Tensor,
    /// Receives ∂L/∂y when the backward runs.
    delta: Option<DeltaSlot>,
}

impl CustomOp1 for InputGradLinear {
    fn name(&self) -> &'static str {
        "linear-input-grad-only"
    }

    /// y = x Wᵀ, written by the GEMM straight into the output's storage (candle's matmul
    /// followed by a copy out of its tensor cost an allocation and a pass over y per layer).
    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d_out = self.w.dim(0)?;
        let d_in = self.w.dim(1)?;
        let n = l.shape().elem_count() / d_in.max(1);
        let x = f32_slice(x, l, "linear-input-grad-only input")?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let w = storage_f32(&w_storage, w_layout, "linear-input-grad-only weight")?;
        let mut y: Vec<f32> = Vec::with_capacity(n * d_out);
        // SAFETY: x is [n, d_in] row-major, W [d_out, d_in] row-major read as Wᵀ [d_in, d_out]
        // (row stride 1, column stride d_in), y has capacity n·d_out; the GEMM writes every
        // element of y without reading it, so y's length is set only after it is written.
        unsafe {
            gemm_into(
                n,
                d_out,
                d_in,
                y.as_mut_ptr(),
                x.as_ptr(),
                w.as_ptr(),
                1,
                d_in as isize,
            );
            y.set_len(n * d_out);
        }
        Ok((CpuStorage::F32(y), self.shape.clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(slot) = &self.delta {
            *slot.lock().map_err(|_| poisoned())? = Some(g.detach());
        }
        let d_out = self.w.dim(0)?;
        let n = g.elem_count() / d_out;
        let gx = g.reshape((n, d_out))?.matmul(&self.w)?;
        Ok(Some(gx.reshape(x.shape())?))
    }
}

/// Whether [`linear_input_grad_only`] runs as the custom op (f32 on the CPU) for input `x`:
/// only then is a [`DeltaSlot`] filled by the backward.
pub fn is_custom_linear(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// y = x Wᵀ for x [..., d_in] (f32, CPU) and W [d_out, d_in], differentiable in x only: the
/// backward computes ∂L/∂x = (∂L/∂y) W and no gradient for W, and leaves ∂L/∂y in `delta`
/// when given (a capture's δ, with no extra tensor in the graph). Other devices and dtypes
/// use candle's matmul (which also forms ∂L/∂W) and never fill `delta`
/// (see [`is_custom_linear`]).
pub fn linear_input_grad_only(x: &Tensor, w: &Tensor, delta: Option<DeltaSlot>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let d_in = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / d_in.max(1);
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    if !is_custom_linear(x) {
        return Ok(x.reshape((n, d_in))?.matmul(&w.t()?)?.reshape(dims)?);
    }
    let w = w.detach().contiguous()?;
    let x = x.contiguous()?;
    let op = InputGradLinear {
        shape: Shape::from(dims),
        w,
        delta,
    };
    Ok(x.apply_op1(op)?)
}

/// One row of logits z with target y (< z.len()), in place: z ← softmax(z) − e_y (the
/// cross-entropy's gradient in z); returns the cross-entropy logsumexp(z) − z[y]. Shared by
/// [`cross_entropy_rows`] and the fused head ([`super::head_loss`]).
pub(crate) fn softmax_cross_entropy_row(z: &mut [f32], y: usize) -> f32 {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let zy = z[y];
    let mut sum = 0f32;
    for e in z.iter_mut() {
        *e = (*e - m).exp();
        sum += *e;
    }
    let inv = 1.0 / sum;
    z.iter_mut().for_each(|e| *e *= inv);
    z[y] -= 1.0;
    sum.ln() - (zy - m)
}

struct CrossEntropyRows {
    targets: Vec<u32>,
    mask: Vec<f32>,
    /// softmax(z_n) − e_{y_n} for masked rows (zeros elsewhere), formed by the forward.
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let z = f32_slice(s, l, "cross-entropy-rows logits")?;
        let mut grad = vec![0f32; n * v];
        let mut loss = vec![0f32; n];
        let rows = |first: usize, g: &mut [f32], l: &mut [f32]| -> candle_core::Result<()> {
            for (k, (g, l)) in g.chunks_mut(v).zip(l.iter_mut()).enumerate() {
                let r = first + k;
                if self.mask[r] == 0.0 {
                    continue;
                }
                let zr = &z[r * v..(r + 1) * v];
                let y = self.targets[r] as usize;
                if y >= v {
                    return Err(candle_core::Error::Msg(format!(
                        "cross-entropy-rows: target {y} is out of range for {v} classes"
                    )));
                }
                g.copy_from_slice(zr);
                *l = self.mask[r] * softmax_cross_entropy_row(g, y);
            }
            Ok(())
        };
        let per = n.div_ceil(threads()).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = grad
                .chunks_mut(per * v)
                .zip(loss.chunks_mut(per))
                .enumerate()
                .map(|(i, (g, l))| s.spawn(move || rows(i * per, g, l)))
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|_| Err(poisoned())))
        })?;
        *self.grad.lock().map_err(|_| poisoned())? = Some(grad);
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, z: &Tensor, _l: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = z.dims2()?;
        let mut grad = self
            .grad
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("cross-entropy-rows: no forward".into()))?;
        let up: Vec<f32> = g.to_dtype(DType::F32)?.to_vec1()?;
        for (r, row) in grad.chunks_mut(v).enumerate() {
            let s = up[r] * self.mask[r];
            row.iter_mut().for_each(|x| *x *= s);
        }
        Ok(Some(Tensor::from_vec(grad, (n, v), z.device())?))
    }
}

/// Per-row masked cross-entropy ℓ_n = m_n (log Σ_v exp z_{n,v} − z_{n,y_n}) for logits
/// z [N, V] (f32, CPU), targets y \[N\] and mask m \[N\] (0 rows contribute nothing and get no
/// gradient); differentiable in z, without keeping the log-softmax intermediates. `None`
/// where the fused op does not apply (another device or dtype): use the composed ops.
pub fn cross_entropy_rows(z: &Tensor, targets: &[u32], mask: &[f32]) -> Result<Option<Tensor>> {
    if !z.device().is_cpu() || z.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = CrossEntropyRows {
        targets: targets.to_vec(),
        mask: mask.to_vec(),
        grad: Mutex::new(None),
    };
    Ok(Some(z.contiguous()?.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::tests::max_abs_diff;
    use crate::model::ops::log_softmax_last;
    use candle_core::{Device, Var, D};

    #[test]
    fn linear_matches_matmul_in_value_and_input_gradient_and_skips_the_weight() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let y = linear_input_grad_only(x.as_tensor(), w.as_tensor(), None).unwrap();
        let want = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        assert!(max_abs_diff(&y, &want) < 1e-5);
        let g = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gx_want) = (
            g.get(x.as_tensor()).unwrap(),
            gw.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(gx, gx_want) < 1e-5);
        assert!(g.get(w.as_tensor()).is_none(), "no weight gradient");
        assert!(gw.get(w.as_tensor()).is_some());
    }

    #[test]
    fn cross_entropy_matches_composed_log_softmax_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (n, v) = (6, 11);
        let z = Var::randn(0f32, 3.0, (n, v), &dev).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let mask: Vec<f32> = (0..n).map(|i| (i % 3 != 1) as u8 as f32).collect();
        let up = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let got = cross_entropy_rows(z.as_tensor(), &targets, &mask)
            .unwrap()
            .unwrap();
        let t = Tensor::from_vec(targets.clone(), (n, 1), &dev).unwrap();
        let m = Tensor::from_vec(mask.clone(), n, &dev).unwrap();
        let want = (log_softmax_last(z.as_tensor())
            .unwrap()
            .gather(&t, D::Minus1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap()
            .neg()
            .unwrap()
            * &m)
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let g = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            g.get(z.as_tensor()).unwrap(),
            gw.get(z.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, b) < 1e-5);
        // Masked rows: no gradient at all.
        let row: Vec<f32> = a.get(1).unwrap().to_vec1().unwrap();
        assert!(row.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn cross_entropy_rejects_out_of_range_targets() {
        let dev = Device::Cpu;
        let z = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let err = cross_entropy_rows(&z, &[0, 3], &[1.0, 1.0]).unwrap_err();
        assert!(
            err.to_string().contains("target 3 is out of range"),
            "{err}"
        );
    }
}
