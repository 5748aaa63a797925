//! Owns the `query` stage: query gradients and `queries.parquet`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `fetch`, `query_generate`, `query_tokens`, `score_meta` (the score tables'
//! metadata).
//!
//! `query`: the query gradients v_L = ∇_θ f(q, θ_final) of every tracked layer at the final
//! checkpoint, with the measurement f(q) = −log p(completion | prompt) (docs/design.md §2).
//! Writes `query/gradients.safetensors` (one tensor [Q, d_out, d_in] per layer, in query
//! order), the same gradients as token factors V = Δᵀ A in `query/token_factors.safetensors`
//! (`delta.LAYER` [Q, T, d_out] and `a.LAYER` [Q, T, d_in], which the influence function's
//! preconditioning rotates more cheaply than V), and `query/queries.parquet`. Prompt-only queries (`[data.query] shape = "prompt"`)
//! are first completed by the final model ([`super::query_generate`]); `queries.parquet`'s
//! `generated` column says so. For a named query set (`source-tda ask`) the queries are read
//! from the set's own file instead of `prepare/query.parquet`, and everything is written to
//! `query/query_set=NAME/`. Generated queries also get one gradient per generated token
//! ([`super::query_tokens`]).

use std::collections::HashMap;

use serde_json::json;

use crate::attribution::query_gradients;
use crate::config::{Config, DocShape};
use crate::data::tokenize::load_tokenizer;
use crate::data::{load_docs, tokenize_docs, PreparedDoc};
use crate::error::{Error, Result};
use crate::output::{write_table, Column};
use crate::pipeline::{QuerySet, Stage, StageContext};
use crate::util::fsx::write_json_atomic;

use super::attribute::{check_memory, fit_options, load_model, plan, role_docs};
use super::fetch::Fetched;
use super::query_generate::{complete_queries, eos_tokens, generate_options};
use super::query_tokens::write_gen_tokens;

/// The `query` stage.
pub struct QueryStage;

/// The queries of a named set, read from its files and tokenised as the set says; the set's
/// definition is kept beside its outputs (`set.json`).
fn set_queries(ctx: &StageContext, set: &QuerySet) -> Result<Vec<PreparedDoc>> {
    let fetched = Fetched::load(ctx.run)?;
    let tok_path = fetched.tokenizer_path();
    let tokenizer = load_tokenizer(tok_path)?;
    let files: Vec<&std::path::Path> = set.files.iter().map(|(p, _)| p.as_path()).collect();
    let docs = load_docs(&files, &set.data)?;
    let label = format!("query set {}", set.name);
    // A set's rows are prompts (and completions), never `messages`: no chat template.
    let prepared = tokenize_docs(&tokenizer, tok_path, &docs, &set.data, None, &label)?;
    write_json_atomic(&ctx.out("set.json"), set)?;
    Ok(prepared.docs)
}

