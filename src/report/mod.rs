//! Report: a run's results read back and rendered as HTML, a terminal summary, summary.json.
//! Layer: report — may import pipeline and every layer below it; never stages or main.
//!
//! The `report` stage's library: reading a run's results back (the score tables, the
//! manifest, known sources, evaluation results) and rendering them as one self-contained
//! HTML page, a terminal summary and `summary.json`.
//!
//! τ = score / n_train with τ > 0 for proponents (docs/design.md §2); token scores add up to
//! the document's score and are shown on a diverging colour scale centred at 0.

pub mod colour;
pub mod data;
pub mod eval;
pub mod eval_html;
pub mod gen_data;
pub mod gen_html;
pub mod html;
pub mod known;
pub mod loss_html;
pub mod sets_html;
pub mod summary;
pub mod svg;
pub mod table;
pub mod text;

pub use data::{
    load_eval, load_loss, load_scores, load_timings, QueryReport, QuerySetReport, ReportData,
};
pub use eval::{EvalResults, LDS_STAGE, RECALL_STAGE};
pub use html::render;
pub use known::{read_known_sources, unknown_known_sources, unknown_known_sources_note};
pub use summary::{summary_json, terminal_lines};
