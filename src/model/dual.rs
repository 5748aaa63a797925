//! Owns `Dual` and the tangent rules: forward-mode derivatives of the model's ops.
//! Layer: model — may import the ground, linalg, backend and, in this folder, linear.rs, ops.rs.
//!
//! A [`Dual`] is a value x with its tangent ẋ = (∂x/∂θ) v, the directional derivative of x
//! along a direction v of the tracked parameters (same shape as x). Each op maps (x, ẋ) to
//! (y, ẏ) with ẏ = (∂y/∂x) ẋ written out by hand: candle has reverse mode only, and this is
//! the forward mode that Gauss–Newton products J v need (docs/design.md §9). Everything is
//! computed without gradients (detached tensors).
//!
//! Several directions at once: the batch holds K copies of the documents (rows k·B..(k+1)·B
//! belong to direction k); only a tracked linear layer treats the copies differently
//! ([`linear`]), every other rule is row-wise.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

use super::linear::TrackedLinear;
use super::ops;

/// A value and its tangent, same shape.
#[derive(Debug, Clone)]
pub struct Dual {
    /// x.
    pub x: Tensor,
    /// ẋ.
    pub dx: Tensor,
}

/// The tangent directions: one tensor per tracked layer, [K, d_out, d_in(+1)] (the bias as
/// the last column, as in a layer gradient), in tracked-layer order.
#[derive(Debug, Clone, Copy)]
pub struct Directions<'a> {
    /// V per tracked layer.
    pub v: &'a [Tensor],
    /// K, the number of directions.
    pub k: usize,
}

impl Dual {
    /// x with ẋ = 0 (anything that does not depend on the tracked parameters).
    pub fn constant(x: Tensor) -> Result<Dual> {
        let dx = x.zeros_like()?;
        Ok(Dual { x, dx })
    }