impl Stage for QueryStage {
    fn name(&self) -> &'static str {
        "query"
    }

    fn describe(&self) -> &'static str {
        "compute the query measurements and their gradients at the final checkpoint"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"batching": c.batching, "method": c.attribution.method});
        super::attribute::layers_view(c, &mut v);
        if c.data.query.as_ref().map(|d| d.shape) == Some(DocShape::Prompt) {
            v["generate"] = json!(c.query);
            v["seed"] = json!(c.run.seed);
            v["generated_tokens"] = json!(c.attribution.generated.enabled);
        }
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        let (queries, shape) = match ctx.query_set {
            Some(set) => (set_queries(ctx, set)?, Some(set.data.shape)),
            None => (
                role_docs(ctx.run, "query").map_err(|_| {
                    Error::Pipeline(
                        "the query stage needs queries: add `[data.query]` (prompt + completion \
                         pairs, shape = \"prompt_completion\", or prompts to complete, shape = \
                         \"prompt\") to the config, or ask about a file of prompts with \
                         `source-tda ask`"
                            .into(),
                    )
                })?,
                ctx.config.data.query.as_ref().map(|d| d.shape),
            ),
        };
        let model = load_model(&p.final_checkpoint, ctx.config)?;
        check_memory("query", &model, ctx.config)?;
        let generated = shape == Some(DocShape::Prompt);
        let queries = if generated {
            let eos = eos_tokens(&p.final_checkpoint)?;
            if ctx.config.query.stop_at_eos && eos.is_empty() {
                tracing::warn!(
                    "query: the final checkpoint names no eos_token_id; completions run to \
                     query.max_new_tokens = {}",
                    ctx.config.query.max_new_tokens
                );
            }
            let opts = generate_options(&ctx.config.query, ctx.config.run.seed, &eos);
            let tokenizer = load_tokenizer(Fetched::load(ctx.run)?.tokenizer_path())?;
            let done = complete_queries(
                &model,
                &tokenizer,
                &queries,
                &opts,
                &ctx.config.query.stop,
                ctx.config.batching.token_budget,
            )?;
            for q in &done {
                tracing::info!(
                    "query: {} completed {:?} → {:?}",
                    q.doc_id,
                    q.prompt.as_deref().unwrap_or_default(),
                    q.completion.as_deref().unwrap_or_default()
                );
            }
            done
        } else {
            queries
        };
        let qg = query_gradients(&model, &queries, &fit_options(ctx.config))?;
        let gen_tokens = (generated && ctx.config.attribution.generated.enabled)
            .then(|| -> Result<serde_json::Value> {
                let meta = super::score_meta::table_metadata(ctx, "gen_tokens")?;
                write_gen_tokens(ctx, &model, &queries, &fit_options(ctx.config), &meta)
            })
            .transpose()?;
        let entries: Vec<(String, candle_core::Tensor)> = model
            .tracked_layers()
            .iter()
            .map(|l| l.name.clone())
            .zip(qg.layers.iter().cloned())
            .collect();
        let meta: HashMap<String, String> = [(
            "source_tda".to_string(),
            json!({"queries": queries.iter().map(|q| &q.doc_id).collect::<Vec<_>>(),
                   "checkpoint": p.final_checkpoint})
            .to_string(),
        )]
        .into();
        crate::util::tensors::save_tensors(
            &ctx.out("gradients.safetensors"),
            &entries,
            meta.clone(),
        )?;
        let factors: Vec<(String, candle_core::Tensor)> = model
            .tracked_layers()
            .iter()
            .zip(&qg.factors)
            .flat_map(|(l, f)| {
                [
                    (format!("delta.{}", l.name), f.delta.clone()),
                    (format!("a.{}", l.name), f.a.clone()),
                ]
            })
            .collect();
        crate::util::tensors::save_tensors(&ctx.out("token_factors.safetensors"), &factors, meta)?;
        write_table(
            &ctx.out("queries.parquet"),
            &[
                (
                    "query_id",
                    Column::Str(queries.iter().map(|q| q.doc_id.clone()).collect()),
                ),
                (
                    "prompt",
                    Column::Str(
                        queries
                            .iter()
                            .map(|q| q.prompt.clone().unwrap_or_default())
                            .collect(),
                    ),
                ),
                (
                    "completion",
                    Column::Str(
                        queries
                            .iter()
                            .map(|q| q.completion.clone().unwrap_or_default())
                            .collect(),
                    ),
                ),
                (
                    "text",
                    Column::Str(queries.iter().map(|q| q.text.clone()).collect()),
                ),
                (
                    "n_tokens",
                    Column::U32(queries.iter().map(|q| q.n_tokens() as u32).collect()),
                ),
                (
                    "n_completion_tokens",
                    Column::U32(queries.iter().map(|q| q.n_loss_tokens() as u32).collect()),
                ),
                (
                    "measurement",
                    Column::F64(qg.measurements.iter().map(|&m| m as f64).collect()),
                ),
                ("generated", Column::Bool(vec![generated; queries.len()])),
            ],
            &super::score_meta::table_metadata(ctx, "queries")?,
        )?;
        tracing::info!(
            "query: {} queries, mean −log p(completion | prompt) = {:.3}",
            queries.len(),
            qg.measurements.iter().sum::<f32>() / queries.len().max(1) as f32
        );
        Ok(json!({
            "queries": queries.len(), "measurements": qg.measurements, "generated": generated,
            "completions": queries.iter().map(|q| &q.completion).collect::<Vec<_>>(),
            "gen_tokens": gen_tokens,
        }))
    }
}
