//! Owns preconditioned conjugate gradients over per-layer query batches: `pcg`, `CgOptions`,
//! `CgOutcome`.
//! Layer: linalg — may import only the ground floor (error, util, config, output).
//!
//! Solves A x_q = b_q for every query q of a batch at once, where a vector is one tensor per
//! tracked layer with the queries on the leading dimension ([Q, d_out, d_in]) and A, M⁻¹
//! act on whole batches (A = G + λ with exact Gauss–Newton products, M⁻¹ the damped EK-FAC
//! inverse, docs/design.md §9). Every query runs its own recurrence (its own α, β), in f64
//! scalars:
//!
//! ```text
//! x₀ = M⁻¹ b,  r₀ = b − A x₀,  z₀ = M⁻¹ r₀,  p₀ = z₀
//! α = ⟨r, z⟩ / ⟨p, A p⟩,  x ← x + α p,  r ← r − α A p
//! z ← M⁻¹ r,  β = ⟨r, z⟩_new / ⟨r, z⟩_old,  p ← z + β p
//! ```
//!
//! so zero iterations return the preconditioned b itself (today's EK-FAC answer), and a
//! query stops once ‖r‖ / ‖b‖ ≤ tolerance (later products leave it out).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// When conjugate gradients stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgOptions {
    /// At most this many products with A per query (0: x = M⁻¹ b).
    pub iterations: usize,
    /// Stop a query once its relative residual ‖b − A x‖ / ‖b‖ is at most this.
    pub tolerance: f64,
}

/// The solutions and how the residuals fell.
#[derive(Debug, Clone)]
pub struct CgOutcome {
    /// x per layer [Q, …].
    pub x: Vec<Tensor>,
    /// `residuals[q][i]`: ‖b − A x‖ / ‖b‖ of query q after i iterations (i = 0: at x₀ = M⁻¹
    /// b), up to the iteration where q stopped. Empty with zero iterations (no product run).
    pub residuals: Vec<Vec<f64>>,
    /// Products with A run, counted per query vector (the cost).
    pub products: usize,
}

/// Per-query ⟨a, b⟩ summed over layers, in f64.
pub fn dots(a: &[Tensor], b: &[Tensor]) -> Result<Vec<f64>> {
    let mut out: Option<Vec<f64>> = None;
    for (x, y) in a.iter().zip(b) {
        let q = x.dim(0)?;
        let d = (x.to_dtype(DType::F64)? * y.to_dtype(DType::F64)?)?
            .reshape((q, ()))?
            .sum(1)?
            .to_vec1::<f64>()?;
        out = Some(match out {
            None => d,
            Some(o) => o.iter().zip(&d).map(|(p, s)| p + s).collect(),
        });
    }
    out.ok_or_else(|| Error::Numeric("conjugate gradients over no layer".into()))
}

/// x + diag(c) y per query (c scales query q's rows).
fn axpy(x: &[Tensor], c: &[f64], y: &[Tensor]) -> Result<Vec<Tensor>> {
    x.iter()
        .zip(y)
        .map(|(x, y)| {
            let mut shape = vec![c.len()];
            shape.extend(std::iter::repeat_n(1, x.rank() - 1));
            let c = Tensor::from_vec(c.to_vec(), shape, x.device())?.to_dtype(x.dtype())?;
            Ok((x + y.broadcast_mul(&c)?)?)
        })
        .collect()
}

/// The rows `idx` of every layer.
fn rows(v: &[Tensor], idx: &[usize]) -> Result<Vec<Tensor>> {
    let ids = Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        idx.len(),
        v.first().map_or(&candle_core::Device::Cpu, |t| t.device()),
    )?;
    v.iter()
        .map(|t| Ok(t.contiguous()?.index_select(&ids, 0)?))
        .collect::<Result<_>>()
}

/// Solves A x = b per query by conjugate gradients preconditioned with M⁻¹, starting at
/// x₀ = M⁻¹ b. `apply_a` and `apply_m_inv` map a batch of vectors (any number of rows) to
/// the same shapes; A must be symmetric positive definite, M⁻¹ too.
pub fn pcg(
    b: &[Tensor],
    apply_a: impl FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
    apply_m_inv: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    opts: CgOptions,
) -> Result<CgOutcome> {
    let x0 = apply_m_inv(b)?;
    pcg_from(b, x0, apply_a, apply_m_inv, opts)
}

