//! Output tables (docs/design.md §5): Parquet, zstd, with key-value metadata on every file;
//! the scores as a hive-partitioned dataset streamed a row group at a time.
//! Layer: ground — may import error and util only.

pub mod dataset;
pub mod keep;
pub mod parquet;
pub mod score_rows;

pub use parquet::{write_table, Column};
