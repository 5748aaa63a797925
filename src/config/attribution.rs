//! Owns `[attribution]`: `AttributionConfig` and its kinds (method, Fisher, Adam response, eigh).
//! Layer: ground — may import error and util; no sibling.
//!
//! `[attribution]`: how the `fit`, `query` and `score` stages attribute (docs/design.md §2–3).
//!
//! ```toml
//! [attribution]
//! method = "source"        # source | influence | gradient_dot
//! fisher = "true"          # true (sampled labels) | empirical (the data's labels)
//! # damping = 1e-3         # absolute λ; default: damping_factor × mean(Λ) per layer
//! top_k = 10               # documents per query kept with per-token scores
//! # keep_top_bottom = 100   # scores dataset: each query's 100 highest- and 100 lowest-τ rows
//! # query_rank = 8          # low-rank preconditioned query (default: exact)
//! # factor_cache = "cache"  # reuse fitted factors across runs (default: none)
//! # eigendecomposition = "f32"  # factor eigendecompositions in f32 (default: f64)
//! # adam_response = "full"  # AdamW segments: full (P_eff, needs m̂) | fixed_v (P)
//! # refine = { method = "cg", iterations = 30, documents = 1024, tolerance = 1e-2 }
//! # generated = { enabled = true, top_k = 5, detail_docs = 3, detail_budget = 200000 }
//! # candidates = { per_query = 100, dims = 4096, seed = 0 }  # score the `index` stage's candidates
//! ```

use serde::{Deserialize, Serialize};

/// The attribution method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    /// Source: the trajectory's segments, F_r and F_S per segment.
    #[default]
    Source,
    /// The EK-FAC influence function at the final model (one segment, s → ∞, damped).
    Influence,
    /// The gradient dot product at the final model.
    GradientDot,
}

/// Which Fisher the EK-FAC factors estimate. Written `true` (the TOML boolean, as
/// configs/README.md's table shows it), `"true"` or `"empirical"`; resolved configs write the
/// string form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FisherKind {
    /// Labels sampled from the model's predictive distribution (seeded by `run.seed`).
    #[default]
    True,
    /// The data's own labels (deterministic; what kronfluence's reference pack uses).
    Empirical,
}

/// The spellings `[attribution] fisher` accepts, for error messages.
const FISHER_ALLOWED: &str = "true, \"true\" (labels sampled from the model) or \"empirical\" \
                              (the data's labels)";

