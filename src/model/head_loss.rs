//! Owns `head_cross_entropy` and `BLOCK_ROWS`: the fused output head and cross-entropy.
//! Layer: model — may import the ground, linalg, backend and, in this folder, custom_ops.rs,
//! fused.rs.
//!
//! The output head and the cross-entropy as one op, for a capture with data labels.
//!
//! For final hidden states x [N, d], head weight W [V, d], targets y and mask m:
//!
//! ℓ_n = m_n (logsumexp(z_n) − z_n\[y_n\]) with z_n = W x_n, and
//! ∂ℓ_n/∂x_n = m_n Wᵀ (softmax(z_n) − e_{y_n}).
//!
//! The forward computes both a block of rows at a time, reusing one [rows, V] buffer, so
//! the [N, V] logits and their gradient (the largest tensors of a capture: 2 × 201 MB for
//! 1024 tokens of a 49k vocabulary) are never held, allocated or page-faulted whole; the
//! backward only scales the stored ∂ℓ_n/∂x_n by the upstream gradient. The head's weight
//! gets no gradient (a capture never reads one). Same values and gradients as the head
//! followed by [`super::custom_ops::cross_entropy_rows`], to GEMM rounding (tests below).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

use super::custom_ops::{gemm_into, softmax_cross_entropy_row};
use super::fused::{f32_slice, storage_f32};

/// Rows per block: a [64, V] f32 buffer is 12.6 MB for V = 49,152.
pub const BLOCK_ROWS: usize = 64;

fn op_error(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(format!("head-cross-entropy: {}", msg.into()))
}

struct HeadCrossEntropy {
    /// W [V, d], detached, contiguous.
    w: Tensor,
    targets: Vec<u32>,
    mask: Vec<f32>,
    block_rows: usize,
    /// ∂ℓ_n/∂x_n / m_n for every row [N, d] (zeros where m_n = 0), formed by the forward.
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let x = f32_slice(s, l, "head-cross-entropy hidden states")?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let w = storage_f32(&w_storage, w_layout, "head-cross-entropy weight")?;
        let v = w.len() / d.max(1);
        if let Some(&y) = self.targets.iter().find(|&&y| y as usize >= v) {
            return Err(op_error(format!(
                "target {y} is out of range for {v} classes"
            )));
        }
        let rows = self.block_rows.min(n).max(1);
        let mut z: Vec<f32> = Vec::with_capacity(rows * v);
        let mut grad: Vec<f32> = Vec::with_capacity(n * d);
        let mut loss = vec![0f32; n];
        for r0 in (0..n).step_by(rows) {
            let nb = rows.min(n - r0);
            // SAFETY: x rows r0..r0+nb are nb·d elements; W [V, d] read as Wᵀ [d, V] (row
            // stride 1, column stride d); z has capacity rows·V ≥ nb·V and is fully written
            // before its length is set.
            unsafe {
                gemm_into(
                    nb,
                    v,
                    d,
                    z.as_mut_ptr(),
                    x[r0 * d..].as_ptr(),
                    w.as_ptr(),
                    1,
                    d as isize,
                );
                z.set_len(nb * v);
            }
            // Row by row, in place: z_n becomes softmax(z_n) − e_{y_n} (zero where m_n = 0).
            z.par_chunks_mut(v)
                .zip(loss[r0..r0 + nb].par_iter_mut())
                .enumerate()
                .for_each(|(k, (zr, l))| {
                    let r = r0 + k;
                    if self.mask[r] == 0.0 {
                        zr.iter_mut().for_each(|e| *e = 0.0);
                        return;
                    }
                    *l = self.mask[r] * softmax_cross_entropy_row(zr, self.targets[r] as usize);
                });
            // SAFETY: z is nb × V row-major; W [V, d] row-major; grad has capacity n·d and
            // rows r0..r0+nb (nb·d elements past its current length r0·d) are fully written
            // before the length is extended over them.
            unsafe {
                gemm_into(
                    nb,
                    d,
                    v,
                    grad.as_mut_ptr().add(r0 * d),
                    z.as_ptr(),
                    w.as_ptr(),
                    d as isize,
                    1,
                );
                grad.set_len((r0 + nb) * d);
            }
            // The next block overwrites z from the start.
            z.clear();
        }
        *self
            .grad
            .lock()
            .map_err(|_| op_error("state lock poisoned"))? = Some(grad);
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _l: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, d) = x.dims2()?;
        let mut grad = self
            .grad
            .lock()
            .map_err(|_| op_error("state lock poisoned"))?
            .take()
            .ok_or_else(|| op_error("backward before forward"))?;
        let up: Vec<f32> = g.to_dtype(DType::F32)?.to_vec1()?;
        grad.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
            let s = up[r] * self.mask[r];
            row.iter_mut().for_each(|e| *e *= s);
        });
        Ok(Some(Tensor::from_vec(grad, (n, d), x.device())?))
    }
}

