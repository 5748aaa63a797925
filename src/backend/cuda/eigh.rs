//! Owns `eigh_gpu`: the f64 symmetric eigendecomposition of a factor on the GPU (cuSOLVER).
//! Layer: backend — may import the ground, linalg and, in this folder, gpu.rs.
//!
//! The f64 symmetric eigendecomposition of a Kronecker factor on the GPU (cuSOLVER
//! `syevd`, docs/design.md §3.2): A = Q diag(λ) Qᵀ, λ ascending, the same contract as
//! [`crate::linalg::eigh`] (CPU, faer).

use cudarc::cusolver::{sys, DnHandle};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::error::{Error, Result};
use crate::linalg::Eigen;

use super::gpu::Gpu;

fn solver_err(what: &str) -> impl Fn(cudarc::cusolver::result::CusolverError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuSOLVER {what}: {e:?}"))
}

/// Eigendecomposes the symmetric row-major `m` [n, n] (f64; the lower triangle is used) on
/// the GPU. Non-finite entries are rejected first with an error naming `what`.
pub fn eigh_gpu(gpu: &Gpu, m: &[f64], n: usize, what: &str) -> Result<Eigen> {
    if m.len() != n * n {
        return Err(Error::Numeric(format!(
            "{what}: {} entries for a {n} × {n} matrix",
            m.len()
        )));
    }
    if let Some(pos) = m.iter().position(|x| !x.is_finite()) {
        return Err(Error::Numeric(format!(
            "{what}: entry ({}, {}) is {} before the eigendecomposition",
            pos / n,
            pos % n,
            m[pos]
        )));
    }
    let handle = DnHandle::new(gpu.stream().clone()).map_err(solver_err("handle"))?;
    // Row-major symmetric = column-major symmetric; cuSOLVER's lower triangle (column-major)
    // is the row-major upper one, equal by symmetry.
    let mut a = gpu.upload(m)?;
    let mut w = gpu.zeros::<f64>(n)?;
    let mut info = gpu.zeros::<i32>(1)?;
    let nn = n as i32;
    let jobz = sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let uplo = sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let mut lwork = 0i32;
    {
        let (pa, _ga) = a.device_ptr(gpu.stream());
        let (pw, _gw) = w.device_ptr(gpu.stream());
        // SAFETY: a is n × n f64, w is n f64, lwork a valid host pointer.
        unsafe {
            sys::cusolverDnDsyevd_bufferSize(
                handle.cu(),
                jobz,
                uplo,
                nn,
                pa as *const f64,
                nn,
                pw as *const f64,
                &mut lwork,
            )
        }
        .result()
        .map_err(solver_err("syevd workspace query"))?;
    }
    let mut work = gpu.zeros::<f64>(lwork.max(1) as usize)?;
    {
        let (pa, _ga) = a.device_ptr_mut(gpu.stream());
        let (pw, _gw) = w.device_ptr_mut(gpu.stream());
        let (pk, _gk) = work.device_ptr_mut(gpu.stream());
        let (pi, _gi) = info.device_ptr_mut(gpu.stream());
        // SAFETY: buffer sizes as queried above; all on the handle's stream.
        unsafe {
            sys::cusolverDnDsyevd(
                handle.cu(),
                jobz,
                uplo,
                nn,
                pa as *mut f64,
                nn,
                pw as *mut f64,
                pk as *mut f64,
                lwork,
                pi as *mut i32,
            )
        }
        .result()
        .map_err(solver_err("syevd"))?;
    }
    let info = gpu.download(&info)?[0];
    if info != 0 {
        return Err(Error::Numeric(format!(
            "{what}: the GPU eigendecomposition did not converge (cuSOLVER syevd info {info})"
        )));
    }
    let values = gpu.download(&w)?;
    // cuSOLVER returns eigenvectors as columns of a column-major matrix: element (i, j) at
    // col[j·n + i]. Eigen wants row-major with column j the eigenvector of λ_j.
    let col = gpu.download(&a)?;
    let mut vectors = vec![0.0f64; n * n];
    for j in 0..n {
        for i in 0..n {
            vectors[i * n + j] = col[j * n + i];
        }
    }
    Ok(Eigen { values, vectors, n })
}