impl<'de> Deserialize<'de> for FisherKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FisherKind;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "one of {FISHER_ALLOWED}")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<FisherKind, E> {
                if v {
                    Ok(FisherKind::True)
                } else {
                    Err(E::custom(format!(
                        "`false` is not a Fisher; allowed: {FISHER_ALLOWED}"
                    )))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FisherKind, E> {
                match v {
                    "true" => Ok(FisherKind::True),
                    "empirical" => Ok(FisherKind::Empirical),
                    _ => Err(E::custom(format!(
                        "`{v}` is not a Fisher; allowed: {FISHER_ALLOWED}"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// How Source's Adam variant models an AdamW step's response to a perturbation δg of the
/// gradients (see [`crate::attribution::adam`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdamResponse {
    /// v̂ held fixed: δu = P δg with P = diag(1/(√v̂ + ε)).
    FixedV,
    /// m̂ and v̂ both respond (δg the same over a segment's steps): δu = P_eff δg with
    /// P_eff = P ⊙ clamp(1 − m̂²/(√v̂ (√v̂ + ε)), 0, 1). Needs m̂ (`exp_avg.NAME`) at the
    /// checkpoints; a segment whose checkpoints lack it falls back to `fixed_v`. The
    /// default: on the demo's short fine-tune its LDS is above `fixed_v`'s by 0.16 on
    /// subsets not looked at when it was chosen, and within 0.01 below on the full demo
    /// (docs/evaluation.md).
    #[default]
    Full,
}

/// `[attribution]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionConfig {
    /// `source`, `influence` or `gradient_dot`. Default `source`.
    #[serde(default)]
    pub method: MethodKind,
    /// `true` or `empirical`. Default `true`.
    #[serde(default)]
    pub fisher: FisherKind,
    /// Absolute damping λ of the inverse (influence, converged segments). Default: none,
    /// use `damping_factor` × mean(Λ) per layer.
    #[serde(default)]
    pub damping: Option<f64>,
    /// The factor of the per-layer damping heuristic. Default 0.1.
    #[serde(default = "default_damping_factor")]
    pub damping_factor: f64,
    /// Split factors into diagonal blocks of this size (for very wide layers). Default: whole.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Documents per query whose per-token scores are written. Default 10.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Write per-token scores for every document (large). Default false.
    #[serde(default)]
    pub all_token_scores: bool,
    /// Keep only each query's K highest-τ and K lowest-τ documents (the strongest proponents
    /// and opponents) in the scores dataset, chosen with bounded heaps (memory O(queries × K));
    /// ranks stay those among all documents. Unrelated to `top_k`, which picks the documents
    /// that get per-token scores. Default: none, every document. Left out of resolved configs
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_top_bottom: Option<usize>,
    /// Refuse to start a stage whose estimated peak memory exceeds this many GiB; `score`
    /// also sizes its factor layer groups to fit under it. Default: no limit (groups sized
    /// to half the available memory).
    #[serde(default)]
    pub memory_limit_gib: Option<f64>,
    /// Rank r of the low-rank form of the preconditioned query u_ℓ (truncated SVD per query
    /// and layer, U ≈ Σ_k σ_k p_k r_kᵀ). Default: none, the exact dense query.
    #[serde(default)]
    pub query_rank: Option<usize>,
    /// The linear layers attributed through: Hugging Face module names with `*` wildcards
    /// (e.g. `["model.layers.*.mlp.*"]`), each of which must match a linear layer of the
    /// model. Default: every linear layer of the transformer blocks. Left out of resolved
    /// configs when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<String>>,
    /// On a LoRA fine-tune: `adapter` attributes over the adapter matrices (layers named
    /// `base_model.model.MODULE.lora_A` / `.lora_B`, what `layers` patterns then match),
    /// `base` over the frozen linear layers they wrap. Default `adapter`.
    #[serde(default, skip_serializing_if = "super::LoraTrack::is_default")]
    pub lora_layers: super::LoraTrack,
    /// Folder of a content-addressed cache of fitted factors shared between runs (relative to
    /// the config file). Default: none, always fit.
    #[serde(default)]
    pub factor_cache: Option<std::path::PathBuf>,
    /// Arithmetic of the factor eigendecompositions on the CPU: `f64` (the reference,
    /// kronfluence's default) or `f32` (about twice as fast; EK-FAC keeps only the bases,
    /// whose eigenvalues the correction Λ re-estimates). Default `f64`.
    #[serde(default, skip_serializing_if = "EigenPrecision::is_default")]
    pub eigendecomposition: EigenPrecision,
    /// AdamW segments' preconditioner: `fixed_v` (P) or `full` (P_eff). Default `full`.
    /// Always written to resolved configs, so that a run directory whose resolved config
    /// lacks the key (made by a version whose default was `fixed_v`) is refused as changed on
    /// resume instead of keeping scores of the other form.
    #[serde(default)]
    pub adam_response: AdamResponse,
    /// Refine the influence function's damped inverse (H̄ + λ)⁻¹ v by conjugate gradients
    /// with exact Gauss–Newton products, EK-FAC as the preconditioner (docs/design.md §9).
    /// Default: none (the EK-FAC answer). Left out of resolved configs when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<RefineConfig>,
    /// Per-generated-token attribution of prompt-only queries (`[attribution.generated]`).
    /// Left out of resolved configs when default, so that runs made before it keep their
    /// `score` records.
    #[serde(default, skip_serializing_if = "GeneratedConfig::is_default")]
    pub generated: GeneratedConfig,
    /// Score only candidate documents found in the `index` stage's sketches
    /// (`[attribution.candidates]`). Default: none, every document. Left out of resolved
    /// configs when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<CandidatesConfig>,
}

/// `[attribution.candidates]` (or `candidates = { … }` inline): the `index` stage sketches each
/// document's gradient at every scoring model to `dims` numbers (a count sketch of every
/// tracked layer's gradient, hashed with `seed`); `score` then ranks every document by the
/// sketched score and scores exactly only each query's `per_query` highest and `per_query`
/// lowest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidatesConfig {
    /// Candidates per query at each end of the sketched ranking (proponents and opponents).
    /// Default 100.
    #[serde(default = "default_candidates_per_query")]
    pub per_query: usize,
    /// D, the sketched numbers per document and scoring model: the sketched score's standard
    /// deviation is about ‖u‖‖g‖/√D. Default 4096.
    #[serde(default = "default_candidates_dims")]
    pub dims: usize,
    /// Seed of the hashes and signs (the same index on every machine). Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_candidates_per_query() -> usize {
    100
}
fn default_candidates_dims() -> usize {
    4096
}

impl Default for CandidatesConfig {
    fn default() -> Self {
        CandidatesConfig {
            per_query: default_candidates_per_query(),
            dims: default_candidates_dims(),
            seed: 0,
        }
    }
}

/// `[attribution.generated]` (or `generated = { … }` inline): attribution of each generated
/// token of prompt-only queries (`[data.query] shape = "prompt"`) on its own, f_j =
/// −log p(y_j | prompt, y_<j), beside the whole completion's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedConfig {
    /// Attribute each generated token (one backward pass per token in `query`, one more
    /// scoring pass over the training data in `score`). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Documents per generated token in `score/gen_scores.parquet` (0: all). Default 5.
    #[serde(default = "default_gen_top_k")]
    pub top_k: usize,
    /// Of those, the top documents of each generated token whose per-token scores are
    /// written to `score/gen_token_scores.parquet`. Default 3.
    #[serde(default = "default_gen_detail_docs")]
    pub detail_docs: usize,
    /// At most this many rows (training tokens) in `gen_token_scores.parquet`; generated
    /// tokens are taken first tokens first (every query's token 0, then every query's token
    /// 1, …) while their documents fit. Default 200000 (≈ 4 MB of Parquet).
    #[serde(default = "default_gen_detail_budget")]
    pub detail_budget: usize,
}

fn default_true() -> bool {
    true
}
fn default_gen_top_k() -> usize {
    5
}
fn default_gen_detail_docs() -> usize {
    3
}
fn default_gen_detail_budget() -> usize {
    200_000
}

impl Default for GeneratedConfig {
    fn default() -> Self {
        GeneratedConfig {
            enabled: true,
            top_k: default_gen_top_k(),
            detail_docs: default_gen_detail_docs(),
            detail_budget: default_gen_detail_budget(),
        }
    }
}

impl GeneratedConfig {
    /// Whether every key has its default (then it is left out of resolved configs).
    pub fn is_default(&self) -> bool {
        *self == GeneratedConfig::default()
    }
}

/// The iteration that refines a preconditioned query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RefineMethod {
    /// Conjugate gradients on (G + λ) x = v preconditioned by (H̄ + λ)⁻¹, from x₀ = (H̄ + λ)⁻¹ v.
    #[default]
    Cg,
}

/// `[attribution.refine]` (or `refine = { … }` inline).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefineConfig {
    /// `cg`. Default `cg`.
    #[serde(default)]
    pub method: RefineMethod,
    /// At most this many Gauss–Newton products per query (0: the EK-FAC answer). Default 30:
    /// on the demo's 16-step fine-tune it takes EK-FAC's relative residual from ≈ 500 to ≈ 1.5
    /// (docs/evaluation.md).
    #[serde(default = "default_refine_iterations")]
    pub iterations: usize,
    /// Fine-tuning documents in G's sample, drawn with `run.seed` (all when fewer). Default
    /// 1024.
    #[serde(default = "default_refine_documents")]
    pub documents: usize,
    /// Stop a query once ‖v − (G + λ) x‖ / ‖v‖ is at most this. Default 1e-2.
    #[serde(default = "default_refine_tolerance")]
    pub tolerance: f64,
}

fn default_refine_iterations() -> usize {
    30
}
fn default_refine_documents() -> usize {
    1024
}
fn default_refine_tolerance() -> f64 {
    1e-2
}

impl Default for RefineConfig {
    fn default() -> Self {
        RefineConfig {
            method: RefineMethod::default(),
            iterations: default_refine_iterations(),
            documents: default_refine_documents(),
            tolerance: default_refine_tolerance(),
        }
    }
}

fn default_damping_factor() -> f64 {
    0.1
}
fn default_top_k() -> usize {
    10
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            method: MethodKind::default(),
            fisher: FisherKind::default(),
            damping: None,
            damping_factor: default_damping_factor(),
            block_size: None,
            top_k: default_top_k(),
            all_token_scores: false,
            keep_top_bottom: None,
            lora_layers: super::LoraTrack::default(),
            memory_limit_gib: None,
            query_rank: None,
            layers: None,
            factor_cache: None,
            eigendecomposition: EigenPrecision::F64,
            adam_response: AdamResponse::default(),
            refine: None,
            generated: GeneratedConfig::default(),
            candidates: None,
        }
    }
}

