//! The [`Backend`] contract: the device-specific operations of the fit and score passes.
//! Layer: backend — may import only the ground floor and linalg.

use candle_core::{Device, Tensor};

use crate::config::EigenPrecision;
use crate::error::Result;
use crate::linalg::{
    apply_in_basis, Eigen, EigenBasis, FactorSum, LambdaSums, LayerQuery, TokenFactors,
};

/// The device-specific operations of the fit and score passes. Tensors in and out are candle
/// tensors on [`Backend::device`] (or the CPU); the results are the same math on every backend
/// within the tolerances of the GPU parity tests (tests/it/cuda_parity.rs).
pub trait Backend {
    /// `cpu` or `cuda` (for logs and stage summaries).
    fn name(&self) -> &'static str;

    /// The candle device the model runs on (forward and backward of every pass).
    fn device(&self) -> &Device;

    /// Adds one batch's covariance terms: for each (sum, x) of `terms`, x [B, T, d] a
    /// captured input a or output gradient δ, Σ_{b,t} m_{b,t} x_{b,t} x_{b,t}ᵀ into every
    /// diagonal block of `sum` (m = `mask` [B, T], the attention mask; a capture's a and δ
    /// are zero where m is 0 already). Layers that share an input share one term.
    fn add_covariances(&self, terms: &mut [(&mut FactorSum, &Tensor)], mask: &Tensor)
        -> Result<()>;

    /// The symmetric eigendecompositions of `mats` (each (row-major data, n, what): λ
    /// ascending, `what` naming the layer and factor in errors; non-finite entries are
    /// rejected first) in the arithmetic `precision` where the backend offers it (else
    /// f64). Backends may run them side by side.
    fn eigh_many(
        &self,
        mats: &[(Vec<f64>, usize, String)],
        precision: EigenPrecision,
    ) -> Result<Vec<Eigen>>;

    /// Adds one batch's squared rotated per-document gradients of every tracked layer into
    /// `sums[l]`, in the fixed bases `bases[l]`: `layers[l]` = (a [B, T, d_in], δ [B, T,
    /// d_out]) of layer l (layers that share an input pass the same tensor a), `mask` [B, T]
    /// the attention mask; document b's tokens are the first `lengths[b]` positions.
    fn add_lambdas(
        &self,
        sums: &mut [LambdaSums],
        bases: &[EigenBasis],
        layers: &[(&Tensor, &Tensor)],
        mask: &Tensor,
        lengths: &[usize],
    ) -> Result<()>;

    /// The one eigenbasis primitive (docs/design.md §3.4): Q_S (W ⊙ (Q_Sᵀ V_q Q_A)) Q_Aᵀ for
    /// every vector V_q of `v` [Q, d_out, d_in] (f32), with weights W [d_out, d_in] (f32;
    /// `linalg::spectral_weights` or `linalg::preconditioned_weights`). Returns an f32 CPU
    /// tensor shaped like `v`. The default is the CPU form [`apply_in_basis`].
    fn apply_in_basis(&self, basis: &EigenBasis, weights: &Tensor, v: &Tensor) -> Result<Tensor> {
        apply_in_basis(basis, weights, v)
    }

    /// [`apply_in_basis`](Self::apply_in_basis) for V_q = Δ_qᵀ A_q given as token factors
    /// (`v`: Δ [Q, T, d_out], A [Q, T, d_in]). The default forms V and calls
    /// `apply_in_basis`; the CPU backend rotates the factors instead where that is cheaper
    /// (`linalg::apply_in_basis_factored`).
    fn apply_in_basis_factored(
        &self,
        basis: &EigenBasis,
        weights: &Tensor,
        v: &TokenFactors,
    ) -> Result<Tensor> {
        self.apply_in_basis(basis, weights, &v.dense()?)
    }

    /// Per-token scores s[q, b, t] = m_{b,t} δ_{b,t}ᵀ U_q a_{b,t} for a layer's query `u`
    /// (dense or low-rank), `a` [B, T, d_in], `delta` [B, T, d_out], `mask` [B, T]. Returns
    /// [Q, B, T] f32. The default contracts on the tensors' own device with candle ops
    /// ([`LayerQuery::token_scores`], the CPU reference); a GPU backend overrides it.
    fn token_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        u.token_scores(a, delta, mask)
    }

    /// Per-document scores s[q, b] = Σ_t m_{b,t} δ_{b,t}ᵀ U_q a_{b,t} = ⟨U_q, G_b⟩, for a
    /// pass that keeps no per-token scores. Returns [Q, B] f32. The default contracts on the
    /// tensors' own device with candle ops ([`LayerQuery::doc_scores`]).
    fn doc_scores(
        &self,
        u: &LayerQuery,
        a: &Tensor,
        delta: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        u.doc_scores(a, delta, mask)
    }

    /// Frees what the backend keeps between calls of one pass (queries uploaded to the GPU).
    fn release(&self) {}
}
