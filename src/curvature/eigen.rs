//! Symmetric eigendecomposition in f64 (faer): A = Q diag(λ) Qᵀ, eigenvalues ascending.

use candle_core::{DType, Device, Tensor};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd;
use faer::{Mat, MatRef, Par};

use crate::error::{Error, Result};

/// Eigenvalues λ [n] (ascending) and eigenvectors Q [n, n] (columns) of a symmetric matrix.
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

    /// λ as an f32 tensor [n] on `device`.
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
    let mat = MatRef::from_row_major_slice(data, n, n);
    let mut u = Mat::<f64>::zeros(n, n);
    let mut s = Diag::<f64>::zeros(n);
    let scratch = evd::self_adjoint_evd_scratch::<f64>(
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
    let values: Vec<f64> = (0..n).map(|i| s.column_vector()[i]).collect();
    let mut vectors = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, j)];
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
}
