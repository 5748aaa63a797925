//! The KV cache of incremental decoding: every decoder layer's keys and values so far.
//! Layer: model — imports only the ground (error); the decoders (lm, llama, gpt2) and
//! generation import it.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of every decoder layer for the tokens seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Tokens already in the cache (the next token's position).
    pub offset: usize,
    /// Per layer: k, v: [B, H_kv, offset, D].
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Appends this step's k, v ([B, H_kv, T, D]) for `layer`; returns all keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[&pv, &v], 2)?.contiguous()?,
            ),
            None => (k, v),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}