    /// The same linear map (reshape, transpose, narrow, RoPE, …) on x and ẋ.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Dual> {
        Ok(Dual {
            x: f(&self.x)?,
            dx: f(&self.dx)?,
        })
    }

    /// x + y.
    pub fn add(&self, o: &Dual) -> Result<Dual> {
        Ok(Dual {
            x: (&self.x + &o.x)?,
            dx: (&self.dx + &o.dx)?,
        })
    }

    /// x ⊙ y: (x ⊙ y)˙ = ẋ ⊙ y + x ⊙ ẏ.
    pub fn mul(&self, o: &Dual) -> Result<Dual> {
        Ok(Dual {
            x: (&self.x * &o.x)?,
            dx: ((&self.dx * &o.x)? + (&self.x * &o.dx)?)?,
        })
    }

    /// An elementwise y = f(x) given f(x) and f′(x): ẏ = f′(x) ⊙ ẋ.
    fn pointwise(&self, y: Tensor, slope: Tensor) -> Result<Dual> {
        Ok(Dual {
            x: y,
            dx: (slope * &self.dx)?,
        })
    }

    /// SiLU x σ(x): slope σ(x) (1 + x (1 − σ(x))).
    pub fn silu(&self) -> Result<Dual> {
        let s = sigmoid(&self.x)?;
        let slope = ((&self.x * (1.0 - &s)?)? + 1.0)?.mul(&s)?;
        self.pointwise(self.x.silu()?, slope)
    }

    /// GELU, tanh approximation ½x(1 + tanh u), u = √(2/π)(x + 0.044715 x³):
    /// slope ½(1 + tanh u) + ½x(1 − tanh² u) √(2/π)(1 + 3·0.044715 x²).
    pub fn gelu_tanh(&self) -> Result<Dual> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let x = &self.x;
        let x2 = x.sqr()?;
        let u = ((x * (&x2 * 0.044715)?)? + x)?.affine(c, 0.0)?;
        let t = u.tanh()?;
        let du = (&x2 * (3.0 * 0.044715 * c))?.affine(1.0, c)?;
        let slope =
            (((&t + 1.0)? * 0.5)? + (x * (1.0 - t.sqr()?)?)?.mul(&du)?.affine(0.5, 0.0)?)?;
        self.pointwise(x.gelu()?, slope)
    }

    /// Exact GELU x Φ(x): slope Φ(x) + x φ(x).
    pub fn gelu_erf(&self) -> Result<Dual> {
        let x = &self.x;
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
        let pdf = (x.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        let slope = (cdf + (x * pdf)?)?;
        self.pointwise(x.gelu_erf()?, slope)
    }

    /// Soft cap c·tanh(x/c): slope 1 − tanh²(x/c).
    pub fn softcap(&self, c: f64) -> Result<Dual> {
        let t = (&self.x / c)?.tanh()?;
        let slope = (1.0 - t.sqr()?)?;
        self.pointwise((t * c)?, slope)
    }

    /// RMSNorm y = x r ⊙ w, r = (mean x² + ε)^{−1/2}:
    /// ẏ = (ẋ r − x r³ mean(x ⊙ ẋ)) ⊙ w.
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Dual> {
        let (x, dx) = (&self.x, &self.dx);
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xdx = (x * dx)?.mean_keepdim(D::Minus1)?;
        let r3 = r.powf(3.0)?;
        let dy = (dx.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * xdx)?)?)?;
        Ok(Dual {
            x: x.broadcast_mul(&r)?.broadcast_mul(w)?,
            dx: dy.broadcast_mul(w)?,
        })
    }

    /// LayerNorm y = x̂ ⊙ w + b, x̂ = (x − mean x) r, r = (var x + ε)^{−1/2}:
    /// ẏ = r (ċ − x̂ mean(x̂ ⊙ ċ)) ⊙ w with ċ = ẋ − mean ẋ.
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f64) -> Result<Dual> {
        let c = self.x.broadcast_sub(&self.x.mean_keepdim(D::Minus1)?)?;
        let dc = self.dx.broadcast_sub(&self.dx.mean_keepdim(D::Minus1)?)?;
        let r = (c.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let xh = c.broadcast_mul(&r)?;
        let proj = (&xh * &dc)?.mean_keepdim(D::Minus1)?;
        let dy = (dc - xh.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        Ok(Dual {
            x: xh.broadcast_mul(w)?.broadcast_add(b)?,
            dx: dy.broadcast_mul(w)?,
        })
    }

    /// RoPE (linear in x): the same rotation on x and ẋ. x: [N, H, T, D].
    pub fn rope(&self, cos: &Tensor, sin: &Tensor) -> Result<Dual> {
        self.map(|t| ops::apply_rope_composed(t, cos, sin))
    }
}

/// σ(x) = 1 / (1 + e^{−x}).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// A linear layer y = x Wᵀ + b along K directions: ẏ = ẋ Wᵀ + x V_wᵀ + V_b on the rows of
/// direction k when the layer is tracked (V = `dirs.v[slot]`, [K, d_out, d_in(+1)]), ẋ Wᵀ
/// otherwise. x: [K·B, T, d_in].
pub fn linear(layer: &TrackedLinear, x: &Dual, dirs: Directions) -> Result<Dual> {
    let w = layer.weight.as_tensor().detach();
    let (n, t, d_in) = x.x.dims3()?;
    let d_out = w.dim(0)?;
    let mul = |a: &Tensor| -> Result<Tensor> {
        Ok(a.reshape((n * t, d_in))?
            .matmul(&w.t()?)?
            .reshape((n, t, d_out))?)
    };
    let mut y = mul(&x.x)?;
    if let Some(b) = &layer.bias {
        y = y.broadcast_add(&b.as_tensor().detach())?;
    }
    let mut dy = mul(&x.dx)?;
    if let Some(slot) = layer.slot {
        let v = dirs.v.get(slot).ok_or_else(|| {
            Error::Model(format!(
                "no tangent direction for tracked layer `{}` (slot {slot})",
                layer.name
            ))
        })?;
        let k = dirs.k;
        if n % k != 0 {
            return Err(Error::Model(format!(
                "a batch of {n} rows does not hold {k} copies of its documents"
            )));
        }
        let cols = d_in + usize::from(layer.bias.is_some());
        if v.dims() != [k, d_out, cols] {
            return Err(Error::Model(format!(
                "tangent direction of `{}` is {:?}, expected [{k}, {d_out}, {cols}]",
                layer.name,
                v.dims()
            )));
        }
        // [K, (N/K)·T, d_in] × [K, d_in, d_out] → [K, (N/K)·T, d_out]
        let xs = x.x.reshape((k, n / k * t, d_in))?;
        let vw = v.narrow(2, 0, d_in)?.transpose(1, 2)?.contiguous()?;
        let mut extra = xs.matmul(&vw)?;
        if layer.bias.is_some() {
            extra = extra.broadcast_add(&v.narrow(2, d_in, 1)?.transpose(1, 2)?)?;
        }
        dy = (dy + extra.reshape((n, t, d_out))?)?;
    }
    Ok(Dual { x: y, dx: dy })
}

/// Scaled dot-product attention along a tangent: q [N, H, T, D], k, v [N, H_kv, T, D]
/// (grouped-query heads repeat), additive mask [T, T]. With s = c·q kᵀ (soft-capped when
/// configured), p = softmax(s + mask), y = p v:
/// ṡ = c (q̇ kᵀ + q k̇ᵀ), ṗ = p ⊙ (ṡ − Σ_j p_j ṡ_j), ẏ = ṗ v + p v̇. Returns [N, T, H·D].
pub fn attention(q: &Dual, k: &Dual, v: &Dual, mask: &Tensor, scores: ops::Scores) -> Result<Dual> {
    let (n, h, t, d) = q.x.dims4()?;
    let (h_kv, s) = (k.x.dim(1)?, k.x.dim(2)?);
    let expand = |x: &Tensor| -> Result<Tensor> {
        if h_kv == h {
            return Ok(x.contiguous()?);
        }
        let rep = h / h_kv;
        Ok(x.unsqueeze(2)?
            .broadcast_as((n, h_kv, rep, s, d))?
            .contiguous()?
            .reshape((n, h, s, d))?)
    };
    let (k, v) = (k.map(expand)?, v.map(expand)?);
    let kt = k.x.t()?.contiguous()?;
    let raw = Dual {
        x: (q.x.matmul(&kt)? * scores.scale)?,
        dx: ((q.dx.matmul(&kt)? + q.x.matmul(&k.dx.t()?.contiguous()?)?)? * scores.scale)?,
    };
    let sc = match scores.softcap {
        Some(c) => raw.softcap(c)?,
        None => raw,
    };
    let p = ops::softmax_last(&sc.x.broadcast_add(mask)?)?;
    let mean = (&p * &sc.dx)?.sum_keepdim(D::Minus1)?;
    let dp = (&p * sc.dx.broadcast_sub(&mean)?)?;
    let y = p.matmul(&v.x)?;
    let dy = (dp.matmul(&v.x)? + p.matmul(&v.dx)?)?;
    let merge = |y: Tensor| -> Result<Tensor> { Ok(y.transpose(1, 2)?.reshape((n, t, h * d))?) };
    Ok(Dual {
        x: merge(y)?,
        dx: merge(dy)?,
    })
}
