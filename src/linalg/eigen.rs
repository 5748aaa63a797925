//! Owns `Eigen` and the symmetric eigendecompositions `eigh*` (faer, in f64 or f32).
//! Layer: linalg — may import the ground (error, util, config, output); no sibling.
//!
//! Symmetric eigendecomposition (faer): A = Q diag(λ) Qᵀ, eigenvalues ascending, computed in
//! f64 (the reference) or, on request, in f32.

use crate::config::EigenPrecision;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd;
use faer::traits::RealField;
use faer::{Mat, MatRef, Par};

/// Eigenvalues λ \[n\] (ascending) and eigenvectors Q [n, n] (columns) of a symmetric matrix.
#[derive(Debug, Clone)]
pub struct Eigen {
    /// λ, ascending, f64.
    pub values: Vec<f64>,
    /// Q, row-major n × n, column j is the eigenvector of λ_j, f64.
    pub vectors: Vec<f64>,
    /// n.
    pub n: usize,
}

impl Eigen {
    /// Q as an f32 tensor [n, n] on `device`.
    pub fn vectors_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(
            Tensor::from_vec(self.vectors.clone(), (self.n, self.n), device)?
                .to_dtype(DType::F32)?,
        )
    }

    /// λ as an f32 tensor \[n\] on `device`.
    pub fn values_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.values.clone(), self.n, device)?.to_dtype(DType::F32)?)
    }
}

/// Eigendecomposes the symmetric matrix `m` (any float dtype, [n, n]) in f64. The lower
/// triangle is used. NaN or Inf entries are rejected before the decomposition with an error
/// that names `what` (e.g. the layer and factor).
pub fn eigh(m: &Tensor, what: &str) -> Result<Eigen> {
    let (n, n2) = m.dims2()?;
    if n != n2 {
        return Err(Error::Numeric(format!("{what}: not square ({n} × {n2})")));
    }
    let data: Vec<f64> = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    eigh_f64(&data, n, what)
}

/// [`eigh`] of a symmetric n × n matrix given row-major in f64 (the lower triangle is used),
/// with faer's global parallelism.
pub fn eigh_f64(data: &[f64], n: usize, what: &str) -> Result<Eigen> {
    eigh_f64_with(data, n, what, faer::get_global_parallelism())
}

/// [`eigh_f64`] with the parallelism `par` (e.g. `Par::Seq` when several decompositions
/// run side by side, one per thread).
pub fn eigh_f64_with(data: &[f64], n: usize, what: &str, par: Par) -> Result<Eigen> {
    eigh_with(data, n, what, par, EigenPrecision::F64)
}

/// The decomposition of the symmetric n × n matrix `data` (row-major f64, lower triangle used)
/// in the arithmetic `precision`, with the parallelism `par`. The result is in f64 whatever
/// the arithmetic. Non-finite entries are rejected first, naming `what`.
pub fn eigh_with(
    data: &[f64],
    n: usize,
    what: &str,
    par: Par,
    precision: EigenPrecision,
) -> Result<Eigen> {
    if data.len() != n * n {
        return Err(Error::Numeric(format!(
            "{what}: {} values for a {n} × {n} matrix",
            data.len()
        )));
    }
    if let Some(pos) = data.iter().position(|x| !x.is_finite()) {
        return Err(Error::Numeric(format!(
            "{what}: entry ({}, {}) is {} before the eigendecomposition; the covariance was \
             accumulated from non-finite activations or gradients (check the learning rate, the \
             loss and the input data)",
            pos / n,
            pos % n,
            data[pos]
        )));
    }
    match precision {
        EigenPrecision::F64 => evd_in(MatRef::from_row_major_slice(data, n, n), what, par),
        EigenPrecision::F32 => {
            let m = Mat::<f32>::from_fn(n, n, |i, j| data[i * n + j] as f32);
            evd_in(m.as_ref(), what, par)
        }
    }
}

