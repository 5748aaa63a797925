//! The one batch loop every pass over data runs on (the fit's covariance and Λ passes, the
//! query gradients, the scoring pass, the retrainings' measurements), and its options.
//! Layer: passes — may import the ground, linalg, backend, model, data, hub and train.

use std::path::PathBuf;

use crate::config::EigenPrecision;
use crate::data::{plan_batches, Batch, BatchOrder, PreparedDoc};
use crate::error::Result;
use crate::model::{Labels, Model, TokenBatch};
use crate::util::progress;
use crate::util::shard::Shard;

/// Which Fisher the factors estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fisher {
    /// Labels sampled from the model's own predictive distribution (seeded per document).
    True {
        /// Seed.
        seed: u64,
    },
    /// The data's own labels: deterministic, needed for exact comparisons.
    Empirical,
}

impl Fisher {
    /// The labels a capture uses for this Fisher.
    pub fn labels(self) -> Labels {
        match self {
            Fisher::True { seed } => Labels::Sampled { seed },
            Fisher::Empirical => Labels::Data,
        }
    }
}

/// Options of a pass over data: how its batches are made, and the fit's own settings.
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// True or empirical Fisher.
    pub fisher: Fisher,
    /// Block size for block-diagonal factors (None: whole).
    pub block_size: Option<usize>,
    /// Tokens per batch (batch size × padded length).
    pub token_budget: usize,
    /// Documents per batch at most.
    pub max_batch_size: usize,
    /// Token id used for padding.
    pub pad_id: u32,
    /// Arithmetic of the factor eigendecompositions.
    pub eigen_precision: EigenPrecision,
    /// A directory where the covariance pass may keep its captures (a temporary file,
    /// `curvature::CaptureSpill`) for the eigenvalue correction to read back instead of running the
    /// model again; `None`: it runs the model again. Used on the CPU only, and only while
    /// the captures of all checkpoints stay within half the memory available at the start
    /// (so that they stay in the page cache); past that the spill is dropped.
    pub capture_dir: Option<PathBuf>,
}

/// Runs `f` on each batch of `docs` (length-sorted, deterministic plan), with document
/// indices as keys so that sampled labels do not depend on the batching.
pub fn for_each_batch(
    model: &Model,
    docs: &[PreparedDoc],
    opts: &PassOptions,
    label: &str,
    f: impl FnMut(&TokenBatch, &[usize]) -> Result<()>,
) -> Result<()> {
    for_each_batch_in(model, docs, opts, label, None, f)
}

/// The batches of `docs`' plan that `shard` owns (batch k belongs to shard (k mod n) + 1;
/// `None`: all of them).
pub fn shard_batches(docs: &[PreparedDoc], opts: &PassOptions, shard: Option<Shard>) -> Vec<Batch> {
    let lengths: Vec<usize> = docs.iter().map(|d| d.n_tokens()).collect();
    let plan = plan_batches(
        &lengths,
        opts.token_budget,
        opts.max_batch_size,
        BatchOrder::LengthSorted,
    );
    (plan.into_iter().enumerate())
        .filter(|(k, _)| shard.is_none_or(|s| s.owns(*k)))
        .map(|(_, b)| b)
        .collect()
}

/// [`for_each_batch`] over the batches of the whole plan that `shard` owns
/// ([`shard_batches`]). Each batch holds the same documents as in the unsharded pass, so
/// whatever a batch computes is bitwise the same in the shard that owns it.
pub fn for_each_batch_in(
    model: &Model,
    docs: &[PreparedDoc],
    opts: &PassOptions,
    label: &str,
    shard: Option<Shard>,
    mut f: impl FnMut(&TokenBatch, &[usize]) -> Result<()>,
) -> Result<()> {
    let plan = shard_batches(docs, opts, shard);
    let n: usize = plan.iter().map(|b| b.docs.len()).sum();
    let pb = progress::bar(n as u64, label);
    for b in &plan {
        let pairs: Vec<(&[u32], &[u8])> = b
            .docs
            .iter()
            .map(|&i| (docs[i].input_ids.as_slice(), docs[i].loss_mask.as_slice()))
            .collect();
        let batch = TokenBatch::new(&pairs, opts.pad_id, None, model.device())?
            .with_keys(b.docs.iter().map(|&i| i as u64).collect())?;
        f(&batch, &b.docs)?;
        pb.inc(b.docs.len() as u64);
    }
    pb.finish_and_clear();
    Ok(())
}
