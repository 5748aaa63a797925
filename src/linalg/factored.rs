//! Owns `TokenFactors`: a batch of layer gradients kept as their tokens' (δ, a) rows, and
//! their rotation into a Kronecker eigenbasis without forming the gradients.
//! Layer: linalg — may import the ground (error, util, config, output) and, in this folder,
//! basis.rs.
//!
//! A query's layer gradient is a sum over its few tokens, V_q = Σ_t δ_t a_tᵀ = Δ_qᵀ A_q
//! (Δ_q [T, d_out], A_q [T, d_in]), so its rotation into the eigenbasis factors:
//! Q_Sᵀ V_q Q_A = (Δ_q Q_S)ᵀ (A_q Q_A), which costs 2·T·(d_out² + d_in² + d_out·d_in) FLOPs
//! instead of the dense form's 2·d_out·d_in·(d_out + d_in). For SmolLM2-135M's MLP layers
//! (576 × 1536) and a 64-token query that is 8× fewer.

use candle_core::Tensor;

use crate::error::{Error, Result};

use super::basis::EigenBasis;

/// Layer gradients V_q = Δ_qᵀ A_q of Q vectors, kept as their token rows (rows past a
/// vector's own length are zero, so they add nothing).
#[derive(Debug, Clone)]
pub struct TokenFactors {
    /// Δ: the output gradients δ_t, [Q, T, d_out] (f32).
    pub delta: Tensor,
    /// A: the layer inputs a_t (with the bias's 1 as the last column where the layer has
    /// one), [Q, T, d_in] (f32).
    pub a: Tensor,
}

impl TokenFactors {
    /// Checks that Δ and A are [Q, T, ·] with the same Q and T.
    pub fn new(delta: Tensor, a: Tensor) -> Result<TokenFactors> {
        let (q, t, _) = delta.dims3()?;
        let (qa, ta, _) = a.dims3()?;
        if (q, t) != (qa, ta) {
            return Err(Error::Numeric(format!(
                "token factors disagree: Δ {:?} and A {:?} must share [Q, T]",
                delta.dims(),
                a.dims()
            )));
        }
        Ok(TokenFactors { delta, a })
    }

    /// (Q, T, d_out, d_in).
    pub fn dims(&self) -> Result<(usize, usize, usize, usize)> {
        let (q, t, d_out) = self.delta.dims3()?;
        Ok((q, t, d_out, self.a.dim(2)?))
    }

    /// V = Δᵀ A per vector, [Q, d_out, d_in].
    pub fn dense(&self) -> Result<Tensor> {
        Ok(self
            .delta
            .transpose(1, 2)?
            .contiguous()?
            .matmul(&self.a.contiguous()?)?)
    }

    /// Whether rotating the factors costs fewer FLOPs than forming V and rotating it:
    /// T·(d_out² + d_in² + d_out·d_in) < d_out·d_in·(d_out + d_in) (whole-factor cost; block
    /// diagonal factors cut both sides alike).
    pub fn rotation_is_cheaper(&self) -> Result<bool> {
        let (_, t, o, i) = self.dims()?;
        let (t, o, i) = (t as f64, o as f64, i as f64);
        Ok(t * (o * o + i * i + o * i) < o * i * (o + i))
    }

    /// Q_Sᵀ V_q Q_A = (Δ_q Q_S)ᵀ (A_q Q_A) for every vector, [Q, d_out, d_in], contiguous.
    pub fn rotate(&self, basis: &EigenBasis) -> Result<Tensor> {
        let (_, _, d_out, d_in) = self.dims()?;
        if (d_out, d_in) != (basis.q_s.layout.dim, basis.q_a.layout.dim) {
            return Err(Error::Numeric(format!(
                "token factors of a [{d_out}, {d_in}] layer do not match an eigenbasis of \
                 [{}, {}]",
                basis.q_s.layout.dim, basis.q_a.layout.dim
            )));
        }
        let ds = basis.q_s.right_mul(&self.delta.contiguous()?)?; // Δ Q_S [Q, T, d_out]
        let aa = basis.q_a.right_mul(&self.a.contiguous()?)?; // A Q_A [Q, T, d_in]
        Ok(ds.transpose(1, 2)?.contiguous()?.matmul(&aa)?)
    }
}

/// Q_S (W ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ for V given as token factors: rotated from the factors when
/// that is cheaper ([`TokenFactors::rotation_is_cheaper`]), else from V formed densely; the
/// same value as [`super::apply_in_basis`] on [`TokenFactors::dense`] up to f32 rounding.
pub fn apply_in_basis_factored(
    basis: &EigenBasis,
    weights: &Tensor,
    v: &TokenFactors,
) -> Result<Tensor> {
    let rotated = if v.rotation_is_cheaper()? {
        v.rotate(basis)?
    } else {
        basis.rotate(&v.dense()?)?
    };
    basis.unrotate(&rotated.broadcast_mul(weights)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::linalg::apply_in_basis;
    use crate::linalg::test_support::{max_abs_diff, random_factors};

    fn factors(q: usize, t: usize, d_out: usize, d_in: usize) -> TokenFactors {
        let dev = Device::Cpu;
        TokenFactors::new(
            Tensor::randn(0f32, 1.0, (q, t, d_out), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (q, t, d_in), &dev).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn factored_rotation_equals_the_dense_one() {
        // Whole factors, and block-diagonal ones (blocks of 4 on both sides).
        for (d_out, d_in, t, block) in [(6, 5, 2, None), (12, 9, 3, Some(4))] {
            let f = random_factors("l", (4, 8, d_in, d_out), block);
            let v = factors(3, t, d_out, d_in);
            assert!(v.rotation_is_cheaper().unwrap());
            let dense = v.dense().unwrap();
            let close = |got: &Tensor, want: &Tensor| {
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                max_abs_diff(got, want) <= 1e-5 * scale
            };
            let rotated = v.rotate(&f.basis).unwrap();
            assert!(
                close(&rotated, &f.basis.rotate(&dense).unwrap()),
                "rotation"
            );
            let w = Tensor::rand(0.1f32, 2.0, (d_out, d_in), &Device::Cpu).unwrap();
            let got = apply_in_basis_factored(&f.basis, &w, &v).unwrap();
            let want = apply_in_basis(&f.basis, &w, &dense).unwrap();
            assert!(close(&got, &want), "primitive");
        }
    }

    #[test]
    fn long_vectors_are_rotated_densely_and_mismatches_are_refused() {
        let f = random_factors("l", (2, 7, 3, 4), None);
        let v = factors(2, 50, 4, 3);
        assert!(!v.rotation_is_cheaper().unwrap());
        let w = Tensor::ones((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let got = apply_in_basis_factored(&f.basis, &w, &v).unwrap();
        let want = v.dense().unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-4);
        let wrong = factors(2, 3, 3, 4);
        assert!(wrong.rotate(&f.basis).is_err());
        let bad = TokenFactors::new(
            Tensor::zeros((2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((2, 4, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(bad.is_err());
    }
}
