//! Owns the `eval-recall` stage: ranks of known sources per method, recall@k, MRR.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `eval_methods`, `eval_spans`, `fetch`.
//!
//! `eval-recall`: fact recall of each compared method. For every query whose data lists
//! known source documents (`[eval] known_sources_column`), the fine-tuning documents are
//! ranked by τ (descending) and the rank of each known source is recorded; recall@k and the
//! mean reciprocal rank (MRR) summarise them per method.
//!
//! Candidates are the fine-tuning set (`[train] dataset`) only, for every method: the
//! influence function and the gradient dot product score nothing else, and a planted fact
//! is a fine-tuning document, so pretraining documents that Source also scores are left out
//! of the ranking (their scores stay in the scores dataset, `score/query_set=default/`).
//!
//! For queries that also give fact spans (`[eval] fact_spans_column`: where each known
//! source's text states the fact), token-span recall@k of every method: whether the known
//! source's highest-scored tokens lie on the span ([`super::eval_spans`]).
//!
//! Writes `eval-recall/summary.json`, `eval-recall/recall.parquet` (method, query_id,
//! known_source, rank, tau, n_candidates) and, with fact spans, `eval-recall/token_span.parquet`
//! (method, query_id, known_source, n_tokens, n_span_tokens, best_span_rank, top_token_index,
//! top_token_text, top_token_in_span).

use std::collections::HashMap;

use serde_json::json;

use crate::config::Config;
use crate::data::tokenize::load_tokenizer;
use crate::error::{Error, Result};
use crate::eval::{
    check_spans, read_fact_spans, read_known_sources, recall_at, reciprocal_rank, source_ranks,
    table::recall_table,
};
use crate::output::{write_table, Column};
use crate::pipeline::{Stage, StageContext};
use crate::util::fsx::write_json_atomic;

use super::attribute::role_docs;
use super::eval_methods::method_scores;
use super::eval_spans::{method_span_recall, span_pairs, SpanRows};
use super::fetch::Fetched;

/// The `eval-recall` stage.
pub struct EvalRecallStage;

