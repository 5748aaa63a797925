//! Owns text generation: `Model::generate`, `GenerateOptions`, `Sampling`, `Generation`.
//! Layer: model — may import the ground, linalg, backend and, in this folder, kv_cache.rs, lm.rs.
//!
//! Text generation for the query stage: greedy or seeded sampling with a KV cache, a token
//! budget and stop tokens. Sampling uses candle-transformers' `LogitsProcessor`.

use candle_core::{IndexOp, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CtSampling};

use crate::error::{Error, Result};

use super::kv_cache::KvCache;
use super::lm::Model;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// argmax of the logits.
    Greedy,
    /// A draw from softmax(logits / temperature), optionally restricted to the smallest set
    /// of tokens with probability ≥ top_p; reproducible for a seed.
    Sample {
        /// Seed of the draws.
        seed: u64,
        /// Temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1], or None for the full distribution.
        top_p: Option<f64>,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Generation ends after emitting any of these (the stop token is kept in the output).
    pub stop_tokens: Vec<u32>,
    /// Token choice.
    pub sampling: Sampling,
}

/// A completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens (without the prompt).
    pub tokens: Vec<u32>,
    /// True when a stop token ended generation, false when the budget did.
    pub stopped: bool,
}

impl Model {
    /// Continues `prompt` (≥ 1 token). The prompt is run once; every new token is one
    /// cached step.
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::Model(
                "generation needs a prompt of at least one token".into(),
            ));
        }
        let mut proc = match opts.sampling {
            Sampling::Greedy => LogitsProcessor::from_sampling(0, CtSampling::ArgMax),
            Sampling::Sample {
                seed,
                temperature,
                top_p,
            } => {
                if temperature.is_nan() || temperature <= 0.0 {
                    return Err(Error::Model(format!(
                        "sampling temperature must be > 0, got {temperature}"
                    )));
                }
                let s = match top_p {
                    Some(p) => CtSampling::TopP { p, temperature },
                    None => CtSampling::All { temperature },
                };
                LogitsProcessor::from_sampling(seed, s)
            }
        };
        let mut cache = KvCache::default();
        let mut out = Vec::new();
        let mut input = Tensor::new(prompt, self.device())?.unsqueeze(0)?;
        for _ in 0..opts.max_new_tokens {
            let logits = self.forward_inner(&input, None, Some(&mut cache))?;
            let last = logits.i((0, logits.dim(1)? - 1))?.detach();
            let next = proc.sample(&last)?;
            out.push(next);
            if opts.stop_tokens.contains(&next) {
                return Ok(Generation {
                    tokens: out,
                    stopped: true,
                });
            }
            input = Tensor::new(&[next], self.device())?.unsqueeze(0)?;
        }
        Ok(Generation {
            tokens: out,
            stopped: false,
        })
    }
}