/// faer's self-adjoint eigendecomposition in T's arithmetic, returned in f64.
fn evd_in<T: RealField + Copy + Into<f64>>(
    mat: MatRef<'_, T>,
    what: &str,
    par: Par,
) -> Result<Eigen> {
    let n = mat.nrows();
    let mut u = Mat::<T>::zeros(n, n);
    let mut s = Diag::<T>::zeros(n);
    let scratch = evd::self_adjoint_evd_scratch::<T>(
        n,
        evd::ComputeEigenvectors::Yes,
        par,
        Default::default(),
    );
    evd::self_adjoint_evd(
        mat,
        s.as_mut(),
        Some(u.as_mut()),
        par,
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    )
    .map_err(|e| Error::Numeric(format!("{what}: eigendecomposition failed: {e:?}")))?;
    let values: Vec<f64> = (0..n).map(|i| s.column_vector()[i].into()).collect();
    let mut vectors = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, j)].into();
        }
    }
    Ok(Eigen { values, vectors, n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstructs_and_sorts() {
        let dev = Device::Cpu;
        // A = B Bᵀ is symmetric positive semi-definite.
        let b = Tensor::new(
            &[[1.0f64, 2.0, 0.5], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]],
            &dev,
        )
        .unwrap();
        let a = b.matmul(&b.t().unwrap()).unwrap();
        let e = eigh(&a, "test").unwrap();
        assert!(e.values.windows(2).all(|w| w[0] <= w[1]));
        let q = Tensor::from_vec(e.vectors.clone(), (3, 3), &dev).unwrap();
        let l = Tensor::from_vec(e.values.clone(), 3, &dev).unwrap();
        let recon = q
            .broadcast_mul(&l.unsqueeze(0).unwrap())
            .unwrap()
            .matmul(&q.t().unwrap())
            .unwrap();
        let err: f64 = (recon - &a)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12, "{err}");
        // Qᵀ Q = I.
        let qtq = q.t().unwrap().matmul(&q).unwrap();
        let eye = Tensor::eye(3, DType::F64, &dev).unwrap();
        let err: f64 = (qtq - eye)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-12);
    }

    #[test]
    fn rejects_nan_naming_the_matrix() {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[1.0f32, f32::NAN], [f32::NAN, 1.0]], &dev).unwrap();
        let e = eigh(&m, "layer 3 q_proj activation covariance")
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 3 q_proj activation covariance"), "{e}");
        assert!(e.contains("entry (0, 1) is NaN"), "{e}");
    }

    /// Qᵀ C Q for the row-major C and Q (n × n, f64): the basis's view of C.
    fn rotated(c: &[f64], q: &[f64], n: usize) -> Vec<f64> {
        let dev = Device::Cpu;
        let c = Tensor::from_vec(c.to_vec(), (n, n), &dev).unwrap();
        let q = Tensor::from_vec(q.to_vec(), (n, n), &dev).unwrap();
        q.t()
            .unwrap()
            .matmul(&c)
            .unwrap()
            .matmul(&q)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn f32_arithmetic_gives_an_orthonormal_diagonalising_basis() {
        // A covariance with a decaying spectrum (λ_max / λ_min ~ 1e4), from fixed
        // pseudo-random samples.
        let (n, k) = (96usize, 400usize);
        let mut rng = crate::util::rng::SplitMix64::new(7);
        let x: Vec<f64> = (0..k * n)
            .map(|i| (rng.next_f64() - 0.5) / (1.0 + (i % n) as f64).powf(1.5))
            .collect();
        let mut c = vec![0.0f64; n * n];
        for s in 0..k {
            let row = &x[s * n..(s + 1) * n];
            for i in 0..n {
                for j in 0..n {
                    c[i * n + j] += row[i] * row[j] / k as f64;
                }
            }
        }
        let e64 = eigh_with(&c, n, "test", Par::Seq, EigenPrecision::F64).unwrap();
        let e32 = eigh_with(&c, n, "test", Par::Seq, EigenPrecision::F32).unwrap();
        let top = e64.values[n - 1];
        assert!(
            e64.values[0] > 0.0 && top / e64.values[0] > 1e3,
            "{:?}",
            (top, e64.values[0])
        );
        // Eigenvalues agree to f32 rounding of the largest.
        for (a, b) in e64.values.iter().zip(&e32.values) {
            assert!((a - b).abs() < 1e-5 * top, "{a} vs {b}");
        }
        // Qᵀ Q = I to f32 accuracy.
        let eye: Vec<f64> = (0..n * n)
            .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
            .collect();
        let qtq = rotated(&eye, &e32.vectors, n);
        let orth = qtq
            .iter()
            .zip(&eye)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(orth < 1e-5, "orthogonality {orth}");
        // Qᵀ C Q is diagonal up to a relative off-diagonal mass of 1e-4, and its diagonal
        // is the f64 spectrum.
        let d = rotated(&c, &e32.vectors, n);
        let (mut off, mut all) = (0.0, 0.0);
        for i in 0..n {
            for j in 0..n {
                let v = d[i * n + j] * d[i * n + j];
                all += v;
                if i != j {
                    off += v;
                }
            }
        }
        assert!(
            (off / all).sqrt() < 1e-4,
            "off-diagonal {}",
            (off / all).sqrt()
        );
        for i in 0..n {
            assert!((d[i * n + i] - e64.values[i]).abs() < 1e-5 * top);
        }
    }
}