impl Stage for EvalRecallStage {
    fn name(&self) -> &'static str {
        "eval-recall"
    }

    fn describe(&self) -> &'static str {
        "recall@k and MRR of the queries' known source documents, per method"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune", "score"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        json!({"methods": c.eval.methods, "k": c.eval.k,
               "known_sources_column": c.eval.known_sources_column,
               "fact_spans_column": c.eval.fact_spans_column,
               "attribution": c.attribution, "batching": c.batching,
               "dataset": c.train.dataset, "seed": c.run.seed})
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let c = ctx.config;
        let role = c.train.dataset.as_str();
        let fetched = Fetched::load(ctx.run)?;
        let (Some(qds), Some(qrepo)) = (&c.data.query, fetched.data.get("query")) else {
            return Err(Error::Pipeline(
                "eval-recall needs queries: add `[data.query]` to the config".into(),
            ));
        };
        let files: Vec<&std::path::Path> = qrepo.files.iter().map(|f| f.path.as_path()).collect();
        let column = &c.eval.known_sources_column;
        let known = read_known_sources(&files, qds, column)?;
        let queries = role_docs(ctx.run, "query")?;
        let query_ids: Vec<String> = queries.iter().map(|q| q.doc_id.clone()).collect();
        let with_sources: Vec<usize> = (0..queries.len())
            .filter(|&i| known.contains_key(&query_ids[i]))
            .collect();
        if with_sources.is_empty() {
            return Err(Error::Pipeline(format!(
                "eval-recall: no query lists known source documents in column `{column}` of {} \
                 (eval.known_sources_column); give each query the ids of the documents that \
                 state its answer, e.g. \"{column}\": [\"doc-7\"]",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let docs = role_docs(ctx.run, role)?;
        let train_ids: Vec<String> = docs.iter().map(|d| d.doc_id.clone()).collect();
        let pos: HashMap<&str, usize> = train_ids
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i))
            .collect();
        let mut sources: Vec<(usize, Vec<usize>)> = Vec::new();
        for &qi in &with_sources {
            let ids = &known[&query_ids[qi]];
            let idx = ids
                .iter()
                .map(|id| {
                    pos.get(id.as_str()).copied().ok_or_else(|| {
                        Error::Pipeline(format!(
                            "eval-recall: query `{}` lists known source `{id}`, which is not a \
                             document of the fine-tuning set `{role}` ({} documents prepared); \
                             fix the id or check `data.{role}.max_documents`",
                            query_ids[qi],
                            train_ids.len()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sources.push((qi, idx));
        }
        let span_column = c.eval.fact_spans_column();
        let spans = read_fact_spans(&files, qds, span_column)?;
        check_spans(&spans, &known, span_column, column)?;
        let pairs = if spans.is_empty() {
            Vec::new()
        } else {
            let by_id: HashMap<&str, &crate::data::PreparedDoc> =
                docs.iter().map(|d| (d.doc_id.as_str(), d)).collect();
            let special = c
                .data
                .roles()
                .into_iter()
                .find(|(r, _)| *r == role)
                .is_none_or(|(_, ds)| ds.add_special_tokens);
            let tokenizer = load_tokenizer(fetched.tokenizer_path())?;
            span_pairs(&spans, &by_id, &tokenizer, special, span_column)?
        };
        let mut span_rows = SpanRows::default();

        let (mut r_method, mut r_query, mut r_source, mut r_rank, mut r_tau) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut methods = Vec::new();
        for &method in &c.eval.methods {
            let name = method.name();
            let scores = method_scores(ctx, method, role, &query_ids, &train_ids)?;
            let mut recall = vec![0.0; c.eval.k.len()];
            let mut mrr = 0.0;
            for (qi, idx) in &sources {
                let ranks = source_ranks(&scores.tau[*qi], idx);
                for (slot, &k) in recall.iter_mut().zip(&c.eval.k) {
                    *slot += recall_at(&ranks, k);
                }
                mrr += reciprocal_rank(&ranks);
                for (&m, &rank) in idx.iter().zip(&ranks) {
                    r_method.push(name.to_string());
                    r_query.push(query_ids[*qi].clone());
                    r_source.push(train_ids[m].clone());
                    r_rank.push(rank);
                    r_tau.push(scores.tau[*qi][m]);
                }
            }
            let n = sources.len() as f64;
            let recall: serde_json::Map<String, serde_json::Value> = c
                .eval
                .k
                .iter()
                .zip(&recall)
                .map(|(k, r)| (k.to_string(), json!(r / n)))
                .collect();
            let mut entry = json!({"method": name, "n_queries": sources.len(),
                                   "recall": recall, "mrr": mrr / n});
            if !pairs.is_empty() {
                entry["token_span"] =
                    method_span_recall(c, &name, &scores.scores_path, &pairs, &mut span_rows)?;
            }
            methods.push(entry);
        }
        let n_rows = r_method.len();
        write_table(
            &ctx.out("recall.parquet"),
            &[
                ("method", Column::Str(r_method)),
                ("query_id", Column::Str(r_query)),
                ("known_source", Column::Str(r_source)),
                ("rank", Column::U32(r_rank)),
                ("tau", Column::F64(r_tau)),
                (
                    "n_candidates",
                    Column::U32(vec![train_ids.len() as u32; n_rows]),
                ),
            ],
            &[
                ("source_tda.version".into(), crate::VERSION.into()),
                ("source_tda.table".into(), "recall".into()),
                (
                    "source_tda.candidates".into(),
                    format!("the fine-tuning set `{role}`; rank 1 = highest tau"),
                ),
            ],
        )?;
        if !pairs.is_empty() {
            write_table(
                &ctx.out("token_span.parquet"),
                &span_rows.columns(),
                &[
                    ("source_tda.version".into(), crate::VERSION.into()),
                    ("source_tda.table".into(), "token_span".into()),
                    (
                        "source_tda.definition".into(),
                        "rank 1 = the document's highest-scored token for the query; the span = \
                         tokens whose characters overlap a fact span; ties count against it"
                            .into(),
                    ),
                ],
            )?;
        }
        let summary = json!({
            "k": c.eval.k, "methods": methods, "fact_span_pairs": pairs.len(),
            "candidates": role, "n_candidates": train_ids.len(),
            "queries_without_known_sources": queries.len() - sources.len(),
        });
        write_json_atomic(&ctx.out("summary.json"), &summary)?;
        for line in recall_table(&summary).lines() {
            tracing::info!("eval-recall: {line}");
        }
        Ok(summary)
    }
}
