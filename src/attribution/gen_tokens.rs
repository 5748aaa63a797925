//! Owns per-generated-token query gradients: `gen_token_docs`, `gen_token_gradients`.
//! Layer: attribution — may import every floor from the ground up to curvature; sibling
//! `score` (the query gradients).
//!
//! A completion's measurement is a sum over its tokens, f(q) = Σ_j f_j with
//! f_j = −log p(y_j | x, y_<j) (docs/design.md §2). Each f_j gets its own gradient
//! ∇_W f_j = Σ_t δ_t^{(j)} a_tᵀ: δ^{(j)} comes from a backward of f_j alone, so the J
//! completion tokens of a query need J backward passes. A causal model's logits at position
//! p do not depend on the tokens after p, so f_j and its gradient are those of the *prefix
//! copy* "x, y_<j → y_j": the query cut after y_j with the loss on y_j only. The J prefix
//! copies of every query are ordinary one-target queries: [`query_gradients`] batches them
//! (batching.token_budget), one forward and one backward per batch, each copy carrying its
//! own target. A copy of length P + j + 1 costs what a query of that length costs, so a
//! query's J tokens cost Σ_j (P + j + 1) token positions ≈ J (P + J/2) (the measured cost is
//! in docs/performance.md). By linearity Σ_j ∇f_j = ∇f(q): the per-token gradients add up
//! to the whole completion's, and so do scores that are linear in the gradient.

use candle_core::Tensor;

use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::PassOptions;

use super::score::query_gradients;

/// One completion token of a query: which query, its index among the completion's tokens,
/// its position in the query's `input_ids` and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenToken {
    /// Index of the query.
    pub query: usize,
    /// j: index among the query's completion tokens (0 = the first generated token).
    pub gen_index: usize,
    /// Its position in the query's `input_ids`.
    pub position: usize,
    /// Its token id y_j.
    pub token_id: u32,
}

/// The prefix copy of every completion token (loss-mask 1) of every query, in query then
/// token order: `input_ids[..=position]` with the loss on the last token only.
pub fn gen_token_docs(queries: &[PreparedDoc]) -> (Vec<PreparedDoc>, Vec<GenToken>) {
    let mut docs = Vec::new();
    let mut tokens = Vec::new();
    for (qi, q) in queries.iter().enumerate() {
        let mut j = 0;
        for (pos, &m) in q.loss_mask.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let mut loss_mask = vec![0u8; pos + 1];
            loss_mask[pos] = 1;
            docs.push(PreparedDoc {
                doc_id: format!("{}#{j}", q.doc_id),
                text: String::new(),
                prompt: None,
                completion: None,
                input_ids: q.input_ids[..=pos].to_vec(),
                loss_mask,
                truncated_tokens: 0,
                source: q.source.clone(),
            });
            tokens.push(GenToken {
                query: qi,
                gen_index: j,
                position: pos,
                token_id: q.input_ids[pos],
            });
            j += 1;
        }
    }
    (docs, tokens)
}

/// Per-token gradients of every completion token of every query.
#[derive(Debug, Clone)]
pub struct GenTokenGradients {
    /// The tokens, in query then token order (the first dimension of `layers`).
    pub tokens: Vec<GenToken>,
    /// log p(y_j | x, y_<j) per token (= −f_j).
    pub logprobs: Vec<f32>,
    /// ∇_W f_j per tracked layer: [K, d_out, d_in(+1)], K = `tokens.len()`.
    pub layers: Vec<Tensor>,
}

/// ∇_W f_j and log p(y_j | x, y_<j) of every completion token of `queries` at `model`, one
/// backward per token through the capture, batched over prefix copies.
pub fn gen_token_gradients(
    model: &Model,
    queries: &[PreparedDoc],
    opts: &PassOptions,
) -> Result<GenTokenGradients> {
    let (docs, tokens) = gen_token_docs(queries);
    if docs.is_empty() {
        return Err(Error::Pipeline(
            "per-token attribution: the queries have no completion tokens".into(),
        ));
    }
    let g = query_gradients(model, &docs, opts)?;
    Ok(GenTokenGradients {
        tokens,
        logprobs: g.measurements.iter().map(|m| -m).collect(),
        layers: g.layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(ids: &[u32], mask: &[u8]) -> PreparedDoc {
        PreparedDoc {
            doc_id: "q".into(),
            text: String::new(),
            prompt: None,
            completion: None,
            input_ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
            truncated_tokens: 0,
            source: "t:1".into(),
        }
    }

    #[test]
    fn one_prefix_copy_per_completion_token_with_the_loss_on_its_last_token() {
        let qs = [doc(&[5, 6, 7, 8], &[0, 0, 1, 1]), doc(&[1, 2], &[0, 1])];
        let (docs, toks) = gen_token_docs(&qs);
        let ids: Vec<&[u32]> = docs.iter().map(|d| d.input_ids.as_slice()).collect();
        assert_eq!(ids, [&[5, 6, 7][..], &[5, 6, 7, 8], &[1, 2]]);
        let masks: Vec<&[u8]> = docs.iter().map(|d| d.loss_mask.as_slice()).collect();
        assert_eq!(masks, [&[0, 0, 1][..], &[0, 0, 0, 1], &[0, 1]]);
        let t: Vec<(usize, usize, usize, u32)> = toks
            .iter()
            .map(|t| (t.query, t.gen_index, t.position, t.token_id))
            .collect();
        assert_eq!(t, [(0, 0, 2, 7), (0, 1, 3, 8), (1, 0, 1, 2)]);
        assert_eq!(docs[1].doc_id, "q#1");
    }
}
