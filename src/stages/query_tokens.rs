//! Owns the `query` stage's per-generated-token outputs: `write_gen_tokens`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); sibling
//! `fetch`.
//!
//! For generated queries (`[data.query] shape = "prompt"`) with
//! `[attribution.generated] enabled`, the gradient of each generated token's
//! f_j = −log p(y_j | prompt, y_<j) ([`crate::attribution::gen_tokens`]) at the final model.
//! Writes `query/gen_gradients.safetensors` (one tensor [K, d_out, d_in] per layer, K the
//! generated tokens of all queries in query then token order) and `query/gen_tokens.parquet`
//! (query_id, gen_index, gen_token_id, gen_token_text, logprob), which the `score` stage
//! scores and copies.

use std::collections::HashMap;

use serde_json::json;

use crate::attribution::gen_token_gradients;
use crate::data::tokenize::load_tokenizer;
use crate::data::{generated_token_texts, PreparedDoc};
use crate::error::Result;
use crate::model::Model;
use crate::output::{write_table, Column};
use crate::passes::PassOptions;
use crate::pipeline::StageContext;

use super::fetch::Fetched;

/// The per-token gradients file's name in the query stage's folder.
pub const GEN_GRADIENTS: &str = "gen_gradients.safetensors";
/// The generated tokens' table in the query (and score) stage's folder.
pub const GEN_TOKENS: &str = "gen_tokens.parquet";

/// Computes and writes the per-token gradients and the token table of the completed
/// `queries` (the table with key-value `metadata`); returns the stage summary's part (tokens,
/// seconds per token).
pub fn write_gen_tokens(
    ctx: &StageContext,
    model: &Model,
    queries: &[PreparedDoc],
    opts: &PassOptions,
    metadata: &[(String, String)],
) -> Result<serde_json::Value> {
    let started = std::time::Instant::now();
    if queries.iter().all(|q| q.n_loss_tokens() == 0) {
        tracing::warn!("query: no query generated a token; nothing to attribute per token");
        return Ok(json!({"tokens": 0}));
    }
    if let Some(note) = too_large(ctx, model, queries) {
        tracing::warn!("{note}");
        return Ok(json!({"tokens": 0, "skipped": note}));
    }
    let g = gen_token_gradients(model, queries, opts)?;
    let seconds = started.elapsed().as_secs_f64();
    let entries: Vec<(String, candle_core::Tensor)> = model
        .tracked_layers()
        .iter()
        .map(|l| l.name.clone())
        .zip(g.layers.iter().cloned())
        .collect();
    let meta: HashMap<String, String> = [(
        "source_tda".to_string(),
        json!({"tokens": g.tokens.len()}).to_string(),
    )]
    .into();
    crate::util::tensors::save_tensors(&ctx.out(GEN_GRADIENTS), &entries, meta)?;

    let tokenizer = load_tokenizer(Fetched::load(ctx.run)?.tokenizer_path())?;
    let texts: Vec<Vec<String>> = queries
        .iter()
        .map(|q| {
            let ids: Vec<u32> = q
                .input_ids
                .iter()
                .zip(&q.loss_mask)
                .filter(|(_, &m)| m != 0)
                .map(|(&id, _)| id)
                .collect();
            generated_token_texts(&tokenizer, &ids)
        })
        .collect();
    let t = &g.tokens;
    write_table(
        &ctx.out(GEN_TOKENS),
        &[
            (
                "query_id",
                Column::Str(t.iter().map(|t| queries[t.query].doc_id.clone()).collect()),
            ),
            (
                "gen_index",
                Column::U32(t.iter().map(|t| t.gen_index as u32).collect()),
            ),
            (
                "position",
                Column::U32(t.iter().map(|t| t.position as u32).collect()),
            ),
            (
                "gen_token_id",
                Column::U32(t.iter().map(|t| t.token_id).collect()),
            ),
            (
                "gen_token_text",
                Column::Str(
                    t.iter()
                        .map(|t| texts[t.query][t.gen_index].clone())
                        .collect(),
                ),
            ),
            (
                "logprob",
                Column::F64(g.logprobs.iter().map(|&l| l as f64).collect()),
            ),
        ],
        metadata,
    )?;
    tracing::info!(
        "query: gradients of {} generated tokens in {:.1} s ({:.3} s per token)",
        t.len(),
        seconds,
        seconds / t.len() as f64
    );
    Ok(json!({"tokens": t.len(), "seconds": seconds,
              "seconds_per_token": seconds / t.len() as f64}))
}

/// Why the generated tokens' dense gradients (K × the tracked parameters, f32, kept in memory
/// and written to disk) are not computed, when they would take more than half the memory
/// budget (`attribution.memory_limit_gib`, else the available memory); None when they fit.
fn too_large(ctx: &StageContext, model: &Model, queries: &[PreparedDoc]) -> Option<String> {
    let k: usize = queries.iter().map(|q| q.n_loss_tokens()).sum();
    let params: u64 = model
        .tracked_layers()
        .iter()
        .map(|l| (l.d_out * (l.d_in + usize::from(l.has_bias))) as u64)
        .sum();
    let bytes = 4 * k as u64 * params;
    let budget = match ctx.config.attribution.memory_limit_gib {
        Some(l) => (l * (1u64 << 30) as f64) as u64,
        None => crate::util::mem::available_memory_bytes().unwrap_or(8 << 30),
    };
    (bytes > budget / 2).then(|| {
        format!(
            "query: per-token attribution skipped: the gradients of the {k} generated tokens \
             would take {} (each token's is as large as the tracked weights), more than half \
             of {}; lower query.max_new_tokens, raise attribution.memory_limit_gib, or set \
             attribution.generated.enabled = false to silence this",
            crate::util::mem::human_bytes(bytes),
            crate::util::mem::human_bytes(budget)
        )
    })
}
