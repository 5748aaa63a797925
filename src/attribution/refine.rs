//! Owns the refined inverse: `GaussNewtonSample` (G v over a document sample) and
//! `refine_inverse` (conjugate gradients on (G + λ) x = v, EK-FAC-preconditioned).
//! Layer: attribution — may import every floor from the ground up to curvature and, in this
//! folder, curvature.rs.
//!
//! The influence function's u = (H̄ + λ)⁻¹ v takes EK-FAC's H̄ as the curvature. Its
//! eigenbasis is close, its eigenvalues less so, and it is block-diagonal per layer; the
//! refinement solves (G + λ) u = v instead, with G = (1/|S|) Σ_{m∈S} G(z_m) the exact
//! Gauss–Newton matrix of a sample S of the documents H̄ was fitted on (the quantity H̄
//! estimates: Λ is normalised per document, §3.3) and λ the same per-layer damping, by
//! conjugate gradients preconditioned with (H̄ + λ)⁻¹ and started at its answer
//! (docs/design.md §9).

use candle_core::Tensor;

use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::linalg::{pcg_from, CgOptions, CgOutcome, LayerFactors, TokenFactors};
use crate::model::Model;
use crate::passes::{for_each_batch, PassOptions};
use crate::util::rng::SplitMix64;

use super::curvature::{Curvature, Damping};

/// G v = (1/|S|) Σ_{m∈S} G(z_m) v over a fixed sample S of documents at one model.
pub struct GaussNewtonSample<'a> {
    model: &'a Model,
    docs: Vec<PreparedDoc>,
    opts: PassOptions,
}

impl<'a> GaussNewtonSample<'a> {
    /// The first `n` documents of a permutation of `docs` seeded by `seed` (all of them when
    /// there are at most `n`), batched as `opts` says.
    pub fn new(
        model: &'a Model,
        docs: &[PreparedDoc],
        n: usize,
        seed: u64,
        opts: &PassOptions,
    ) -> Result<Self> {
        if docs.is_empty() {
            return Err(Error::Pipeline(
                "refining the inverse needs documents for the Gauss–Newton products".into(),
            ));
        }
        let mut idx: Vec<usize> = (0..docs.len()).collect();
        if n < docs.len() {
            let mut rng = SplitMix64::stream(seed, 0x6a55);
            for i in 0..n {
                let j = i + rng.below((docs.len() - i) as u64) as usize;
                idx.swap(i, j);
            }
            idx.truncate(n);
            idx.sort_unstable();
        }
        Ok(Self {
            model,
            docs: idx.iter().map(|&i| docs[i].clone()).collect(),
            opts: opts.clone(),
        })
    }

    /// |S|.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether S is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// (1/|S|) Σ_m G(z_m) v for K directions (`v` per tracked layer [K, d_out, d_in(+1)]).
    /// Each batch holds K copies of its documents, so batches are planned with 1/K of the
    /// token budget.
    pub fn apply(&self, v: &[Tensor]) -> Result<Vec<Tensor>> {
        let k = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let mut opts = self.opts.clone();
        opts.token_budget = (opts.token_budget / k.max(1)).max(1);
        opts.max_batch_size = (opts.max_batch_size / k.max(1)).max(1);
        let mut sum: Option<Vec<Tensor>> = None;
        for_each_batch(self.model, &self.docs, &opts, "refine: G v", |batch, _| {
            let g = self.model.gauss_newton(batch, v)?;
            sum = Some(match sum.take() {
                None => g,
                Some(s) => s
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| Ok((a + b)?))
                    .collect::<Result<_>>()?,
            });
            Ok(())
        })?;
        let n = self.docs.len() as f64;
        sum.ok_or_else(|| Error::Pipeline("no batch in the Gauss–Newton sample".into()))?
            .iter()
            .map(|t| Ok((t / n)?))
            .collect()
    }
}

/// λ of every layer as the damped EK-FAC inverse uses it ([`Damping::for_layer`]).
pub fn layer_dampings(factors: &[LayerFactors], damping: Damping) -> Result<Vec<f64>> {
    factors
        .iter()
        .map(|f| damping.for_layer(&f.lambda))
        .collect()
}

/// u = (G + λ)⁻¹ v by conjugate gradients preconditioned with (H̄ + λ)⁻¹ (`curvature`'s
/// damped inverse with `damping`), `lambdas` the per-layer λ that inverse uses
/// ([`layer_dampings`]), started at EK-FAC's answer (H̄ + λ)⁻¹ v, taken from `tokens` (v as
/// token factors) when given. With zero iterations u is exactly that answer: bit for bit
/// `curvature.inverse(v, damping)`, or `curvature.inverse_factored(tokens, damping)`.
pub fn refine_inverse(
    curvature: &dyn Curvature,
    lambdas: &[f64],
    damping: Damping,
    ggn: &GaussNewtonSample,
    v: &[Tensor],
    tokens: Option<&[TokenFactors]>,
    opts: CgOptions,
) -> Result<CgOutcome> {
    let apply_a = |x: &[Tensor]| -> Result<Vec<Tensor>> {
        let gx = ggn.apply(x)?;
        gx.iter()
            .zip(x)
            .zip(lambdas)
            .map(|((g, x), &l)| Ok((g + (x * l)?)?))
            .collect()
    };
    let m_inv = |x: &[Tensor]| curvature.inverse(x, damping);
    let x0 = match tokens {
        Some(t) => curvature.inverse_factored(t, damping)?,
        None => m_inv(v)?,
    };
    pcg_from(v, x0, apply_a, m_inv, opts)
}
