//! Owns fused CPU RMSNorm, RoPE and masked softmax (`rms_norm`, `apply_rope`,
//! `masked_softmax`) and the f32 storage helpers.
//! Layer: model — may import the ground, linalg and backend; no sibling.
//!
//! Fused RMSNorm, RoPE and attention's masked softmax for f32 tensors on the CPU: one pass
//! forward, one pass backward, with hand-written gradients. Composed from candle ops (see
//! [`super::ops`]) each is five to eight elementwise tensors per call, every one of them kept
//! by the autograd graph and swept again by the backward; fused, the graph keeps the input
//! and one scalar per row (RMSNorm), nothing (RoPE) or the probabilities (softmax). All give
//! the values and gradients of the composed forms to rounding (tests in `ops.rs`; the
//! finite-difference and reference tests of whole models).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Rows handled per parallel task (rows are a few hundred to a few thousand floats).
const ROWS_PER_TASK: usize = 64;

fn msg(m: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(m.into())
}

/// The f32 elements of a contiguous CPU storage.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(msg(format!("{what}: expected a contiguous f32 tensor"))),
    }
}

/// [`f32_slice`] of a tensor's storage (`Tensor::storage_and_layout`), e.g. a detached
/// weight an op reads beside its input.
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, what),
        _ => Err(msg(format!("{what}: expected a tensor in host memory"))),
    }
}

/// A tensor's elements as f32, row-major.
fn f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Whether the fused ops apply to `x` (f32 on the CPU).
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

struct RmsNorm {
    eps: f64,
    /// r_n = 1/√(mean(x_n²) + ε) per row, from the forward.
    inv_rms: Mutex<Option<Vec<f32>>>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "fused-rms-norm input")?;
        let w = f32_slice(ws, wl, "fused-rms-norm weight")?;
        let d = w.len();
        if d == 0 || xl.dims().last() != Some(&d) {
            return Err(msg(format!(
                "fused-rms-norm: input {:?} and weight [{d}] disagree",
                xl.dims()
            )));
        }
        let rows = x.len() / d;
        let mut y = vec![0f32; x.len()];
        let mut r = vec![0f32; rows];
        y.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(r.par_chunks_mut(ROWS_PER_TASK))
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .for_each(|((y, r), x)| {
                for ((y, r), x) in y.chunks_mut(d).zip(r.iter_mut()).zip(x.chunks(d)) {
                    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
                    let inv = (1.0 / (ms + self.eps).sqrt()) as f32;
                    *r = inv;
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = x * inv * w;
                    }
                }
            });
        *self
            .inv_rms
            .lock()
            .map_err(|_| msg("fused-rms-norm: lock"))? = Some(r);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    /// With g = ∂L/∂y, u = g ⊙ w and r the row's inverse RMS:
    /// ∂L/∂x = r u − x r³ (u·x)/d, ∂L/∂w = Σ_rows g ⊙ x r.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let r = self
            .inv_rms
            .lock()
            .map_err(|_| msg("fused-rms-norm: lock"))?
            .take()
            .ok_or_else(|| msg("fused-rms-norm: backward without a forward"))?;
        let (xv, wv, gv) = (f32_vec(x)?, f32_vec(w)?, f32_vec(g)?);
        let d = wv.len();
        let mut dx = vec![0f32; xv.len()];
        // ∂L/∂w: one partial sum per fixed block of rows, added in block order, so the
        // result does not depend on the number of threads.
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS_PER_TASK * d)
            .zip(r.par_chunks(ROWS_PER_TASK))
            .zip(xv.par_chunks(ROWS_PER_TASK * d))
            .zip(gv.par_chunks(ROWS_PER_TASK * d))
            .map(|(((dx, r), x), g)| {
                let mut dw = vec![0f32; d];
                for (((dx, &r), x), g) in dx.chunks_mut(d).zip(r).zip(x.chunks(d)).zip(g.chunks(d))
                {
                    let ux: f32 = g.iter().zip(&wv).zip(x).map(|((g, w), x)| g * w * x).sum();
                    let c = r * r * r * ux / d as f32;
                    for j in 0..d {
                        dx[j] = r * g[j] * wv[j] - x[j] * c;
                        dw[j] += g[j] * x[j] * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in partial {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?.to_dtype(w.dtype())?),
        ))
    }
}

/// RMSNorm y = x / √(mean(x²) + ε) ⊙ w over the last dimension, fused. x: [.., d] f32 on the
/// CPU (see [`applies`]), w: \[d\].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNorm {
        eps,
        inv_rms: Mutex::new(None),
    };
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.contiguous()?.apply_op2(&w, op)?)
}

struct Rope {
    /// cos, sin [T, D], row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    d: usize,
}

