//! `query`: the query gradients v_L = ∇_θ f(q, θ_final) of every tracked layer at the final
//! checkpoint, with the measurement f(q) = −log p(completion | prompt) (DESIGN.md §2).
//! Writes `query/gradients.safetensors` (one tensor [Q, d_out, d_in] per layer, in query
//! order) and `query/queries.parquet`.

use std::collections::HashMap;

use serde_json::json;

use crate::attribution::query_gradients;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::output::{write_table, Column};
use crate::pipeline::{Stage, StageContext};

use super::attribute::{check_memory, fit_options, load_model, plan, role_docs};

/// The `query` stage.
pub struct QueryStage;

impl Stage for QueryStage {
    fn name(&self) -> &'static str {
        "query"
    }

    fn describe(&self) -> &'static str {
        "compute the query measurements and their gradients at the final checkpoint"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["prepare", "finetune"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        json!({"batching": c.batching, "method": c.attribution.method})
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        let queries = role_docs(ctx.run, "query").map_err(|_| {
            Error::Pipeline(
                "the query stage needs queries: add `[data.query]` (prompt + completion pairs, \
                 shape = \"prompt_completion\") to the config"
                    .into(),
            )
        })?;
        let model = load_model(&p.final_checkpoint)?;
        check_memory("query", &model, ctx.config)?;
        let qg = query_gradients(&model, &queries, &fit_options(ctx.config))?;
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
        crate::util::tensors::save_tensors(&ctx.out("gradients.safetensors"), &entries, meta)?;
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
            ],
            &super::score::table_metadata(ctx, "queries")?,
        )?;
        tracing::info!(
            "query: {} queries, mean −log p(completion | prompt) = {:.3}",
            queries.len(),
            qg.measurements.iter().sum::<f32>() / queries.len().max(1) as f32
        );
        Ok(json!({"queries": queries.len(), "measurements": qg.measurements}))
    }
}
