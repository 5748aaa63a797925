//! Owns `[eval]`: `EvalConfig`, the settings of the `eval-recall` and `eval-lds` stages.
//! Layer: ground — may import error, util and, in this folder, attribution.rs.
//!
//! `[eval]`: the attribution-quality evaluation stages `eval-recall` and `eval-lds`.
//!
//! ```toml
//! [eval]
//! methods = ["source", "influence", "gradient_dot"]   # compared side by side; also
//!                                # "influence+refined" (the inverse refined, §9)
//! k = [1, 5, 10]                 # recall@k
//! known_sources_column = "known_sources"   # query column listing each query's source documents
//! fact_spans_column = "fact_spans"         # query column: where each source states the fact
//! subsets = 64                   # M: random fine-tuning subsets retrained for the LDS
//! alpha = 0.5                    # α: fraction of the fine-tuning set in each subset
//! seeds = 1                      # R: training seeds per subset
//! bootstrap = 1000               # bootstrap resamples of the subsets for the 95% interval
//! # subset_seed = 1              # seed of the subset draws (default: run.seed)
//! ```

use serde::{Deserialize, Serialize};

use super::attribution::MethodKind;

/// A method the evaluations compare: an attribution method, and for the influence function
/// whether its inverse is refined with exact Gauss–Newton products (`"influence+refined"`,
/// with the run's `[attribution] refine` settings or their defaults). Written as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalMethod {
    /// The attribution method.
    pub kind: MethodKind,
    /// Refined inverse (influence only).
    pub refined: bool,
}

/// The names `[eval] methods` accepts, for error messages.
const METHODS_ALLOWED: &str = "\"source\", \"influence\", \"influence+refined\", \"gradient_dot\"";

impl EvalMethod {
    /// The plain method.
    pub fn plain(kind: MethodKind) -> EvalMethod {
        EvalMethod {
            kind,
            refined: false,
        }
    }

    /// The name as configs and evaluation tables spell it.
    pub fn name(&self) -> String {
        let base = match self.kind {
            MethodKind::Source => "source",
            MethodKind::Influence => "influence",
            MethodKind::GradientDot => "gradient_dot",
        };
        if self.refined {
            format!("{base}+refined")
        } else {
            base.to_string()
        }
    }

    /// Parses a name ([`EvalMethod::name`]'s spelling).
    pub fn parse(s: &str) -> Result<EvalMethod, String> {
        let (base, refined) = match s.strip_suffix("+refined") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let kind = match base {
            "source" => MethodKind::Source,
            "influence" => MethodKind::Influence,
            "gradient_dot" => MethodKind::GradientDot,
            _ => return Err(format!("`{s}` is not a method; allowed: {METHODS_ALLOWED}")),
        };
        if refined && kind != MethodKind::Influence {
            return Err(format!(
                "`{s}`: only the influence function's inverse is refined; allowed: \
                 {METHODS_ALLOWED}"
            ));
        }
        Ok(EvalMethod { kind, refined })
    }
}

impl Serialize for EvalMethod {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for EvalMethod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EvalMethod::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Methods compared side by side. Default: source, influence, gradient_dot.
    #[serde(default = "default_methods")]
    pub methods: Vec<EvalMethod>,
    /// The k of recall@k. Default [1, 5, 10].
    #[serde(default = "default_k")]
    pub k: Vec<usize>,
    /// The query data set's column listing each query's known source document ids (a JSON
    /// array of strings, or one string with ids separated by commas). Default
    /// `known_sources`.
    #[serde(default = "default_known_sources_column")]
    pub known_sources_column: String,
    /// The query data set's column giving, per known source document, the character spans
    /// `[start, end)` of its text that state the query's fact (a JSON object
    /// `{"doc-7": [[12, 23]]}`; in CSV/Parquet a string holding it), for token-span recall.
    /// Default (None): `fact_spans`; left out of resolved configs then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fact_spans_column: Option<String>,
    /// M, the number of random subsets of the fine-tuning set. Default 64.
    #[serde(default = "default_subsets")]
    pub subsets: usize,
    /// α, the fraction of the fine-tuning set in each subset, in (0, 1). Default 0.5.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// R, the training seeds per subset. Default 1.
    #[serde(default = "default_seeds")]
    pub seeds: usize,
    /// Bootstrap resamples (of the subsets) for the LDS 95% interval. Default 1000.
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
    /// Seed of the random subsets' draws: another seed gives M other subsets (to check an
    /// LDS on a second draw) with the same fine-tune and factors. Default: `run.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset_seed: Option<u64>,
}

fn default_methods() -> Vec<EvalMethod> {
    [
        MethodKind::Source,
        MethodKind::Influence,
        MethodKind::GradientDot,
    ]
    .map(EvalMethod::plain)
    .to_vec()
}
fn default_k() -> Vec<usize> {
    vec![1, 5, 10]
}
fn default_known_sources_column() -> String {
    "known_sources".into()
}
fn default_subsets() -> usize {
    64
}
fn default_alpha() -> f64 {
    0.5
}
fn default_seeds() -> usize {
    1
}
fn default_bootstrap() -> usize {
    1000
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            methods: default_methods(),
            k: default_k(),
            known_sources_column: default_known_sources_column(),
            fact_spans_column: None,
            subsets: default_subsets(),
            alpha: default_alpha(),
            seeds: default_seeds(),
            bootstrap: default_bootstrap(),
            subset_seed: None,
        }
    }
}

impl EvalConfig {
    /// The query column giving the fact spans: `fact_spans_column`, default `fact_spans`.
    pub fn fact_spans_column(&self) -> &str {
        self.fact_spans_column.as_deref().unwrap_or("fact_spans")
    }

    /// Range checks: (key, message) of the first problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        let k = |s: &str| format!("eval.{s}");
        if self.methods.is_empty() {
            return Err((
                k("methods"),
                format!("is empty; allowed: one or more of {METHODS_ALLOWED}"),
            ));
        }
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].contains(m) {
                return Err((
                    k("methods"),
                    format!("lists \"{}\" twice; name each method once", m.name()),
                ));
            }
        }
        if self.k.is_empty() || self.k.contains(&0) {
            return Err((
                k("k"),
                format!(
                    "{:?} is invalid; allowed: a non-empty list of integers ≥ 1",
                    self.k
                ),
            ));
        }
        if self.known_sources_column.trim().is_empty() {
            return Err((
                k("known_sources_column"),
                "is empty; allowed: the name of the query column listing source ids".into(),
            ));
        }
        if self
            .fact_spans_column
            .as_ref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err((
                k("fact_spans_column"),
                "is empty; allowed: the name of the query column giving the fact spans".into(),
            ));
        }
        if self.subsets < 3 {
            return Err((
                k("subsets"),
                format!(
                    "{} is too few; allowed: 3 or more (a rank correlation needs several \
                     subsets; 64 is typical)",
                    self.subsets
                ),
            ));
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err((
                k("alpha"),
                format!("{} is invalid; allowed: a fraction in (0, 1)", self.alpha),
            ));
        }
        if self.seeds == 0 {
            return Err((k("seeds"), "is 0; allowed: 1 or more".into()));
        }
        if self.bootstrap < 10 {
            return Err((
                k("bootstrap"),
                format!("{} is too few; allowed: 10 or more", self.bootstrap),
            ));
        }
        Ok(())
    }
}
