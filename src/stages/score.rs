//! Owns the `score` stage: preconditioned queries, scoring passes, and the score tables.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `score_merge`, `score_run`, `score_shard` (and through them `score_acting`,
//! `score_candidates`, `score_docs`, `score_gen`, `score_meta`, `score_queries`,
//! `score_write`).
//!
//! `score`: the backwards walk over segments and the training passes that score every
//! document of every segment's data against every query, per document and per token, in
//! one pass per checkpoint (docs/design.md §2, §5; the passes in [`super::score_docs`], the
//! tables in [`super::score_write`]). Writes the scores dataset
//! (`query_set=NAME/shard=0/part-00000.parquet`, streamed a row group at a time, every
//! document or each query's top and bottom `keep_top_bottom`), `token_scores.parquet` (top-k
//! documents per query, or all), `queries.parquet` and `train_docs.parquet`; for generated
//! queries also the per-generated-token tables ([`super::score_gen`]).
//!
//! `score` is the raw Σ_ℓ ⟨u_ℓ, ḡ_ℓ(m)⟩ and `n_train` the N of the document's data set, so
//! τ = score / n_train; τ > 0 means the document helped the model produce the completion (a
//! proponent). Per-segment columns `segment_K_STAGE` add up to `score`.

use serde_json::json;

use crate::config::Config;
use crate::error::Result;
use crate::pipeline::{Stage, StageContext};

use super::attribute::device_view;
use super::score_run::score_stage;
use super::score_shard::shards_to_merge;

/// The `score` stage.
pub struct ScoreStage;

impl Stage for ScoreStage {
    fn name(&self) -> &'static str {
        "score"
    }

    fn describe(&self) -> &'static str {
        "walk the query back through the segments and score documents and tokens to Parquet"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune", "fit", "query"]
    }

    /// The queries come from the `query` stage (or are not read at all): the query data set's
    /// files upstream are not inputs, so new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("fetch", "data/query.json"), ("prepare", "query.parquet")]
    }

    /// The candidate index, read with `[attribution.candidates]`.
    fn optional_inputs(&self) -> &'static [&'static str] {
        &["index"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"attribution": c.attribution, "batching": c.batching});
        device_view(c, &mut v);
        v
    }

    /// Scores, or, when `RUN_DIR/shards/score/` holds a complete set of `score --shard`
    /// results of this key, merges them ([`super::score_merge`]).
    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        match shards_to_merge(ctx) {
            Ok(Some(set)) => return super::score_merge::merge(ctx, &set),
            Ok(None) => {}
            // `merge score` checks the set before it runs the stage and refuses there.
            Err(e) => tracing::warn!("score: scoring every document; not merging the shards: {e}"),
        }
        score_stage(ctx, None)
    }
}