impl AttributionConfig {
    /// What the `score` stage warns when `top_k` is more than the `n_docs` documents scored per
    /// query (only then known): every document's per-token scores are written.
    pub fn top_k_note(&self, n_docs: usize) -> Option<String> {
        (!self.all_token_scores && self.top_k > n_docs).then(|| {
            format!(
                "key `attribution.top_k` = {} is more than the {n_docs} documents scored per \
                 query, so per-token scores are written for all {n_docs}; set top_k to at most \
                 {n_docs} (or 0: all documents) to silence this",
                self.top_k
            )
        })
    }

    /// Range checks: (key, message) of the first problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        let k = |s: &str| format!("attribution.{s}");
        if let Some(d) = self.damping {
            if !(d.is_finite() && d >= 0.0) {
                return Err((
                    k("damping"),
                    format!("{d} is invalid; allowed: a number ≥ 0"),
                ));
            }
        }
        if !(self.damping_factor.is_finite() && self.damping_factor > 0.0) {
            return Err((
                k("damping_factor"),
                format!("{} is invalid; allowed: a number > 0", self.damping_factor),
            ));
        }
        if self.block_size == Some(0) {
            return Err((
                k("block_size"),
                "is 0; allowed: 1 or more (remove it for whole factors)".into(),
            ));
        }
        if self.keep_top_bottom == Some(0) {
            return Err((
                k("keep_top_bottom"),
                "is 0; allowed: 1 or more documents kept at each end of every query's ranking \
                 (remove the key to keep every document)"
                    .into(),
            ));
        }
        if self.query_rank == Some(0) {
            return Err((
                k("query_rank"),
                "is 0; allowed: 1 or more (remove it for the exact query)".into(),
            ));
        }
        if let Some(r) = &self.refine {
            if r.documents == 0 {
                return Err((
                    k("refine.documents"),
                    "is 0; allowed: 1 or more (the size of Gauss–Newton's document sample)".into(),
                ));
            }
            if !(r.tolerance.is_finite() && r.tolerance >= 0.0) {
                return Err((
                    k("refine.tolerance"),
                    format!("{} is invalid; allowed: a number ≥ 0", r.tolerance),
                ));
            }
        }
        let g = &self.generated;
        if g.top_k > 0 && g.detail_docs > g.top_k {
            return Err((
                k("generated.detail_docs"),
                format!(
                    "{} is more than attribution.generated.top_k = {}; allowed: 0 ..= top_k \
                     (the documents with per-token scores are among the top_k listed)",
                    g.detail_docs, g.top_k
                ),
            ));
        }
        if g.detail_docs > 0 && g.detail_budget == 0 {
            return Err((
                k("generated.detail_budget"),
                "is 0 while attribution.generated.detail_docs > 0; allowed: 1 or more rows \
                 (or set detail_docs = 0 for no per-token scores)"
                    .into(),
            ));
        }
        if let Some(l) = &self.layers {
            if l.is_empty() || l.iter().any(|p| p.trim().is_empty()) {
                return Err((
                    k("layers"),
                    "is empty or holds an empty pattern; allowed: module-name patterns with \
                     `*` wildcards, e.g. [\"model.layers.*.mlp.*\"] (or leave the key out for \
                     every linear layer of the blocks)"
                        .into(),
                ));
            }
        }
        if let Some(c) = &self.candidates {
            if c.per_query == 0 {
                return Err((
                    k("candidates.per_query"),
                    "is 0; allowed: 1 or more documents per query at each end of the sketched \
                     ranking (remove `candidates` to score every document)"
                        .into(),
                ));
            }
            if c.dims == 0 {
                return Err((
                    k("candidates.dims"),
                    "is 0; allowed: 1 or more sketched numbers per document (default 4096)".into(),
                ));
            }
        }
        if let Some(m) = self.memory_limit_gib {
            if !(m.is_finite() && m > 0.0) {
                return Err((
                    k("memory_limit_gib"),
                    format!("{m} is invalid; allowed: > 0"),
                ));
            }
        }
        Ok(())
    }
}

/// The arithmetic of the factor eigendecompositions A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ
/// (`[attribution] eigendecomposition`).
///
/// EK-FAC uses only the bases Q (stored in f32 either way): the eigenvalues are re-estimated
/// in the basis by the eigenvalue correction Λ (docs/design.md §3.3). An f32 decomposition gives a
/// basis orthonormal to ~1e-5 that diagonalises the f64 covariance to a relative off-diagonal
/// mass of ~1e-4 (measured on 1536² covariances), in about half the time on the CPU, whose
/// tridiagonalisation is bound by memory traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EigenPrecision {
    /// f64 (kronfluence's default): the reference.
    #[default]
    F64,
    /// f32, on the CPU (the CUDA backend's cuSOLVER decomposition stays in f64).
    F32,
}

impl EigenPrecision {
    /// Whether this is the default (`f64`), so the key is left out of resolved configs and
    /// the factor cache keys of existing runs do not change.
    pub fn is_default(&self) -> bool {
        *self == EigenPrecision::F64
    }

    /// The name as written in configs.
    pub fn name(&self) -> &'static str {
        match self {
            EigenPrecision::F64 => "f64",
            EigenPrecision::F32 => "f32",
        }
    }
}
