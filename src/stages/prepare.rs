//! Owns the `prepare` stage: tokenised data sets as `prepare/ROLE.parquet`.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! sibling `fetch`.
//!
//! `prepare`: tokenises every data set with the model's tokenizer into
//! `prepare/ROLE.parquet` (doc_id, text, input_ids, loss_mask, n_tokens, …; see
//! [`crate::data::table`]), reporting truncation and how the documents batch under the
//! token budget.

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::{Config, DocShape};
use crate::data::batch::plan_stats;
use crate::data::tokenize::load_tokenizer;
use crate::data::{
    load_docs, plan_batches, tokenize_docs, write_prepared, BatchOrder, ChatTemplate,
};
use crate::error::Result;
use crate::pipeline::{Stage, StageContext};
use crate::util::hash::sha256_json;

use super::fetch::Fetched;

/// The `prepare` stage.
pub struct PrepareStage;

impl Stage for PrepareStage {
    fn name(&self) -> &'static str {
        "prepare"
    }

    fn describe(&self) -> &'static str {
        "tokenise the data sets into Parquet tables with loss masks"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        json!({"data": c.data, "batching": c.batching})
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let fetched = Fetched::load(ctx.run)?;
        let tok_path = fetched.tokenizer_path().to_path_buf();
        let tokenizer = load_tokenizer(&tok_path)?;
        let tok_sha = fetched
            .model
            .file("tokenizer.json")
            .map(|f| f.sha256.clone())
            .unwrap_or_default();
        // `messages` data sets are rendered with the model's own chat template.
        let model_file = |n: &str| fetched.model.file(n).map(|f| f.path.clone());
        let chat = if ctx
            .config
            .data
            .roles()
            .iter()
            .any(|(_, d)| d.shape == DocShape::Messages)
        {
            ChatTemplate::from_model_files(
                model_file("tokenizer_config.json").as_deref(),
                model_file("chat_template.jinja").as_deref(),
            )?
        } else {
            None
        };
        let mut summary = BTreeMap::new();
        for (role, ds) in ctx.config.data.roles() {
            let repo = &fetched.data[role];
            let files: Vec<&std::path::Path> =
                repo.files.iter().map(|f| f.path.as_path()).collect();
            let docs = load_docs(&files, ds)?;
            let prepared = tokenize_docs(&tokenizer, &tok_path, &docs, ds, chat.as_ref(), role)?;
            // Of this data set's part of the config alone: the table is then the same bytes
            // whatever the other data sets are, and stages that do not read them stay current.
            let view_hash =
                sha256_json(&json!({"data": {role: ds}, "batching": ctx.config.batching}));
            let metadata = vec![
                ("source_tda.version".to_string(), crate::VERSION.to_string()),
                ("source_tda.role".to_string(), role.to_string()),
                (
                    "source_tda.shape".to_string(),
                    format!("{:?}", ds.shape).to_lowercase(),
                ),
                ("source_tda.config_hash".to_string(), view_hash),
                ("source_tda.tokenizer_sha256".to_string(), tok_sha.clone()),
                ("source_tda.model_id".to_string(), fetched.model.id.clone()),
                (
                    "source_tda.model_commit".to_string(),
                    fetched.model.commit.clone().unwrap_or_default(),
                ),
                ("source_tda.dataset_id".to_string(), repo.id.clone()),
                (
                    "source_tda.dataset_commit".to_string(),
                    repo.commit.clone().unwrap_or_default(),
                ),
                (
                    "source_tda.loss_mask".to_string(),
                    "1 where token t is a target predicted from tokens < t; token 0 never is"
                        .to_string(),
                ),
            ];
            write_prepared(
                &ctx.out(format!("{role}.parquet")),
                &prepared.docs,
                &metadata,
            )?;
            ctx.failpoint(&format!("after-{role}"))?;

            let lengths: Vec<usize> = prepared.docs.iter().map(|d| d.n_tokens()).collect();
            let plan = plan_batches(
                &lengths,
                ctx.config.batching.token_budget,
                ctx.config.batching.max_batch_size,
                BatchOrder::LengthSorted,
            );
            let batching = plan_stats(&plan, &lengths);
            tracing::info!(
                "{role}: {} documents, {} tokens ({} loss targets), {} truncated; {} batches at \
                 {} tokens/batch, padding efficiency {:.0}%",
                prepared.stats.documents,
                prepared.stats.tokens,
                prepared.stats.loss_tokens,
                prepared.stats.truncated_documents,
                batching.batches,
                ctx.config.batching.token_budget,
                100.0 * batching.padding_efficiency
            );
            summary.insert(
                role,
                json!({"tokenize": prepared.stats, "batching": batching}),
            );
        }
        Ok(json!(summary))
    }
}
