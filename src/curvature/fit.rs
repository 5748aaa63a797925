//! Owns fitting EK-FAC factors: `fit_factors*` (covariance pass, eigenbasis, Λ pass).
//! Layer: curvature — may import every floor from the ground up to passes and, in this folder,
//! spill.rs.
//!
//! Fitting EK-FAC factors of every tracked layer over a data set at one or more checkpoints
//! (docs/design.md §3): a covariance pass per checkpoint (averaged), one f64
//! eigendecomposition, then an eigenvalue-correction pass per checkpoint in that shared basis
//! (averaged).
//!
//! Conventions (those of the kronfluence reference pack): A and S are normalised by the
//! number of real tokens (attention mask), Λ by the number of documents.

use candle_core::{Device, Tensor};

use crate::backend::{Backend, CpuBackend};
use crate::config::EigenPrecision;
use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::linalg::{BlockDiag, Covariances, EigenBasis, FactorSum, LambdaSums, LayerFactors};
use crate::model::{Capture, Model};
use crate::passes::{for_each_batch_in, PassOptions};
use crate::util::shard::Shard;
use crate::util::{phase, progress};

use super::spill::{CaptureSpill, Spills};

/// Sums of a segment's fit over all its checkpoints: A per distinct layer input (q/k/v
/// share one, gate/up another; see [`Capture::input_groups`]), S per layer.
pub(super) struct FitSums {
    /// The capture's input grouping these sums were made for.
    pub(super) groups: Vec<usize>,
    /// For each tracked layer, the index of its input's factor in `a`.
    pub(super) a_of: Vec<usize>,
    pub(super) a: Vec<FactorSum>,
    pub(super) s: Vec<FactorSum>,
    /// Real (non-padding) tokens added, over all checkpoints.
    pub(super) tokens: u64,
    /// Documents added, over all checkpoints.
    pub(super) documents: u64,
    /// Batches added, over all checkpoints.
    pub(super) batches: u64,
}

/// For each tracked layer, the index of its input's factor among the distinct inputs
/// (`groups[l]`: the first layer that reads the same tensor as layer l).
pub(super) fn input_factor_of(groups: &[usize]) -> Vec<usize> {
    let mut a_of = vec![0; groups.len()];
    let mut next = 0;
    for (l, &g) in groups.iter().enumerate() {
        if g == l {
            a_of[l] = next;
            next += 1;
        } else {
            a_of[l] = a_of[g];
        }
    }
    a_of
}

impl FitSums {
    fn new(model: &Model, groups: Vec<usize>, block: Option<usize>) -> FitSums {
        let layers = model.tracked_layers();
        let a_of = input_factor_of(&groups);
        let a = (layers.iter().enumerate())
            .filter(|(l, _)| groups[*l] == *l)
            .map(|(_, info)| FactorSum::new(info.d_in + info.has_bias as usize, block))
            .collect();
        let s = layers
            .iter()
            .map(|info| FactorSum::new(info.d_out, block))
            .collect();
        FitSums {
            groups,
            a_of,
            a,
            s,
            tokens: 0,
            documents: 0,
            batches: 0,
        }
    }
}

/// The capture's input grouping, checked against the one the sums were made for.
fn checked_groups(cap: &Capture, want: &[usize]) -> Result<()> {
    if cap.input_groups() != want {
        return Err(Error::Model(
            "tracked layers shared their inputs differently in two batches; this is a bug in \
             the model's forward pass, please report it"
                .into(),
        ));
    }
    Ok(())
}