/// [`pcg`] started at a given x₀ = M⁻¹ b (computed by the caller, e.g. from a cheaper form of
/// b); zero iterations return it as it is.
pub fn pcg_from(
    b: &[Tensor],
    x0: Vec<Tensor>,
    mut apply_a: impl FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
    apply_m_inv: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    opts: CgOptions,
) -> Result<CgOutcome> {
    let mut x = x0;
    if opts.iterations == 0 {
        return Ok(CgOutcome {
            x,
            residuals: Vec::new(),
            products: 0,
        });
    }
    let q = b
        .first()
        .ok_or_else(|| Error::Numeric("conjugate gradients over no layer".into()))?
        .dim(0)?;
    let b_norm: Vec<f64> = dots(b, b)?.iter().map(|v| v.sqrt()).collect();
    let ax = apply_a(&x)?;
    let mut products = q;
    let mut r: Vec<Tensor> = b
        .iter()
        .zip(&ax)
        .map(|(b, a)| Ok((b - a)?))
        .collect::<Result<_>>()?;
    let mut z = apply_m_inv(&r)?;
    let mut p = z.clone();
    let mut rz = dots(&r, &z)?;
    let rel = |r: &[Tensor]| -> Result<Vec<f64>> {
        Ok(dots(r, r)?
            .iter()
            .zip(&b_norm)
            .map(|(rr, bn)| if *bn > 0.0 { rr.sqrt() / bn } else { 0.0 })
            .collect())
    };
    let mut residuals: Vec<Vec<f64>> = rel(&r)?.into_iter().map(|v| vec![v]).collect();
    for _ in 0..opts.iterations {
        let active: Vec<usize> = (0..q)
            .filter(|&i| residuals[i].last().is_some_and(|&v| v > opts.tolerance) && rz[i] > 0.0)
            .collect();
        if active.is_empty() {
            break;
        }
        // A p for the active queries only; the others get α = 0.
        let p_active = rows(&p, &active)?;
        let ap_active = apply_a(&p_active)?;
        products += active.len();
        let pap = dots(&p_active, &ap_active)?;
        let mut alpha = vec![0.0; q];
        for (j, &i) in active.iter().enumerate() {
            if pap[j] > 0.0 {
                alpha[i] = rz[i] / pap[j];
            }
        }
        let ap = scatter(&ap_active, &active, q)?;
        x = axpy(&x, &alpha, &p)?;
        let neg: Vec<f64> = alpha.iter().map(|a| -a).collect();
        r = axpy(&r, &neg, &ap)?;
        let res = rel(&r)?;
        for &i in &active {
            residuals[i].push(res[i]);
        }
        let worst = active.iter().map(|&i| res[i]).fold(0.0, f64::max);
        tracing::info!(
            "conjugate gradients: iteration {}/{}: {} of {q} queries ran, largest relative \
             residual {}",
            residuals[active[0]].len() - 1,
            opts.iterations,
            active.len(),
            crate::util::num::sig(worst, 3)
        );
        z = apply_m_inv(&r)?;
        let rz_new = dots(&r, &z)?;
        let beta: Vec<f64> = (0..q)
            .map(|i| if rz[i] > 0.0 { rz_new[i] / rz[i] } else { 0.0 })
            .collect();
        // p ← z + β p for the active queries; the others keep theirs (unused).
        let moved = axpy(&z, &beta, &p)?;
        p = select_rows(&moved, &p, &active, q)?;
        for &i in &active {
            rz[i] = rz_new[i];
        }
    }
    Ok(CgOutcome {
        x,
        residuals,
        products,
    })
}

/// A [q, …] batch whose rows `idx` are `part`'s rows in order and whose other rows are zero.
fn scatter(part: &[Tensor], idx: &[usize], q: usize) -> Result<Vec<Tensor>> {
    part.iter()
        .map(|t| {
            let zero = t.get(0)?.zeros_like()?;
            let mut all = vec![zero; q];
            for (j, &i) in idx.iter().enumerate() {
                all[i] = t.get(j)?;
            }
            Ok(Tensor::stack(&all, 0)?)
        })
        .collect()
}

