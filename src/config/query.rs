//! Owns `[query]`: `QueryConfig`, how the `query` stage completes prompt-only queries.
//! Layer: ground — may import error and util; no sibling.
//!
//! `[query]`: how the `query` stage completes prompt-only queries (`[data.query] shape =
//! "prompt"`) with the final fine-tuned model before measuring f = −log p(completion | prompt)
//! on the generated completion (docs/design.md §2).
//!
//! ```toml
//! [query]
//! max_new_tokens = 32      # at most this many generated tokens per query
//! temperature = 0.0        # 0: greedy (default); > 0: sampled, seeded by `seed`
//! # top_p = 0.9            # nucleus sampling (with temperature > 0)
//! # seed = 0               # default: run.seed
//! stop_at_eos = true       # end a completion at the model's end-of-sequence token
//! stop = ["."]             # end a completion at the first token that completes one of these
//! ```

use serde::{Deserialize, Serialize};

/// `[query]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Generated tokens per prompt at most. Default 32.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 for greedy decoding (default), > 0 to sample from softmax(logits / temperature).
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass in (0, 1] when sampling. Default: the full distribution.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Seed of the sampled completions. Default: `run.seed`.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop a completion after the model's end-of-sequence token (kept in the completion).
    /// Default true.
    #[serde(default = "default_true")]
    pub stop_at_eos: bool,
    /// Stop strings: a completion ends with the first generated token whose decoded text
    /// completes one of them (the token is kept, as with `stop_at_eos`). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

fn default_max_new_tokens() -> usize {
    32
}
fn default_true() -> bool {
    true
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop_at_eos: true,
            stop: Vec::new(),
        }
    }
}

impl QueryConfig {
    /// Range checks: (key, message) of the first problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        let k = |s: &str| format!("query.{s}");
        if !(1..=4096).contains(&self.max_new_tokens) {
            return Err((
                k("max_new_tokens"),
                format!(
                    "{} is out of range; allowed: 1 ..= 4096",
                    self.max_new_tokens
                ),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err((
                k("temperature"),
                format!(
                    "{} is invalid; allowed: 0 (greedy) or a number > 0",
                    self.temperature
                ),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err((k("top_p"), format!("{p} is invalid; allowed: (0, 1]")));
            }
            if self.temperature == 0.0 {
                return Err((
                    k("top_p"),
                    "applies to sampling, but temperature is 0 (greedy); set temperature > 0 \
                     or remove top_p"
                        .into(),
                ));
            }
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err((
                k(&format!("stop[{i}]")),
                "is empty; a stop string needs at least one character (remove it to stop \
                 only at max_new_tokens or end of sequence)"
                    .into(),
            ));
        }
        Ok(())
    }
}
