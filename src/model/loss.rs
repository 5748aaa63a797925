//! Owns `doc_losses` and `sample_targets`: per-document losses and sampled (true-Fisher) labels.
//! Layer: model — may import the ground, linalg, backend and, in this folder, batch.rs,
//! custom_ops.rs, ops.rs.
//!
//! L(z) = −Σ_t m_t log softmax(logits_t)\[y_t\], with m the prediction mask and y the target
//! of position t: the next token (training loss, and the query measurement on a
//! prompt/completion batch), or a label drawn from the model's own softmax.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::util::rng::SplitMix64;

use super::batch::TokenBatch;
use super::custom_ops::cross_entropy_rows;
use super::ops;

/// Per-document summed cross-entropy, differentiable. On the CPU through the fused
/// [`cross_entropy_rows`] (no log-softmax intermediates kept), elsewhere composed.
/// logits: [B, T, V]; targets: [B, T] u32; mask: [B, T] f32 → \[B\].
pub fn doc_losses(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let tv: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    let mv: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if let Some(rows) = cross_entropy_rows(&logits.reshape((b * t, v))?, &tv, &mv)? {
        return Ok(rows.reshape((b, t))?.sum(1)?);
    }
    let lp = ops::log_softmax_last(logits)?;
    let picked = lp
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    Ok((picked * mask)?.sum(1)?.neg()?)
}

/// Labels sampled from softmax(logits) at every prediction position, [B, T] u32 (0 where
/// the position predicts nothing). Document b's draws come from a stream seeded by
/// (`seed`, `batch.keys[b]`) and are consumed in position order, so they depend only on the
/// seed, the key and the document's own logits.
pub fn sample_targets(logits: &Tensor, batch: &TokenBatch, seed: u64) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let probs = ops::softmax_last(&logits.detach())?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0u32; b * t];
    for row in 0..b {
        let mut rng = SplitMix64::new(seed ^ SplitMix64::new(batch.keys[row]).next_u64());
        for (pos, &on) in batch.host_prediction[row].iter().enumerate() {
            if !on {
                continue;
            }
            let p = &probs[(row * t + pos) * v..(row * t + pos + 1) * v];
            out[row * t + pos] = sample_index(p, rng.next_f64());
        }
    }
    Ok(Tensor::from_vec(out, (b, t), logits.device())?)
}

/// Inverse-CDF draw from probabilities `p` (summing to ≈1) with uniform `u` ∈ [0, 1).
fn sample_index(p: &[f32], u: f64) -> u32 {
    let total: f64 = p.iter().map(|&x| x as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    for (i, &x) in p.iter().enumerate() {
        acc += x as f64;
        if acc > target {
            return i as u32;
        }
    }
    // Rounding left the target above the last partial sum: the last non-zero entry.
    p.iter().rposition(|&x| x > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_index_follows_cdf() {
        let p = [0.1f32, 0.0, 0.6, 0.3];
        assert_eq!(sample_index(&p, 0.05), 0);
        assert_eq!(sample_index(&p, 0.1), 2);
        assert_eq!(sample_index(&p, 0.69), 2);
        assert_eq!(sample_index(&p, 0.71), 3);
        assert_eq!(sample_index(&p, 0.999_999_99), 3);
    }

    #[test]
    fn splitmix_uniform_mean() {
        let mut r = SplitMix64::new(7);
        let n = 20000;
        let mean: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
