//! Owns the statistics of attribution quality: recall of known sources, LDS, retraining jobs.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution;
//! never pipeline, report or stages (the `eval-*` stages in src/stages/ run these).
//!
//! Attribution-quality evaluation (docs/design.md §6): fact recall (recall@k and MRR of known
//! source documents; token-span recall@k of their fact spans) and the linear datamodeling
//! score (LDS) from retraining on random subsets, comparing methods side by side. The stages
//! `eval-recall` and `eval-lds` (src/stages/) glue these to the pipeline.

pub mod fact_spans;
pub mod facts;
mod facts_text;
pub mod known;
pub mod lds;
pub mod retrain;
pub mod stats;
pub mod table;
pub mod token_span;
pub mod workers;

pub use fact_spans::{check_spans, read_fact_spans, QuerySpans};
pub use facts::{generate as generate_facts, write_fact_set, FactSet, FactsSpec};
pub use known::{column_cells, read_known_sources, Cell};
pub use lds::{draw_subset, lds, predicted_losses, subset_size, Lds};
pub use retrain::{all_jobs, measure_queries, Job, JobResult, Retrain, RoleDocs, RoleIds, Shard};
pub use stats::{
    average_ranks, bootstrap_ci95, bootstrap_difference_ci95, pearson, recall_at, reciprocal_rank,
    source_ranks, spearman,
};
pub use token_span::{best_span_rank, chance_recall, span_tokens, token_span_recall};
pub use workers::{
    auto_workers, available_cores, model_weight_bytes, run_workers, threads_each, Worker,
};
