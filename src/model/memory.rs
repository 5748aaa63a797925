//! Owns the peak-memory predictions of fit, query and score (`capture_peak_bytes`, …).
//! Layer: model — may import the ground, linalg, backend and, in this folder, capture.rs,
//! head_loss.rs, lm.rs.
//!
//! Predicted peak memory of the attribution passes (fit, query, score), printed before a
//! stage starts and compared with the measured peak RSS by `scripts/bench/vs-kronfluence.sh`.
//!
//! The model, for a batch of n tokens (the token budget) and P parameters:
//!
//! * weights: 4 P bytes (f32); a capture forms no weight gradients
//!   ([`super::custom_ops`]);
//! * the autograd graph of one forward + backward: [`ACT_FLOATS_PER_IO`] floats per token per
//!   unit of Σ_l (d_in,l + d_out,l) over the tracked layers (their inputs a and output
//!   gradients δ are a part of it), plus [`LOGIT_COPIES`] copies of the [n, V] logits
//!   (logits, the fused cross-entropy's gradient, the head's backward) when the capture
//!   forms logits (sampled labels, a tracked head), or one [rows, V] block when the head and
//!   the loss run fused ([`super::head_loss`], data labels);
//! * per layer factors: f32 sums of A, S, then eigenvectors Q_A, Q_S (f32) and f32 sums of Λ
//!   ([`fit_peak_bytes`] says which are alive together); for scoring, the preconditioned
//!   queries 4 Q i o (the factors are read one layer at a time).
//!
//! The two constants count the tensors the implementation keeps alive; the benchmark
//! (`scripts/bench/vs-kronfluence.sh`) prints this prediction next to the measured peak RSS.

use super::capture::Labels;
use super::head_loss::BLOCK_ROWS;
use super::lm::Model;

/// Floats kept per token per unit of Σ (d_in + d_out) of the tracked layers (measured on
/// SmolLM2-135M with the fused RMSNorm and RoPE of a capture: peak RSS of fit and score
/// with 256-token batches, 2.9 and 3.2 GiB).
pub const ACT_FLOATS_PER_IO: f64 = 3.0;
/// Copies of the [tokens, vocab] logits alive at the peak of a forward + backward.
pub const LOGIT_COPIES: f64 = 3.0;

fn params(model: &Model) -> u64 {
    model
        .params()
        .iter()
        .map(|p| p.var.as_tensor().elem_count() as u64)
        .sum()
}

/// Floats of every weight held: the trainable parameters and a LoRA model's frozen base.
fn weights(model: &Model) -> u64 {
    params(model) + model.frozen_floats()
}

/// Σ_l (d_in,l (+1 with a bias) + d_out,l) over the tracked layers: floats of a and δ per
/// token.
fn tracked_io(model: &Model) -> u64 {
    (model.tracked_layers().iter())
        .map(|l| (l.d_in + l.has_bias as usize + l.d_out) as u64)
        .sum()
}

/// Bytes of one forward + backward over `tokens` tokens with `labels`: the autograd graph
/// and the logits (or the fused head's block of them).
pub fn capture_graph_bytes(model: &Model, tokens: usize, labels: Labels) -> u64 {
    let io = tracked_io(model);
    let n = tokens as f64;
    let vocab = model.spec().vocab_size() as f64;
    let logits = if labels == Labels::Data && model.fusable_head().is_some() {
        BLOCK_ROWS.min(tokens) as f64 * vocab
    } else {
        LOGIT_COPIES * n * vocab
    };
    (4.0 * (n * ACT_FLOATS_PER_IO * io as f64 + logits)) as u64
}

/// Bytes of one forward + backward over `tokens` tokens with `labels` (weights and
/// [`capture_graph_bytes`]).
pub fn capture_peak_bytes(model: &Model, tokens: usize, labels: Labels) -> u64 {
    4 * weights(model) + capture_graph_bytes(model, tokens, labels)
}

