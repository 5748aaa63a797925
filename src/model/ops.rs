//! Owns the composed differentiable ops: norms, softmax, RoPE, the causal mask and attention.
//! Layer: model — may import the ground, linalg, backend and, in this folder, config.rs, fused.rs.
//!
//! Differentiable building blocks written from plain candle tensor ops.
//!
//! candle-nn's fused `rms_norm`, `layer_norm` and `softmax_last_dim` pass no gradient
//! (NOTES-rust-stack.md), so norms, softmax and log-softmax here are composed from ops whose
//! backward candle implements.

use candle_core::{Device, Tensor, D};

use crate::error::Result;

use super::config::RopeScaling;

/// RMSNorm: x / √(mean(x²) + ε) ⊙ w. x: [.., d], w: \[d\]. `fused`: one custom op
/// ([`super::fused::rms_norm`]) where it applies (f32 on the CPU), else composed ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if fused && super::fused::applies(x) {
        return super::fused::rms_norm(x, w, eps);
    }
    rms_norm_composed(x, w, eps)
}

/// [`rms_norm`] from candle ops.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// LayerNorm: (x − mean) / √(var + ε) ⊙ w + b, with the biased variance. x: [.., d].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(c.broadcast_mul(&inv)?.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Softmax over the last dimension (differentiable).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// log softmax over the last dimension: x − m − log Σ exp(x − m), with m = max x detached
/// (a constant shift, so the gradient is exact).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// RoPE tables cos, sin: [T, D] for positions 0..T, Hugging Face layout (the D/2
/// frequencies repeated twice), computed in f64.
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    scaling: &RopeScaling,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut pos_scale = 1.0;
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => pos_scale = 1.0 / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    let mut cos = Vec::with_capacity(t * head_dim);
    let mut sin = Vec::with_capacity(t * head_dim);
    for p in 0..t {
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = p as f64 * pos_scale * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, head_dim), device)?,
        Tensor::from_vec(sin, (t, head_dim), device)?,
    ))
}

/// Applies RoPE (rotate-half form): x ⊙ cos + rot(x) ⊙ sin, rot(x) = [−x₂, x₁].
/// x: [B, H, T, D], cos/sin: [T, D]. `fused`: one custom op ([`super::fused::apply_rope`])
/// where it applies (f32 on the CPU), else composed ops.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> Result<Tensor> {
    if fused && super::fused::applies(x) {
        return super::fused::apply_rope(x, cos, sin);
    }
    apply_rope_composed(x, cos, sin)
}

/// [`apply_rope`] from candle ops.
pub fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Soft-capping c·tanh(x/c) (Gemma 2's attention scores and logits).
pub fn softcap(x: &Tensor, c: f64) -> Result<Tensor> {
    Ok(((x / c)?.tanh()? * c)?)
}

/// Additive causal mask [T, offset + T] for T queries at absolute positions offset..offset+T
/// over all keys so far: 0 where key j ≤ query position p (and p − j < window, when
/// given), −∞ elsewhere.
pub fn causal_mask(
    t: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = offset + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let p = offset + i;
        for j in 0..s {
            let visible = j <= p && window.is_none_or(|w| p - j < w);
            if !visible {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (t, s), device)?)
}

/// How attention scores are formed: s = scale · q kᵀ, then c·tanh(s/c) with a soft cap c.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The scale, usually D^{−1/2}.
    pub scale: f64,
    /// c of the soft-capping (Gemma 2), if any.
    pub softcap: Option<f64>,
}

impl Scores {
    /// s = q kᵀ / √D, no soft cap.
    pub fn standard(head_dim: usize) -> Scores {
        Scores {
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
        }
    }
}