/// Adds one checkpoint's covariance pass over `docs` (the batches `shard` owns; all with
/// `None`) to `sums` (made at the first batch), keeping its captures in `spill` when given
/// (see [`Spills`]).
pub(super) fn accumulate_covariances(
    backend: &dyn Backend,
    model: &Model,
    (docs, shard): (&[PreparedDoc], Option<Shard>),
    opts: &PassOptions,
    sums: &mut Option<FitSums>,
    what: &str,
    spills: &mut Spills,
) -> Result<Option<CaptureSpill>> {
    let mut batch_no = 0usize;
    let mut spill = spills.open();
    for_each_batch_in(model, docs, opts, "covariance", shard, |batch, _| {
        let cap = {
            let _t = phase::timer("fit: capture");
            model.capture(batch, opts.fisher.labels())?
        };
        {
            let _t = phase::timer("fit: keep captures");
            spills.push(&mut spill, &cap, &batch.lengths);
        }
        let _t = phase::timer("fit: covariance");
        let sums = match sums {
            Some(s) => {
                checked_groups(&cap, &s.groups)?;
                s
            }
            None => sums.insert(FitSums::new(model, cap.input_groups(), opts.block_size)),
        };
        {
            // One term per distinct input and one per output gradient.
            let FitSums { groups, a, s, .. } = &mut *sums;
            // `a` holds one factor per distinct input, in the order its first layer comes.
            let inputs = (cap.layers.iter().enumerate())
                .filter(|(l, _)| groups[*l] == *l)
                .map(|(_, layer)| &layer.a);
            let mut terms: Vec<(&mut FactorSum, &Tensor)> = a.iter_mut().zip(inputs).collect();
            for (sum, layer) in s.iter_mut().zip(&cap.layers) {
                terms.push((sum, &layer.delta));
            }
            backend.add_covariances(&mut terms, &cap.attention_mask)?;
        }
        for (l, layer) in cap.layers.iter().enumerate() {
            if sums.groups[l] == l {
                check_finite(
                    &sums.a[sums.a_of[l]],
                    &layer.name,
                    "activations",
                    what,
                    batch_no,
                )?;
            }
            check_finite(&sums.s[l], &layer.name, "output gradients", what, batch_no)?;
        }
        sums.tokens += batch.lengths.iter().sum::<usize>() as u64;
        sums.documents += batch.lengths.len() as u64;
        sums.batches += 1;
        batch_no += 1;
        Ok(())
    })?;
    Ok(spill)
}

/// An eigendecomposed factor: Q (block-diagonal, f32), its eigenvalues (f64) and, when
/// asked for, the normalised covariance blocks (f64).
struct Decomposed {
    q: BlockDiag,
    values: Vec<f64>,
    covariance: Vec<Tensor>,
}

