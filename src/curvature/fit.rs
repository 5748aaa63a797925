//! Fitting EK-FAC factors of every tracked layer over a data set at one or more checkpoints
//! (DESIGN.md §3): a covariance pass per checkpoint (averaged), one f64 eigendecomposition,
//! then an eigenvalue-correction pass per checkpoint in that shared basis (averaged).
//!
//! Conventions (those of the kronfluence reference pack): A and S are normalised by the
//! number of real tokens (attention mask), Λ by the number of documents.

use candle_core::{Device, Tensor};

use crate::backend::{Backend, CpuBackend};

use crate::data::{plan_batches, BatchOrder, PreparedDoc};
use crate::error::{Error, Result};
use crate::model::{Labels, Model, TokenBatch};
use crate::util::progress;

use super::covariance::{CovarianceSums, Covariances};
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

/// The covariance pass at one checkpoint: normalised A and S of every tracked layer (on
/// the CPU).
pub fn covariance_pass(
    model: &Model,
    docs: &[PreparedDoc],
    opts: &FitOptions,
) -> Result<Vec<Covariances>> {
    covariance_pass_on(&CpuBackend::new(), model, docs, opts)
}

/// [`covariance_pass`] with the covariance sums computed by `backend` (the model must live
/// on the backend's device).
pub fn covariance_pass_on(
    backend: &dyn Backend,
    model: &Model,
    docs: &[PreparedDoc],
    opts: &FitOptions,
) -> Result<Vec<Covariances>> {
    let mut sums: Vec<CovarianceSums> = model
        .tracked_layers()
        .iter()
        .map(|l| {
            let d_in = l.d_in + l.has_bias as usize;
            CovarianceSums::new(d_in, l.d_out, opts.block_size, &Device::Cpu)
        })
        .collect::<Result<_>>()?;
    let mut batch_no = 0usize;
    for_each_batch(model, docs, opts, "covariance", |batch, _| {
        let cap = model.capture(batch, opts.fisher.labels())?;
        backend.add_covariances(&mut sums, &cap, batch_no)?;
        batch_no += 1;
        Ok(())
    })?;
    sums.iter().map(CovarianceSums::normalized).collect()
}

/// The eigenvalue-correction pass at one checkpoint in fixed bases: Λ of every layer (on
/// the CPU).
pub fn lambda_pass(
    model: &Model,
    docs: &[PreparedDoc],
    bases: &[EigenBasis],
    opts: &FitOptions,
) -> Result<Vec<Tensor>> {
    lambda_pass_on(&CpuBackend::new(), model, docs, bases, opts)
}

/// [`lambda_pass`] with the squared rotated gradients computed by `backend`.
pub fn lambda_pass_on(
    backend: &dyn Backend,
    model: &Model,
    docs: &[PreparedDoc],
    bases: &[EigenBasis],
    opts: &FitOptions,
) -> Result<Vec<Tensor>> {
    let mut sums: Vec<LambdaSums> = model
        .tracked_layers()
        .iter()
        .map(|l| LambdaSums::new(l.d_out, l.d_in + l.has_bias as usize, &Device::Cpu))
        .collect::<Result<_>>()?;
    let pass = for_each_batch(model, docs, opts, "eigenvalues", |batch, _| {
        let cap = model.capture(batch, opts.fisher.labels())?;
        backend.add_lambdas(&mut sums, bases, &cap)
    });
    backend.release();
    pass?;
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
    fit_factors_on(&CpuBackend::new(), checkpoints, docs, opts, what)
}

/// [`fit_factors`] on `backend` (the checkpoints loaded on its device). The factors come
/// back on the CPU whatever the backend.
pub fn fit_factors_on(
    backend: &dyn Backend,
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
        .map(|m| covariance_pass_on(backend, m, docs, opts))
        .collect::<Result<_>>()?;
    let n_layers = first.tracked_layers().len();
    let mut covs = Vec::with_capacity(n_layers);
    let mut bases = Vec::with_capacity(n_layers);
    let eig = |m: &Tensor, what: &str| backend.eigh(m, what);
    for (l, info) in first.tracked_layers().iter().enumerate() {
        let list: Vec<Covariances> = per_ckpt.iter().map(|c| c[l].clone()).collect();
        let cov = Covariances::mean(&list)?;
        let name = format!("{what} layer `{}`", info.name);
        bases.push(EigenBasis::from_covariances_with(
            &cov,
            &name,
            &Device::Cpu,
            &eig,
        )?);
        covs.push(cov);
    }
    let lambdas: Vec<Vec<Tensor>> = checkpoints
        .iter()
        .map(|m| lambda_pass_on(backend, m, docs, &bases, opts))
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