/// Scaled dot-product attention with an additive mask.
/// q: [B, H, T, D]; k, v: [B, H_kv, S, D] (H_kv divides H, grouped-query heads repeat;
/// S ≥ T keys, earlier ones from a KV cache); mask: [T, S]. Returns [B, T, H·D]. `fused`:
/// softmax(s + mask) as one custom op ([`super::fused::masked_softmax`]) where it applies
/// (f32 on the CPU, no soft cap), else composed ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scores: Scores,
    fused: bool,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (h_kv, s) = (k.dim(1)?, k.dim(2)?);
    let (k, v) = if h_kv == h {
        (k.clone(), v.clone())
    } else {
        let rep = h / h_kv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, h_kv, rep, s, d))?
                .contiguous()?
                .reshape((b, h, s, d))?)
        };
        (expand(k)?, expand(v)?)
    };
    let p = match scores.softcap {
        None if fused && super::fused::applies(q) => {
            super::fused::masked_softmax(&q.matmul(&k.t()?)?, mask, scores.scale)?
        }
        None => softmax_last(&(q.matmul(&k.t()?)? * scores.scale)?.broadcast_add(mask)?)?,
        Some(c) => {
            let s = (q.matmul(&k.t()?)? * scores.scale)?;
            softmax_last(&softcap(&s, c)?.broadcast_add(mask)?)?
        }
    };
    let y = p.matmul(&v.contiguous()?)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, h * d))?)
}

#[cfg(test)]
mod tests {
    //! The fused kernels (`fused.rs`) against the composed ops they replace.
    use super::*;
    use crate::model::fused::{self, tests::max_abs_diff};
    use candle_core::{DType, Device, Var};

    #[test]
    fn rms_norm_matches_the_composed_ops_in_value_and_both_gradients() {
        let dev = Device::Cpu;
        // 130 rows: more than one parallel task.
        let x = Var::randn(0f32, 2.0, (2, 65, 24), &dev).unwrap();
        let w = Var::randn(1f32, 0.5, 24, &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 65, 24), &dev).unwrap();
        let got = fused::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let want = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let g = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (a, b) = (
                g.get(v.as_tensor()).unwrap(),
                gw.get(v.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(a, b) < 1e-4, "{}", max_abs_diff(a, b));
        }
    }

    #[test]
    fn masked_softmax_matches_the_composed_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        // 2·3·40 = 240 rows: several parallel tasks; keys 0..45 with 5 cached (offset 5), a
        // sliding window of 7 (rows see 1–7 keys).
        let (b, h, t, off) = (2, 3, 40, 5);
        let x = Var::randn(0f32, 3.0, (b, h, t, off + t), &dev).unwrap();
        let mask = causal_mask(t, off, Some(7), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (b, h, t, off + t), &dev).unwrap();
        let scale = 0.125;
        let got = fused::masked_softmax(x.as_tensor(), &mask, scale).unwrap();
        let want = softmax_last(
            &(x.as_tensor() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
        )
        .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        let g = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (
            g.get(x.as_tensor()).unwrap(),
            gw.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, c) < 1e-6, "{}", max_abs_diff(a, c));
        // A row with every key masked gives zeros, not NaN.
        let all = Tensor::full(f32::NEG_INFINITY, (1, 3), &dev).unwrap();
        let p = fused::masked_softmax(
            &Tensor::ones((1, 1, 1, 3), DType::F32, &dev).unwrap(),
            &all,
            1.0,
        )
        .unwrap();
        assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0; 3]);
        // A mask of the wrong shape is an error that says so.
        let e = fused::masked_softmax(x.as_tensor(), &all, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn rope_matches_the_composed_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 37, 8);
        let x = Var::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let (cos, sin) = rope_tables(t + 5, d, 10_000.0, &RopeScaling::None, &dev).unwrap();
        // Positions 5.. as with a KV cache: narrowed (non-contiguous offset) tables.
        let (cos, sin) = (cos.narrow(0, 5, t).unwrap(), sin.narrow(0, 5, t).unwrap());
        let up = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let got = fused::apply_rope(x.as_tensor(), &cos, &sin).unwrap();
        let want = apply_rope_composed(x.as_tensor(), &cos, &sin).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6);
        let g = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (
            g.get(x.as_tensor()).unwrap(),
            gw.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, c) < 1e-6);
    }
}