impl Rope {
    /// y_i = x_i cos_i + rot(x)_i sin_i, rot(x) = [−x₂, x₁], over rows of D with position
    /// t = row mod T. With `transpose`, the adjoint: y_i = x_i cos_i + rotᵀ(x ⊙ sin)_i,
    /// rotᵀ(z) = [z₂, −z₁] (the backward).
    fn run(&self, x: &[f32], transpose: bool) -> Vec<f32> {
        let (d, h) = (self.d, self.d / 2);
        let t = self.cos.len() / d;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (k, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let p = (task * ROWS_PER_TASK + k) % t;
                    let (c, s) = (&self.cos[p * d..][..d], &self.sin[p * d..][..d]);
                    for i in 0..h {
                        if transpose {
                            y[i] = x[i] * c[i] + x[i + h] * s[i + h];
                            y[i + h] = x[i + h] * c[i + h] - x[i] * s[i];
                        } else {
                            y[i] = x[i] * c[i] - x[i + h] * s[i];
                            y[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
                        }
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "fused-rope input")?;
        Ok((CpuStorage::F32(self.run(x, false)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gv = f32_vec(g)?;
        Ok(Some(Tensor::from_vec(
            self.run(&gv, true),
            x.shape(),
            x.device(),
        )?))
    }
}

/// RoPE in the rotate-half form, x ⊙ cos + rot(x) ⊙ sin with rot(x) = [−x₂, x₁], fused.
/// x: [B, H, T, D] f32 on the CPU (see [`applies`]), cos/sin: [T, D].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if cos.dims() != [t, d] || sin.dims() != [t, d] || d % 2 != 0 {
        return Err(crate::error::Error::Model(format!(
            "RoPE: tables {:?} / {:?} do not fit queries or keys {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        )));
    }
    let op = Rope {
        cos: f32_vec(cos)?,
        sin: f32_vec(sin)?,
        d,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct MaskedSoftmax {
    /// The additive mask [T, S] (0 or −∞), row-major.
    mask: Vec<f32>,
    /// s, the scale of the scores.
    scale: f32,
    /// S, the row length.
    s: usize,
}

impl MaskedSoftmax {
    /// p = softmax(s·x + m) over rows of S, the mask row of row r being r mod T. A row whose
    /// every entry is masked gives zeros.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (s, t) = (self.s, self.mask.len() / self.s);
        let mut p = vec![0f32; x.len()];
        p.par_chunks_mut(ROWS_PER_TASK * s)
            .zip(x.par_chunks(ROWS_PER_TASK * s))
            .enumerate()
            .for_each(|(task, (p, x))| {
                for (k, (p, x)) in p.chunks_mut(s).zip(x.chunks(s)).enumerate() {
                    let m = &self.mask[((task * ROWS_PER_TASK + k) % t) * s..][..s];
                    let mut max = f32::NEG_INFINITY;
                    for ((p, &x), &m) in p.iter_mut().zip(x).zip(m) {
                        *p = self.scale * x + m;
                        max = max.max(*p);
                    }
                    if max == f32::NEG_INFINITY {
                        p.fill(0.0);
                        continue;
                    }
                    let mut sum = 0f32;
                    for p in p.iter_mut() {
                        *p = (*p - max).exp();
                        sum += *p;
                    }
                    let inv = 1.0 / sum;
                    p.iter_mut().for_each(|p| *p *= inv);
                }
            });
        p
    }

    /// ∂L/∂x = s · p ⊙ (g − Σ_j g_j p_j) per row.
    fn backward(&self, p: &[f32], g: &[f32]) -> Vec<f32> {
        let s = self.s;
        let mut dx = vec![0f32; p.len()];
        dx.par_chunks_mut(ROWS_PER_TASK * s)
            .zip(p.par_chunks(ROWS_PER_TASK * s))
            .zip(g.par_chunks(ROWS_PER_TASK * s))
            .for_each(|((dx, p), g)| {
                for ((dx, p), g) in dx.chunks_mut(s).zip(p.chunks(s)).zip(g.chunks(s)) {
                    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                    for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
                        *dx = self.scale * p * (g - dot);
                    }
                }
            });
        dx
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "fused-masked-softmax scores")?;
        Ok((CpuStorage::F32(self.forward(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (pv, gv) = (f32_vec(p)?, f32_vec(g)?);
        Ok(Some(Tensor::from_vec(
            self.backward(&pv, &gv),
            x.shape(),
            x.device(),
        )?))
    }
}

/// Attention probabilities p = softmax(s·x + m) over the last dimension, fused: one pass
/// forward, one backward (∂L/∂x = s · p ⊙ (g − Σ g ⊙ p)), and the graph keeps p alone instead
/// of the five tensors of scale, mask, max, exp and normalisation. x: [B, H, T, S] f32 on
/// the CPU (see [`applies`]), mask: [T, S] additive (0 or −∞).
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, _, t, s) = x.dims4()?;
    if mask.dims() != [t, s] {
        return Err(crate::error::Error::Model(format!(
            "attention: mask {:?} does not fit scores {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    let op = MaskedSoftmax {
        mask: f32_vec(mask)?,
        scale: scale as f32,
        s,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// Max |a − b| over all entries (f32 tensors of one shape).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn rope_refuses_tables_of_the_wrong_shape() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let e = apply_rope(&x, &c, &c).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