/// Rows `idx` from `a`, every other row from `b`.
fn select_rows(a: &[Tensor], b: &[Tensor], idx: &[usize], q: usize) -> Result<Vec<Tensor>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let all: Vec<Tensor> = (0..q)
                .map(|i| if idx.contains(&i) { a.get(i) } else { b.get(i) })
                .collect::<candle_core::Result<_>>()?;
            Ok(Tensor::stack(&all, 0)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A = B Bᵀ + 0.1 I (n × n) and a diagonal preconditioner, as dense f64 tensors.
    fn problem(n: usize, seed: u64) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
        let b = Tensor::from_vec(b, (n, n), &dev).unwrap();
        let a = (b.matmul(&b.t().unwrap()).unwrap()
            + (Tensor::eye(n, DType::F64, &dev).unwrap() * 0.1).unwrap())
        .unwrap();
        let rhs: Vec<f64> = (0..3 * n).map(|_| next()).collect();
        (a, Tensor::from_vec(rhs, (3, n), &dev).unwrap())
    }

    #[test]
    fn converges_to_the_dense_solve_and_zero_iterations_is_the_preconditioner() {
        let n = 12;
        let (a, rhs) = problem(n, 3);
        // Two "layers": the first 5 and the last 7 coordinates.
        let split = |v: &Tensor| vec![v.narrow(1, 0, 5).unwrap(), v.narrow(1, 5, 7).unwrap()];
        let join = |v: &[Tensor]| Tensor::cat(v, 1).unwrap();
        let apply_a =
            |v: &[Tensor]| -> Result<Vec<Tensor>> { Ok(split(&join(v).matmul(&a).unwrap())) };
        let diag = (&a * Tensor::eye(n, DType::F64, &Device::Cpu).unwrap())
            .unwrap()
            .sum(1)
            .unwrap()
            .recip()
            .unwrap();
        let m_inv =
            |v: &[Tensor]| -> Result<Vec<Tensor>> { Ok(split(&join(v).broadcast_mul(&diag)?)) };
        let b = split(&rhs);
        let zero = pcg(
            &b,
            apply_a,
            m_inv,
            CgOptions {
                iterations: 0,
                tolerance: 0.0,
            },
        )
        .unwrap();
        let pre = m_inv(&b).unwrap();
        for (x, y) in zero.x.iter().zip(&pre) {
            assert_eq!(x.to_vec2::<f64>().unwrap(), y.to_vec2::<f64>().unwrap());
        }
        assert_eq!(zero.products, 0);
        // Exact arithmetic converges in n steps; allow a few more for rounding.
        let out = pcg(
            &b,
            apply_a,
            m_inv,
            CgOptions {
                iterations: 3 * n,
                tolerance: 1e-10,
            },
        )
        .unwrap();
        let got = join(&out.x);
        // The solution solves the dense system: ‖x A − b‖ tiny (A symmetric).
        let back = got.matmul(&a).unwrap();
        let err = (&back - &rhs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(err <= 1e-8, "{err}");
        for r in &out.residuals {
            assert!(*r.last().unwrap() <= 1e-10 || r.len() == 3 * n + 1, "{r:?}");
            // The A-norm error falls monotonically; the residual is checked loosely: it
            // ends far below where it started.
            assert!(r.last().unwrap() < &(r[0] * 1e-6));
        }
        // Each query on its own takes the same path as in the batch.
        let alone = pcg(
            &b.iter()
                .map(|t| t.narrow(0, 1, 1).unwrap())
                .collect::<Vec<_>>(),
            apply_a,
            m_inv,
            CgOptions {
                iterations: 4,
                tolerance: 0.0,
            },
        )
        .unwrap();
        let batch = pcg(
            &b,
            apply_a,
            m_inv,
            CgOptions {
                iterations: 4,
                tolerance: 0.0,
            },
        )
        .unwrap();
        let (x1, xb) = (join(&alone.x), join(&batch.x).narrow(0, 1, 1).unwrap());
        let d = (&x1 - &xb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{d}");
        assert_eq!(alone.residuals[0], batch.residuals[1]);
    }
}
