//! Test helpers for linalg: EK-FAC factors of one layer fitted on random (a, δ), `max_abs_diff`.
//! Layer: linalg (tests) — may import the ground and, in this folder, basis.rs, covariance.rs,
//! factors.rs, lambda.rs.

use candle_core::{DType, Device, Tensor};

use super::{masked_rows, CovarianceSums, EigenBasis, LambdaSums, LayerFactors};

/// Factors of a layer `name` [d_out, d_in] fitted on b × t random tokens (all kept), with
/// optional blocks.
pub(crate) fn random_factors(
    name: &str,
    (b, t, din, dout): (usize, usize, usize, usize),
    block: Option<usize>,
) -> LayerFactors {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (b, t, din), &dev).unwrap();
    let d = Tensor::randn(0f32, 1.0, (b, t, dout), &dev).unwrap();
    let mask = Tensor::ones((b, t), DType::U8, &dev).unwrap();
    let mut cov = CovarianceSums::new(din, dout, block, &dev).unwrap();
    cov.add(
        &masked_rows(&a, &mask).unwrap(),
        &masked_rows(&d, &mask).unwrap(),
    )
    .unwrap();
    let covariances = cov.normalized().unwrap();
    let basis = EigenBasis::from_covariances(&covariances, "test", &dev).unwrap();
    let mut lam = LambdaSums::new(dout, din, &dev).unwrap();
    lam.add_batch(&basis, &a, &d, &mask).unwrap();
    LayerFactors {
        name: name.to_string(),
        covariances,
        basis,
        lambda: lam.normalized().unwrap(),
    }
}

/// max |a − b| over all entries.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
