//! Owns the registry of every stage (`registry()`); each file is one stage's I/O and glue.
//! Layer: stages — may import every library layer (ground up to pipeline and report); the
//! files here import only `adapter_record`, `fetch`, `attribute`, `eval_methods`, `finetune`, `fit_parts`,
//! `fit_shard`, `index`, `pretrain_record`, `query_generate`, `query_tokens`, `score`,
//! `score_acting`, `score_candidates`, `score_gen`, `score_gen_detail`, `score_gen_out`,
//! `score_queries`, `score_refine` and `score_text` among themselves, never `mod.rs`.
//!
//! The stages the runner knows ([`Registry::new`] arranges them in the pipeline's order). Each
//! file is one stage: it glues the library modules to the [`Stage`](crate::pipeline::Stage)
//! contract.

mod adapter_record;
pub mod ask;
pub mod attribute;
mod eval_lds;
mod eval_methods;
mod eval_recall;
mod eval_spans;
mod fetch;
mod finetune;
mod fit;
mod fit_parts;
mod fit_shard;
mod index;
pub mod plan;
mod prepare;
mod pretrain_record;
mod query;
pub mod query_generate;
mod query_tokens;
mod report;
mod score;
mod score_acting;
mod score_candidates;
mod score_docs;
mod score_gen;
mod score_gen_detail;
mod score_gen_out;
mod score_merge;
mod score_meta;
mod score_queries;
mod score_refine;
mod score_run;
mod score_shard;
mod score_text;
mod score_write;
mod shard_state;

pub use ask::{ask, define_set, Asked};
pub use eval_lds::{merge_lds, run_shard, EvalLdsStage, ShardOutcome};
pub use eval_methods::{method_scores, scored_run, MethodScores};
pub use eval_recall::EvalRecallStage;
pub use fetch::{FetchStage, Fetched, FetchedAdapter};
pub use finetune::{base_model_dir, FinetuneStage};
pub use fit::FitStage;
pub use fit_shard::{fit_shard, merge_fit, FitMergeOutcome, FitPass, FitShardOutcome};
pub use prepare::PrepareStage;
pub use query::QueryStage;
pub use report::{gather as gather_report, ReportStage};
pub use score::ScoreStage;
pub use score_meta::SIGN_CONVENTION;
pub use score_shard::{merge_score, score_shard, ScoreMergeOutcome, ScoreShardOutcome};

use crate::pipeline::Registry;

/// Every implemented stage, arranged by [`Registry::new`] in
/// [`STAGE_ORDER`](crate::config::STAGE_ORDER): the registry the command line gives the runner.
pub fn registry() -> Registry {
    Registry::new(vec![
        Box::new(FetchStage),
        Box::new(PrepareStage),
        Box::new(FinetuneStage),
        Box::new(FitStage),
        Box::new(index::IndexStage),
        Box::new(QueryStage),
        Box::new(ScoreStage),
        Box::new(EvalRecallStage),
        Box::new(EvalLdsStage),
        Box::new(ReportStage),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::STAGE_ORDER;

    #[test]
    fn every_stage_of_the_design_is_implemented_in_order() {
        let names: Vec<&str> = registry().names();
        assert_eq!(names, STAGE_ORDER.to_vec());
        assert!(registry()
            .find("reprot")
            .err()
            .expect("no such stage")
            .to_string()
            .contains("unknown stage `reprot`"));
    }
}
