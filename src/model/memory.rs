//! Predicted peak memory of the attribution passes (fit, query, score), printed before a
//! stage starts and compared with the measured peak RSS by `scripts/bench-vs-kronfluence.sh`.
//!
//! The model, for a batch of n tokens (the token budget) and P parameters:
//!
//! * weights: 4 P bytes (f32); a capture forms no weight gradients
//!   ([`super::custom_ops`]);
//! * the autograd graph of one forward + backward: [`ACT_FLOATS_PER_IO`] floats per token per
//!   unit of Σ_l (d_in,l + d_out,l) over the tracked layers (their inputs a and output
//!   gradients δ are a part of it), plus [`LOGIT_COPIES`] copies of the [n, V] logits
//!   (logits, the fused cross-entropy's gradient, the head's backward);
//! * per layer factors: f32 sums of A, S, then eigenvectors Q_A, Q_S (f32) and Λ (f64)
//!   ([`fit_peak_bytes`] says which are alive together), or Q_A, Q_S, Λ and the
//!   preconditioned queries 4 Q i o (score).
//!
//! The two constants count the tensors the implementation keeps alive; the benchmark
//! (`scripts/bench-vs-kronfluence.sh`) prints this prediction next to the measured peak RSS.

use super::lm::Model;

/// Floats kept per token per unit of Σ (d_in + d_out) of the tracked layers.
pub const ACT_FLOATS_PER_IO: f64 = 4.0;
/// Copies of the [tokens, vocab] logits alive at the peak of a forward + backward.
pub const LOGIT_COPIES: f64 = 3.0;

fn params(model: &Model) -> u64 {
    model
        .params()
        .iter()
        .map(|p| p.var.as_tensor().elem_count() as u64)
        .sum()
}

/// Bytes of one forward + backward over `tokens` tokens: the autograd graph and the logits.
pub fn capture_graph_bytes(model: &Model, tokens: usize) -> u64 {
    let io: u64 = model
        .tracked_layers()
        .iter()
        .map(|l| (l.d_in + l.has_bias as usize + l.d_out) as u64)
        .sum();
    let n = tokens as f64;
    let vocab = model.spec().vocab_size() as f64;
    (4.0 * n * (ACT_FLOATS_PER_IO * io as f64 + LOGIT_COPIES * vocab)) as u64
}

/// Bytes of one forward + backward over `tokens` tokens (weights and
/// [`capture_graph_bytes`]).
pub fn capture_peak_bytes(model: &Model, tokens: usize) -> u64 {
    4 * params(model) + capture_graph_bytes(model, tokens)
}

/// Predicted peak bytes of fitting EK-FAC factors with batches of `tokens` tokens
/// (`block`: block-diagonal factors of that size). With F = Σ_l 4 (i² + o²) the f32 factor
/// sums (and, later, eigenvectors), Λ = Σ_l 8 i o (f64) and C one capture, the fit holds at
/// most: C + F in the covariance pass; 2 F plus three f64 matrices of the largest block per
/// thread during the eigendecompositions; C + F + Λ in the eigenvalue-correction pass.
/// Layers that share an input (q/k/v, gate/up) share A, which this counts once per layer:
/// an over-estimate of F by about a tenth on Llama shapes.
pub fn fit_peak_bytes(model: &Model, tokens: usize, block: Option<usize>) -> u64 {
    let (mut f, mut lambda, mut widest) = (0u64, 0u64, 0u64);
    for l in model.tracked_layers() {
        let (i, o) = ((l.d_in + l.has_bias as usize) as u64, l.d_out as u64);
        let width = |d: u64| block.map_or(d, |b| d.min(b as u64));
        let sq = |d: u64| d * width(d);
        f += 4 * (sq(i) + sq(o));
        lambda += 8 * i * o;
        widest = widest.max(width(i)).max(width(o));
    }
    let threads = rayon::current_num_threads() as u64;
    let eigen = 2 * f + threads * 3 * 8 * widest * widest;
    let c = capture_graph_bytes(model, tokens);
    4 * params(model) + (c + f).max(eigen).max(c + f + lambda)
}

/// Predicted peak bytes of scoring `queries` queries with batches of `tokens` tokens
/// (`per_token`: the [Q, B, T] per-token scores of a batch are kept as well).
pub fn score_peak_bytes(model: &Model, tokens: usize, queries: usize, per_token: bool) -> u64 {
    let q = queries as u64;
    let mut factors = 0u64;
    for l in model.tracked_layers() {
        let (i, o) = ((l.d_in + l.has_bias as usize) as u64, l.d_out as u64);
        // Q_A, Q_S (f32), Λ (f64), query gradients and preconditioned queries (f32).
        factors += 4 * (i * i + o * o) + 8 * i * o + 8 * q * i * o;
    }
    let tokens_out = if per_token { 8 * q * tokens as u64 } else { 0 };
    capture_peak_bytes(model, tokens) + factors + tokens_out
}