/// Predicted peak bytes of fitting EK-FAC factors with batches of `tokens` tokens captured
/// with `labels` (`block`: block-diagonal factors of that size). With F = Σ_l 4 (i² + o²) the f32 factor
/// sums (and, later, eigenvectors), Λ = Σ_l 4 i o (f32 sums) and C one capture, the fit
/// holds at most: C + F in the covariance pass; F plus three f64 matrices of the largest
/// block for 4 decompositions per thread during the eigendecompositions (each factor's sum
/// is freed as its eigenvectors arrive); C + F + Λ in the eigenvalue-correction pass; F + 2 Λ
/// (Λ normalised in f64) when the factors are saved. With `kept_captures` (the covariance
/// pass keeps its captures for the correction, [`crate::curvature::spill`]) a batch's a and δ,
/// K = 4 n Σ_l (d_in + d_out), replace C in the correction pass (read back, plus their
/// rotated copies: F + Λ + 2 K) and the covariance pass holds one more for the writer
/// (C + F + K).
/// Layers that share an input (q/k/v, gate/up) share A, which this counts once per layer:
/// an over-estimate of F by about a tenth on Llama shapes.
pub fn fit_peak_bytes(
    model: &Model,
    tokens: usize,
    block: Option<usize>,
    labels: Labels,
    kept_captures: bool,
) -> u64 {
    let (mut f, mut lambda, mut widest) = (0u64, 0u64, 0u64);
    for l in model.tracked_layers() {
        let (i, o) = ((l.d_in + l.has_bias as usize) as u64, l.d_out as u64);
        let width = |d: u64| block.map_or(d, |b| d.min(b as u64));
        let sq = |d: u64| d * width(d);
        f += 4 * (sq(i) + sq(o));
        lambda += 4 * i * o;
        widest = widest.max(width(i)).max(width(o));
    }
    let threads = rayon::current_num_threads() as u64;
    let eigen = f + 4 * threads * 3 * 8 * widest * widest;
    let c = capture_graph_bytes(model, tokens, labels);
    let (covariance, correction) = if kept_captures {
        let k = 4 * tokens as u64 * tracked_io(model);
        (c + f + k, f + lambda + 2 * k)
    } else {
        (c + f, c + f + lambda)
    };
    4 * weights(model) + covariance.max(eigen).max(correction).max(f + 2 * lambda)
}

/// Predicted peak bytes of fine-tuning with micro-batches of `tokens` tokens and an optimizer
/// that keeps `state_floats` floats per parameter (AdamW 2: m and v; SGD with momentum 1;
/// SGD 0): the weights, the step's accumulated gradient and one micro-batch's gradient
/// (4 P each), the optimizer state (4 P per float), and one forward + backward
/// ([`capture_graph_bytes`] over every linear layer of the blocks, which training
/// differentiates whatever is tracked; `model` should be loaded with
/// [`super::Tracking::BlockLinears`]). On SmolLM2-135M (1,024-token micro-batches, AdamW) this
/// predicts 6.0 GiB against a measured peak RSS of 6.4 GiB (docs/performance.md).
pub fn finetune_peak_bytes(model: &Model, tokens: usize, state_floats: u64) -> u64 {
    4 * weights(model)
        + 4 * params(model) * (2 + state_floats)
        + capture_graph_bytes(model, tokens, Labels::Data)
}

/// Number of trainable parameters P (a tied head counted once).
pub fn param_count(model: &Model) -> u64 {
    params(model)
}

/// Σ_l d_in,l d_out,l (bias columns included) over the tracked layers: the floats of one
/// query's gradient, of one layer-set of Λ, of one preconditioned query.
pub fn tracked_weight_floats(model: &Model) -> u64 {
    (model.tracked_layers().iter())
        .map(|l| (l.d_in + l.has_bias as usize) as u64 * l.d_out as u64)
        .sum()
}

/// Predicted peak bytes of scoring `queries` queries with batches of `tokens` tokens
/// (`per_token`: the [Q, B, T] per-token scores of a batch are kept as well): the
/// preconditioned queries U (4 Q i o per layer, f32), formed layer by layer from the query
/// gradients with one layer's factors (Q_A, Q_S f32, Λ f64) loaded at a time, then one
/// capture at a time (data labels) next to U.
pub fn score_peak_bytes(model: &Model, tokens: usize, queries: usize, per_token: bool) -> u64 {
    let q = queries as u64;
    let (mut u, mut layer) = (0u64, 0u64);
    for l in model.tracked_layers() {
        let (i, o) = ((l.d_in + l.has_bias as usize) as u64, l.d_out as u64);
        u += 4 * q * i * o;
        layer = layer.max(4 * (i * i + o * o) + 8 * i * o + 4 * q * i * o);
    }
    let tokens_out = if per_token { 8 * q * tokens as u64 } else { 0 };
    let precondition = 4 * weights(model) + u + layer;
    precondition.max(capture_peak_bytes(model, tokens, Labels::Data) + u + tokens_out)
}
