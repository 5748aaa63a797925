//! Data: data sets read, made documents, tokenised, stored as a table, and batched.
//! Layer: data — may import ground (error, util, config, output), linalg, backend, model.
//!
//! Reading data sets (Parquet, JSONL, CSV), turning rows into documents, tokenising them with
//! loss masks, storing them as a Parquet table, and batching them under a token budget for
//! the stages that run the model.

pub mod batch;
pub mod cells;
pub mod chat;
pub mod doc_store;
pub mod docs;
pub mod read;
pub mod table;
pub mod token_text;
pub mod tokenize;

pub use batch::{plan_batches, plan_stats, Batch, BatchOrder, BatchPlanStats};
pub use chat::ChatTemplate;
pub use doc_store::DocStore;
pub use docs::{load_docs, Content, RawDoc};
pub use read::{format_of, DATA_EXTENSIONS};
pub use table::{count_prepared, for_each_prepared, read_prepared, write_prepared};
pub use token_text::{generated_token_texts, token_char_ranges, token_texts};
pub use tokenize::{tokenize_docs, Prepared, PreparedDoc, TokenizeStats};