/// Eigendecomposes `jobs` (a factor's sums and its name in errors) on `backend`, a few at a
/// time so that only those factors' f64 copies exist at once; the sums are freed as they
/// are consumed. The largest factors go first, so that each batch holds factors of about
/// the same size and no thread idles at a batch's end behind one large decomposition
/// (longest-processing-time-first scheduling). The result is in the order of `jobs`.
fn decompose_all(
    backend: &dyn Backend,
    jobs: Vec<(FactorSum, String)>,
    tokens: f64,
    keep_covariance: bool,
    precision: EigenPrecision,
    device: &Device,
) -> Result<Vec<Decomposed>> {
    // 4 per thread: sorted by size, a batch's decompositions are about equally long, and
    // the f64 copies of 4 × threads of the largest factors bound the extra memory.
    let chunk = 4 * rayon::current_num_threads().max(1);
    let pb = progress::bar(jobs.len() as u64, "eigendecomposition");
    let mut slots: Vec<Option<Decomposed>> = (0..jobs.len()).map(|_| None).collect();
    let mut jobs: Vec<(usize, (FactorSum, String))> = jobs.into_iter().enumerate().collect();
    // Cost of a factor ~ Σ n³ over its blocks; stable, so ties keep their order.
    let cost = |sum: &FactorSum| -> u128 {
        sum.layout
            .ranges
            .iter()
            .map(|(_, n)| (*n as u128).pow(3))
            .sum()
    };
    jobs.sort_by_key(|(_, (sum, _))| std::cmp::Reverse(cost(sum)));
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let part: Vec<(usize, (FactorSum, String))> = jobs.by_ref().take(chunk).collect();
        let mut mats = Vec::new();
        for (_, (sum, what)) in &part {
            let many = sum.layout.ranges.len() > 1;
            for (k, (b, (_, n))) in sum
                .normalized_f64(tokens)
                .into_iter()
                .zip(&sum.layout.ranges)
                .enumerate()
            {
                let name = if many {
                    format!("{what} block {k}")
                } else {
                    what.clone()
                };
                mats.push((b, *n, name));
            }
        }
        let eig = backend.eigh_many(&mats, precision)?;
        let mut eig = eig.into_iter().zip(mats);
        for (slot, (sum, _)) in part {
            let mut qs = Vec::with_capacity(sum.layout.ranges.len());
            let mut values = Vec::new();
            let mut covariance = Vec::new();
            for _ in &sum.layout.ranges {
                let (e, (b, n, _)) = eig.next().expect("one decomposition per block");
                qs.push(e.vectors_tensor(device)?);
                values.extend(e.values);
                if keep_covariance {
                    covariance.push(Tensor::from_vec(b, (n, n), device)?);
                }
            }
            slots[slot] = Some(Decomposed {
                q: BlockDiag {
                    layout: sum.layout,
                    blocks: qs,
                },
                values,
                covariance,
            });
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok(slots
        .into_iter()
        .map(|d| d.expect("every job decomposed"))
        .collect())
}

/// Adds one checkpoint's eigenvalue-correction pass over `docs` (the batches `shard` owns;
/// all with `None`) to `lambda`: a and δ are rotated into the bases (a once per shared
/// input), then every document's squared rotated gradient is added. `groups`: the input
/// grouping of the covariance pass. Returns the batches added.
pub(super) fn accumulate_lambda(
    backend: &dyn Backend,
    model: &Model,
    (docs, shard): (&[PreparedDoc], Option<Shard>),
    opts: &PassOptions,
    (bases, groups): (&[EigenBasis], &[usize]),
    lambda: &mut [LambdaSums],
) -> Result<u64> {
    let mut batches = 0;
    for_each_batch_in(model, docs, opts, "eigenvalues", shard, |batch, _| {
        let cap = {
            let _t = phase::timer("fit: capture");
            model.capture(batch, opts.fisher.labels())?
        };
        checked_groups(&cap, groups)?;
        batches += 1;
        add_lambdas(backend, lambda, bases, &cap, &batch.lengths)
    })?;
    Ok(batches)
}

/// Adds one capture's Λ terms through the backend: each layer's (a, δ) and the mask.
fn add_lambdas(
    backend: &dyn Backend,
    lambda: &mut [LambdaSums],
    bases: &[EigenBasis],
    cap: &Capture,
    lengths: &[usize],
) -> Result<()> {
    let layers: Vec<(&Tensor, &Tensor)> = cap.layers.iter().map(|l| (&l.a, &l.delta)).collect();
    backend.add_lambdas(lambda, bases, &layers, &cap.attention_mask, lengths)
}

/// [`accumulate_lambda`] from the covariance pass's captures of the same batches, read back
/// from `spill` (`n_docs` documents, for the progress bar). `Ok(false)`, with a warning,
/// when the spill is unusable (a write failed): the caller recomputes the captures.
fn lambda_from_spill(
    backend: &dyn Backend,
    mut spill: CaptureSpill,
    n_docs: usize,
    bases: &[EigenBasis],
    sums: &FitSums,
    lambda: &mut [LambdaSums],
) -> Result<bool> {
    if let Err(e) = spill.wait() {
        tracing::warn!("fit: the kept captures are unusable ({e}); Λ recomputes them");
        return Ok(false);
    }
    let pb = progress::bar(n_docs as u64, "eigenvalues");
    for i in 0..spill.len() {
        let (cap, lengths) = {
            let _t = phase::timer("fit: read back captures");
            spill.read(i)?
        };
        checked_groups(&cap, &sums.groups)?;
        add_lambdas(backend, lambda, bases, &cap, &lengths)?;
        pb.inc(lengths.len() as u64);
    }
    pb.finish_and_clear();
    Ok(true)
}

/// Fits the factors of a segment from its checkpoints (already loaded models, in order):
/// covariances averaged over checkpoints, one eigendecomposition, Λ averaged over
/// checkpoints. `what` prefixes layer names in errors (e.g. `segment 1`). The covariances
/// themselves are not kept (see [`fit_factors_with_covariances`]).
pub fn fit_factors(
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    what: &str,
) -> Result<Vec<LayerFactors>> {
    fit(&CpuBackend::new(), checkpoints, docs, opts, what, false)
}

/// [`fit_factors`] on `backend` (the checkpoints loaded on its device). The factors come
/// back on the CPU whatever the backend.
pub fn fit_factors_on(
    backend: &dyn Backend,
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    what: &str,
) -> Result<Vec<LayerFactors>> {
    let out = fit(backend, checkpoints, docs, opts, what, false);
    backend.release();
    out
}

/// [`fit_factors`], keeping the normalised covariances A and S in [`LayerFactors`] (f64:
/// as much memory again as the eigenvectors, twice; for tests and comparisons).
pub fn fit_factors_with_covariances(
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    what: &str,
) -> Result<Vec<LayerFactors>> {
    fit(&CpuBackend::new(), checkpoints, docs, opts, what, true)
}

fn fit(
    backend: &dyn Backend,
    checkpoints: &[&Model],
    docs: &[PreparedDoc],
    opts: &PassOptions,
    what: &str,
    keep_covariances: bool,
) -> Result<Vec<LayerFactors>> {
    let first = checkpoints
        .first()
        .ok_or_else(|| Error::Numeric(format!("{what}: no checkpoint to fit")))?;
    // The factors live on the host whatever the backend.
    let device = Device::Cpu;
    let mut sums = None;
    let mut spills = Spills::new(opts.capture_dir.clone(), first.device().is_cpu());
    for (c, m) in checkpoints.iter().enumerate() {
        let label = format!("{what} checkpoint {c}");
        let kept = accumulate_covariances(
            backend,
            m,
            (docs, None),
            opts,
            &mut sums,
            &label,
            &mut spills,
        )?;
        spills.kept.push(kept);
    }
    let spilled: u64 = spills.kept.iter().flatten().map(CaptureSpill::bytes).sum();
    if spilled > 0 {
        tracing::debug!(
            "{what}: {} of captures kept for the eigenvalue correction",
            crate::util::mem::human_bytes(spilled)
        );
    }
    let mut sums = sums.ok_or_else(|| Error::Numeric(format!("{what}: no documents to fit")))?;
    let layers = first.tracked_layers();
    let names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
    let (bases, covs) = bases_from_sums(
        backend,
        &mut sums,
        &names,
        what,
        keep_covariances,
        opts.eigen_precision,
    )?;

    let mut lambda: Vec<LambdaSums> = layers
        .iter()
        .map(|l| LambdaSums::new(l.d_out, l.d_in + l.has_bias as usize, &device))
        .collect::<Result<_>>()?;
    for (m, spill) in checkpoints.iter().zip(spills.kept) {
        let read_back = match spill.filter(|s| !s.is_empty()) {
            Some(s) => lambda_from_spill(backend, s, docs.len(), &bases, &sums, &mut lambda)?,
            None => false,
        };
        if !read_back {
            let fitted = (&bases[..], &sums.groups[..]);
            accumulate_lambda(backend, m, (docs, None), opts, fitted, &mut lambda)?;
        }
    }
    layers
        .iter()
        .zip(bases)
        .zip(covs)
        .zip(lambda)
        .map(|(((info, basis), covariances), lam)| {
            Ok(LayerFactors {
                name: info.name.clone(),
                covariances,
                basis,
                lambda: lam.normalized()?,
            })
        })
        .collect()
}

/// One eigendecomposition per distinct factor of `sums` (consumed), several at once (each
/// also splits its own work over the pool; idle threads steal either kind of work): the
/// eigenbasis of every tracked layer (`names`, in order; errors name them after `what`) and,
/// with `keep_covariances`, the normalised covariances (else their layouts only).
pub(super) fn bases_from_sums(
    backend: &dyn Backend,
    sums: &mut FitSums,
    names: &[String],
    what: &str,
    keep_covariances: bool,
    precision: EigenPrecision,
) -> Result<(Vec<EigenBasis>, Vec<Covariances>)> {
    let device = Device::Cpu;
    let tokens = sums.tokens.max(1) as f64;
    let mut jobs: Vec<(FactorSum, String)> = Vec::with_capacity(sums.a.len() + sums.s.len());
    for (k, sum) in std::mem::take(&mut sums.a).into_iter().enumerate() {
        let l = sums
            .a_of
            .iter()
            .position(|&x| x == k)
            .expect("every factor has a layer");
        let name = format!("{what} layer `{}` activation covariance", names[l]);
        jobs.push((sum, name));
    }
    for (l, sum) in std::mem::take(&mut sums.s).into_iter().enumerate() {
        let name = format!("{what} layer `{}` gradient covariance", names[l]);
        jobs.push((sum, name));
    }
    let n_a = jobs.len() - names.len();
    let eigen_timer = phase::timer("fit: eigendecomposition");
    let mut decomposed =
        decompose_all(backend, jobs, tokens, keep_covariances, precision, &device)?;
    drop(eigen_timer);
    let s_dec = decomposed.split_off(n_a);
    let a_dec = decomposed;
    let mut bases = Vec::with_capacity(names.len());
    let mut covs = Vec::with_capacity(names.len());
    for (l, s) in s_dec.into_iter().enumerate() {
        let a = &a_dec[sums.a_of[l]];
        bases.push(EigenBasis {
            q_a: a.q.clone(),
            q_s: s.q,
            eig_a: a.values.clone(),
            eig_s: s.values,
        });
        covs.push(Covariances {
            a_layout: a.q.layout.clone(),
            s_layout: bases[l].q_s.layout.clone(),
            a: a.covariance.clone(),
            s: s.covariance,
        });
    }
    Ok((bases, covs))
}

fn check_finite(sum: &FactorSum, layer: &str, what: &str, ckpt: &str, batch: usize) -> Result<()> {
    match sum.first_non_finite() {
        None => Ok(()),
        Some(i) => Err(Error::Numeric(format!(
            "{ckpt}, layer `{layer}`: non-finite {what} (column {i}) in batch {batch}; the model \
             produces NaN/Inf on this data (check the checkpoint and the learning rate that \
             produced it)"
        ))),
    }
}
