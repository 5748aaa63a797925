//! Fitting EK-FAC factors of every tracked layer over a data set at one or more checkpoints
//! (DESIGN.md §3): a covariance pass per checkpoint (averaged), one f64 eigendecomposition,
//! then an eigenvalue-correction pass per checkpoint in that shared basis (averaged).
//!
//! Conventions (those of the kronfluence reference pack): A and S are normalised by the
//! number of real tokens (attention mask), Λ by the number of documents.

use candle_core::Tensor;

use crate::data::{plan_batches, BatchOrder, PreparedDoc};
use crate::error::{Error, Result};
use crate::model::{Labels, Model, TokenBatch};
use crate::util::progress;

use super::covariance::{masked_rows, CovarianceSums, Covariances};
use super::lambda::{EigenBasis, LambdaSums};

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
    fn labels(self) -> Labels {
        match self {
            Fisher::True { seed } => Labels::Sampled { seed },
            Fisher::Empirical => Labels::Data,
        }
    }
}

/// Options of a fit.
#[derive(Debug, Clone)]
pub struct FitOptions {
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
}

/// EK-FAC factors of one layer.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    /// Module name.
    pub name: String,
    /// Averaged, normalised covariances.
    pub covariances: Covariances,
    /// Their eigenbasis.
    pub basis: EigenBasis,
    /// Λ [d_out, d_in] (f64), averaged over checkpoints, normalised per document.
    pub lambda: Tensor,
}

/// Runs `f` on each batch of `docs` (length-sorted, deterministic plan), with document
/// indices as keys so that sampled labels do not depend on the batching.
pub fn for_each_batch(
    model: &Model,
    docs: &[PreparedDoc],
    opts: &FitOptions,
    label: &str,
    mut f: impl FnMut(&TokenBatch, &[usize]) -> Result<()>,
) -> Result<()> {
    let lengths: Vec<usize> = docs.iter().map(|d| d.n_tokens()).collect();
    let plan = plan_batches(
        &lengths,
        opts.token_budget,
        opts.max_batch_size,
        BatchOrder::LengthSorted,
    );
    let pb = progress::bar(docs.len() as u64, label);
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

/// The covariance pass at one checkpoint: normalised A and S of every tracked layer.
pub fn covariance_pass(
    model: &Model,
    docs: &[PreparedDoc],
    opts: &FitOptions,
) -> Result<Vec<Covariances>> {
    let mut sums: Vec<CovarianceSums> = model
        .tracked_layers()
        .iter()
        .map(|l| {
            let d_in = l.d_in + l.has_bias as usize;
            CovarianceSums::new(d_in, l.d_out, opts.block_size, model.device())
        })
        .collect::<Result<_>>()?;
    let mut batch_no = 0usize;
    for_each_batch(model, docs, opts, "covariance", |batch, _| {
        let cap = model.capture(batch, opts.fisher.labels())?;
        for (layer, sum) in cap.layers.iter().zip(sums.iter_mut()) {
            let a = masked_rows(&layer.a, &cap.attention_mask)?;
            let d = masked_rows(&layer.delta, &cap.attention_mask)?;
            check_finite(&a, &layer.name, "activations", batch_no)?;
            check_finite(&d, &layer.name, "output gradients", batch_no)?;
            sum.add(&a, &d)?;
        }
        batch_no += 1;
        Ok(())
    })?;
    sums.iter().map(CovarianceSums::normalized).collect()
}

/// The eigenvalue-correction pass at one checkpoint in fixed bases: Λ of every layer.
pub fn lambda_pass(
    model: &Model,
    docs: &[PreparedDoc],
    bases: &[EigenBasis],
    opts: &FitOptions,
) -> Result<Vec<Tensor>> {
    let mut sums: Vec<LambdaSums> = model
        .tracked_layers()
        .iter()
        .map(|l| LambdaSums::new(l.d_out, l.d_in + l.has_bias as usize, model.device()))
        .collect::<Result<_>>()?;
    for_each_batch(model, docs, opts, "eigenvalues", |batch, _| {
        let cap = model.capture(batch, opts.fisher.labels())?;
        for ((layer, sum), basis) in cap.layers.iter().zip(sums.iter_mut()).zip(bases) {
            sum.add_batch(basis, &layer.a, &layer.delta, &cap.attention_mask)?;
        }
        Ok(())
    })?;
    sums.iter().map(LambdaSums::normalized).collect()
}

/// Fits the factors of a segment from its checkpoints (already loaded models, in order):
/// covariances averaged over checkpoints, one eigendecomposition, Λ averaged over
/// checkpoints. `what` prefixes layer names in errors (e.g. `segment 1`).
pub fn fit_factors(
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &FitOptions,
    what: &str,
) -> Result<Vec<LayerFactors>> {
    let first = checkpoints
        .first()
        .ok_or_else(|| Error::Numeric(format!("{what}: no checkpoint to fit")))?;
    let per_ckpt: Vec<Vec<Covariances>> = checkpoints
        .iter()
        .map(|m| covariance_pass(m, docs, opts))
        .collect::<Result<_>>()?;
    let n_layers = first.tracked_layers().len();
    let mut covs = Vec::with_capacity(n_layers);
    let mut bases = Vec::with_capacity(n_layers);
    for (l, info) in first.tracked_layers().iter().enumerate() {
        let list: Vec<Covariances> = per_ckpt.iter().map(|c| c[l].clone()).collect();
        let cov = Covariances::mean(&list)?;
        let name = format!("{what} layer `{}`", info.name);
        bases.push(EigenBasis::from_covariances(&cov, &name, first.device())?);
        covs.push(cov);
    }
    let lambdas: Vec<Vec<Tensor>> = checkpoints
        .iter()
        .map(|m| lambda_pass(m, docs, &bases, opts))
        .collect::<Result<_>>()?;
    let k = checkpoints.len() as f64;
    let mut out = Vec::with_capacity(n_layers);
    for (l, (cov, basis)) in covs.into_iter().zip(bases).enumerate() {
        let mut lam = lambdas[0][l].clone();
        for c in &lambdas[1..] {
            lam = (lam + &c[l])?;
        }
        out.push(LayerFactors {
            name: first.tracked_layers()[l].name.clone(),
            covariances: cov,
            basis,
            lambda: (lam / k)?,
        });
    }
    Ok(out)
}

fn check_finite(x: &Tensor, layer: &str, what: &str, batch: usize) -> Result<()> {
    let s: f32 = x.abs()?.sum_all()?.to_scalar()?;
    if !s.is_finite() {
        return Err(Error::Numeric(format!(
            "layer `{layer}`: non-finite {what} in batch {batch}; the model produces NaN/Inf on \
             this data (check the checkpoint and the learning rate that produced it)"
        )));
    }
    Ok(())
}
