//! Owns completing prompt-only queries with the final model before the `query` stage.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no sibling.
//!
//! Generated queries: prompt-only queries (`[data.query] shape = "prompt"`) are
//! completed by the final fine-tuned model, greedily by default (`[query]`), and the query
//! becomes prompt + the generated tokens with the loss on the generated tokens only, so the
//! measurement is f = −log p(completion | prompt) of exactly what the model said. The
//! generated token ids are used as they are (never re-tokenised from the decoded text).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::QueryConfig;
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::model::{GenerateOptions, Model, Sampling};

/// The end-of-sequence token ids of a checkpoint: `eos_token_id` (a number or a list) of its
/// `generation_config.json`, else of its `config.json`. Empty when neither names one.
pub fn eos_tokens(checkpoint: &Path) -> Result<Vec<u32>> {
    for name in ["generation_config.json", "config.json"] {
        let path = checkpoint.join(name);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path).ctx("reading", &path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: not JSON: {e}", path.display())))?;
        let ids: Vec<u32> = match &v["eos_token_id"] {
            serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32).into_iter().collect(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => Vec::new(),
        };
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(Vec::new())
}

/// Generation settings from `[query]` (`seed` defaulting to `run_seed`) with stop tokens
/// `eos` when `stop_at_eos`.
pub fn generate_options(q: &QueryConfig, run_seed: u64, eos: &[u32]) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: q.max_new_tokens,
        stop_tokens: if q.stop_at_eos {
            eos.to_vec()
        } else {
            Vec::new()
        },
        sampling: if q.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                seed: q.seed.unwrap_or(run_seed),
                temperature: q.temperature,
                top_p: q.top_p,
            }
        },
    }
}

/// The length of the shortest prefix of `tokens` whose decoded text contains one of `stop`
/// (all of `tokens` when none does). Generation is causal, so cutting a completion there
/// gives what stopping at that token would have given.
pub fn stop_length(tokenizer: &Tokenizer, tokens: &[u32], stop: &[String]) -> Result<usize> {
    if stop.is_empty() {
        return Ok(tokens.len());
    }
    for n in 1..=tokens.len() {
        let text = tokenizer
            .decode(&tokens[..n], false)
            .map_err(|e| Error::Model(format!("decoding a completion: {e}")))?;
        if stop.iter().any(|s| text.contains(s.as_str())) {
            return Ok(n);
        }
    }
    Ok(tokens.len())
}

/// Completes every prompt-only query with `model`: input = prompt tokens + generated tokens,
/// loss mask on the generated tokens, `completion` = their decoded text, cut after the first
/// token that completes a stop string of `stop` ([`stop_length`]). Sampled queries draw
/// from the stream `seed + query index`, so each query's completion does not depend on the
/// others. `token_budget`: a completed query must fit one batch.
pub fn complete_queries(
    model: &Model,
    tokenizer: &Tokenizer,
    queries: &[PreparedDoc],
    opts: &GenerateOptions,
    stop: &[String],
    token_budget: usize,
) -> Result<Vec<PreparedDoc>> {
    let pb = crate::util::progress::bar(queries.len() as u64, "generating completions");
    let mut out = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        if q.truncated_tokens > 0 {
            return Err(Error::Pipeline(format!(
                "{}: the prompt of query `{}` was truncated by {} tokens; the model would \
                 complete a cut prompt. Raise `data.query.max_length` or shorten the prompt",
                q.source, q.doc_id, q.truncated_tokens
            )));
        }
        if q.n_tokens() + opts.max_new_tokens > token_budget {
            return Err(Error::Pipeline(format!(
                "{}: query `{}` has {} prompt tokens; with query.max_new_tokens = {} it may not \
                 fit batching.token_budget = {token_budget}. Lower max_new_tokens or raise the \
                 budget",
                q.source,
                q.doc_id,
                q.n_tokens(),
                opts.max_new_tokens
            )));
        }
        let mut o = opts.clone();
        if let Sampling::Sample { seed, .. } = &mut o.sampling {
            *seed = seed.wrapping_add(i as u64);
        }
        let mut g = model.generate(&q.input_ids, &o)?;
        let n = stop_length(tokenizer, &g.tokens, stop)?;
        g.tokens.truncate(n);
        let completion = tokenizer
            .decode(&g.tokens, false)
            .map_err(|e| Error::Model(format!("decoding the completion of `{}`: {e}", q.doc_id)))?;
        let mut doc = q.clone();
        doc.text = format!("{}{completion}", q.text);
        doc.completion = Some(completion);
        doc.input_ids.extend(&g.tokens);
        doc.loss_mask
            .extend(std::iter::repeat_n(1u8, g.tokens.len()));
        out.push(doc);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(out)
}
