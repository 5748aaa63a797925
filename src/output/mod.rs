//! Output tables (docs/design.md §5): Parquet, zstd, with key-value metadata on every file.
//! Layer: ground — may import error and util only.

pub mod parquet;

pub use parquet::{write_table, Column};