/// Per-row ℓ_n = m_n (logsumexp(W x_n) − (W x_n)\[y_n\]) for hidden states `x` [N, d] (f32,
/// CPU), head weight `w` [V, d], `targets` y \[N\] and `mask` m \[N\]: \[N\], differentiable in x
/// only (see the module doc). Errors unless [`super::fused::applies`] to `x`.
pub fn head_cross_entropy(x: &Tensor, w: &Tensor, targets: &[u32], mask: &[f32]) -> Result<Tensor> {
    head_cross_entropy_blocked(x, w, targets, mask, BLOCK_ROWS)
}

fn head_cross_entropy_blocked(
    x: &Tensor,
    w: &Tensor,
    targets: &[u32],
    mask: &[f32],
    block_rows: usize,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    if targets.len() != n || mask.len() != n {
        return Err(crate::error::Error::Model(format!(
            "head-cross-entropy: {n} rows but {} targets and {} mask entries",
            targets.len(),
            mask.len()
        )));
    }
    let op = HeadCrossEntropy {
        w: w.detach().contiguous()?,
        targets: targets.to_vec(),
        mask: mask.to_vec(),
        block_rows,
        grad: Mutex::new(None),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::custom_ops::cross_entropy_rows;
    use crate::model::fused::tests::max_abs_diff;
    use candle_core::{Device, Var};

    /// Against the head as a plain product followed by the fused row cross-entropy (itself
    /// tested against the composed log-softmax): losses and ∂/∂x, with a block size that
    /// does not divide the rows, masked rows, and an upstream gradient that is not all ones.
    #[test]
    fn matches_the_head_then_the_row_cross_entropy() {
        let dev = Device::Cpu;
        let (n, d, v) = (13, 6, 40);
        let x = Var::randn(0f32, 1.0, (n, d), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let mask: Vec<f32> = (0..n).map(|i| (i % 4 != 1) as u8 as f32).collect();
        let up = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        for block in [1, 5, 13, 64] {
            let got =
                head_cross_entropy_blocked(x.as_tensor(), &w, &targets, &mask, block).unwrap();
            let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let want = cross_entropy_rows(&logits, &targets, &mask)
                .unwrap()
                .unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "block {block}: losses");
            let g = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (gx, gx_want) = (
                g.get(x.as_tensor()).unwrap(),
                gw.get(x.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(gx, gx_want) < 1e-5, "block {block}: ∂/∂x");
            // Masked rows get no gradient at all.
            let rows: Vec<Vec<f32>> = gx.to_vec2().unwrap();
            for (r, row) in rows.iter().enumerate() {
                if mask[r] == 0.0 {
                    assert!(row.iter().all(|&e| e == 0.0), "row {r}");
                }
            }
        }
        let e = head_cross_entropy(x.as_tensor(), &w, &[v as u32; 13], &mask)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}
