//! Owns `TokenBatch`: a right-padded batch of documents on the model's device.
//! Layer: model — may import the ground, linalg and backend; no sibling.
//!
//! Loss-mask convention (as `prepare` writes it): `loss_mask[t] = 1` when token t is a
//! target, predicted from the logits at position t − 1; token 0 is never a target. The
//! batch stores the shifted view the loss needs: at position t the target is token t + 1
//! with weight `loss_mask[t + 1]` (0 at the last position and on padding).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Right-padded token ids with masks. B documents, padded length T ≥ 2.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids [B, T] (u32), padding filled with the pad id.
    pub input_ids: Tensor,
    /// 1 on real tokens, 0 on padding: [B, T] f32.
    pub attention_mask: Tensor,
    /// Target of position t, token t + 1 (0 where none): [B, T] u32.
    pub target_ids: Tensor,
    /// 1 where position t predicts a loss target (loss_mask[t + 1]): [B, T] f32.
    pub prediction_mask: Tensor,
    /// Real length of each document.
    pub lengths: Vec<usize>,
    /// A stable key per document (default: its row); seeds its sampled labels, so they do
    /// not depend on batch composition when keys are document ids.
    pub keys: Vec<u64>,
    /// Host copy of `prediction_mask`, one row per document.
    pub(crate) host_prediction: Vec<Vec<bool>>,
}

impl TokenBatch {
    /// Builds a batch from `(token ids, loss mask)` pairs, right-padded with `pad_id` to the
    /// longest document, or to `pad_to` when that is longer.
    pub fn new(
        docs: &[(&[u32], &[u8])],
        pad_id: u32,
        pad_to: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        if docs.is_empty() {
            return Err(Error::Model("a batch needs at least one document".into()));
        }
        let longest = docs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let t = longest.max(pad_to.unwrap_or(0)).max(2);
        let b = docs.len();
        let mut ids = vec![pad_id; b * t];
        let mut attn = vec![0f32; b * t];
        let mut targets = vec![0u32; b * t];
        let mut pred = vec![0f32; b * t];
        let mut host_prediction = Vec::with_capacity(b);
        for (row, (doc_ids, mask)) in docs.iter().enumerate() {
            if doc_ids.len() != mask.len() {
                return Err(Error::Model(format!(
                    "document {row}: {} token ids but {} loss-mask entries",
                    doc_ids.len(),
                    mask.len()
                )));
            }
            if mask.first().is_some_and(|&m| m != 0) {
                return Err(Error::Model(format!(
                    "document {row}: loss_mask[0] = 1, but token 0 has no context and cannot be \
                     a target"
                )));
            }
            let n = doc_ids.len();
            let mut hp = vec![false; t];
            for i in 0..n {
                ids[row * t + i] = doc_ids[i];
                attn[row * t + i] = 1.0;
                if i + 1 < n {
                    targets[row * t + i] = doc_ids[i + 1];
                    if mask[i + 1] != 0 {
                        pred[row * t + i] = 1.0;
                        hp[i] = true;
                    }
                }
            }
            host_prediction.push(hp);
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(attn, (b, t), device)?,
            target_ids: Tensor::from_vec(targets, (b, t), device)?,
            prediction_mask: Tensor::from_vec(pred, (b, t), device)?,
            lengths: docs.iter().map(|(ids, _)| ids.len()).collect(),
            keys: (0..b as u64).collect(),
            host_prediction,
        })
    }

    /// A batch of prompt/completion pairs whose loss is the query measurement
    /// f = −log p(completion | prompt): every completion token is a target.
    pub fn from_prompt_completion(
        pairs: &[(&[u32], &[u32])],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let mut owned = Vec::with_capacity(pairs.len());
        for (i, (p, c)) in pairs.iter().enumerate() {
            if p.is_empty() || c.is_empty() {
                return Err(Error::Model(format!(
                    "query {i}: prompt and completion must each have at least one token"
                )));
            }
            let ids: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
            let mask: Vec<u8> = std::iter::repeat_n(0u8, p.len())
                .chain(std::iter::repeat_n(1u8, c.len()))
                .collect();
            owned.push((ids, mask));
        }
        let refs: Vec<(&[u32], &[u8])> = owned
            .iter()
            .map(|(i, m)| (i.as_slice(), m.as_slice()))
            .collect();
        Self::new(&refs, pad_id, None, device)
    }

    /// Sets per-document keys (e.g. document indices) that seed sampled labels.
    pub fn with_keys(mut self, keys: Vec<u64>) -> Result<Self> {
        if keys.len() != self.lengths.len() {
            return Err(Error::Model(format!(
                "{} keys for a batch of {} documents",
                keys.len(),
                self.lengths.len()
            )));
        }
        self.keys = keys;
        Ok(self)
    }

    /// Documents B.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Padded length T.
    pub fn padded_len(&self) -> usize {
        self.host_prediction.first().map_or(0, Vec::len)
    }
}
