//! Owns hive-partitioned Parquet datasets: `PartWriter` (one part file written a row group at a
//! time) and `part_files` (a dataset's part files, in shard order).
//! Layer: ground — may import error, util and config; sibling `parquet`.
//!
//! A dataset is a folder of partitions named `KEY=VALUE` (hive style), here
//! `query_set=NAME/shard=I/part-00000.parquet`: DuckDB (`hive_partitioning`), Polars
//! (`hive_partitioning=True`), Spark (`basePath`) and `pyarrow.dataset` (`partitioning="hive"`)
//! read the part files as one table with the partition keys as columns. The files themselves
//! hold no partition column.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;

use super::parquet::{writer_properties, Column};
use crate::error::{Error, IoContext, Result};

/// The name of a partition's first (today only) part file.
pub const FIRST_PART: &str = "part-00000.parquet";

/// The partition folder of shard `shard` under a query set's dataset folder `root`
/// (`root/shard=I`).
pub fn shard_dir(root: &Path, shard: u32) -> PathBuf {
    root.join(format!("shard={shard}"))
}

/// Streams one table into one part file: rows arrive in column chunks, each written as one
/// or more row groups of at most `row_group` rows, so memory holds one row group, never the
/// table. The file appears at its path only when [`PartWriter::finish`] succeeds (it is written
/// on a temporary sibling until then).
pub struct PartWriter {
    path: PathBuf,
    tmp: PathBuf,
    schema: SchemaRef,
    writer: Option<ArrowWriter<std::fs::File>>,
    row_group: usize,
    rows: usize,
}

impl PartWriter {
    /// Creates the part file `path` (and its folders) for columns `fields` (name, an empty
    /// [`Column`] of the column's type), with key-value `metadata` and row groups of at most
    /// `row_group` rows (≥ 1).
    pub fn create(
        path: &Path,
        fields: &[(&str, Column)],
        metadata: &[(String, String)],
        row_group: usize,
    ) -> Result<PartWriter> {
        if row_group == 0 {
            return Err(Error::parquet(
                path,
                "row groups of 0 rows; allowed: 1 or more",
            ));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ctx("creating", dir)?;
        }
        let schema: SchemaRef = Arc::new(Schema::new(
            fields
                .iter()
                .map(|(name, c)| Field::new(*name, c.data_type(), false))
                .collect::<Vec<_>>(),
        ));
        let tmp = crate::util::fsx::temp_sibling(path);
        let file = std::fs::File::create(&tmp).ctx("creating", &tmp)?;
        let props = writer_properties(metadata)
            .into_builder()
            .set_max_row_group_row_count(Some(row_group))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| Error::parquet(path, e))?;
        Ok(PartWriter {
            path: path.to_path_buf(),
            tmp,
            schema,
            writer: Some(writer),
            row_group,
            rows: 0,
        })
    }

    /// Appends rows: `columns` in the order given to [`PartWriter::create`], equal lengths.
    /// Every `row_group` rows written close a row group.
    pub fn write(&mut self, columns: &[Column]) -> Result<()> {
        let n = columns.first().map(Column::len).unwrap_or(0);
        if columns.len() != self.schema.fields().len() || columns.iter().any(|c| c.len() != n) {
            return Err(Error::parquet(
                &self.path,
                format!(
                    "{} columns of lengths {:?} for a table of {} columns",
                    columns.len(),
                    columns.iter().map(Column::len).collect::<Vec<_>>(),
                    self.schema.fields().len()
                ),
            ));
        }
        let w = self.writer.as_mut().expect("open until finish");
        let mut from = 0;
        while from < n {
            // Fill the open row group up to `row_group` rows, then close it.
            let room = self.row_group - self.rows % self.row_group;
            let to = (from + room).min(n);
            let arrays: Vec<ArrayRef> = columns.iter().map(|c| c.slice(from, to)).collect();
            let batch = RecordBatch::try_new(self.schema.clone(), arrays)
                .map_err(|e| Error::parquet(&self.path, e))?;
            w.write(&batch).map_err(|e| Error::parquet(&self.path, e))?;
            self.rows += to - from;
            if self.rows % self.row_group == 0 {
                w.flush().map_err(|e| Error::parquet(&self.path, e))?;
            }
            from = to;
        }
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Closes the file and renames it into place; returns its row count.
    pub fn finish(mut self) -> Result<usize> {
        let w = self.writer.take().expect("open until finish");
        w.close().map_err(|e| Error::parquet(&self.path, e))?;
        std::fs::rename(&self.tmp, &self.path).ctx("renaming into place", &self.path)?;
        Ok(self.rows)
    }
}

impl Drop for PartWriter {
    /// An unfinished part (an error on the way) leaves no file behind.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The part files of the dataset folder `root` (a query set's `…/query_set=NAME`): every
/// `shard=I/part-*.parquet`, by shard number then name. An error names `root` when it has
/// none.
pub fn part_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<(u64, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = name.strip_prefix("shard=").and_then(|i| i.parse().ok()) {
                shards.push((i, e.path()));
            }
        }
    }
    shards.sort();
    let mut parts = Vec::new();
    for (_, dir) in shards {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ctx("listing", &dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
            })
            .collect();
        files.sort();
        parts.extend(files);
    }
    if parts.is_empty() {
        return Err(Error::parquet(
            root,
            "no part files (shard=I/part-*.parquet): the score stage did not finish writing \
             here, or the run was made by a version that wrote scores.parquet; rerun `score`",
        ));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stream_in_row_groups_and_list_in_shard_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("query_set=x");
        let fields = [("v", Column::I64(vec![])), ("s", Column::Str(vec![]))];
        for (shard, group) in [(10u32, 3usize), (2, 4)] {
            let path = shard_dir(&root, shard).join(FIRST_PART);
            let mut w = PartWriter::create(&path, &fields, &[], group).unwrap();
            // 2 + 5 + 0 + 3 rows in uneven chunks.
            for chunk in [0..2i64, 2..7, 7..7, 7..10] {
                let v: Vec<i64> = chunk.map(|x| x + 100 * shard as i64).collect();
                let s = v.iter().map(|x| x.to_string()).collect();
                w.write(&[Column::I64(v), Column::Str(s)]).unwrap();
            }
            assert!(!path.exists(), "not in place before finish");
            assert_eq!(w.finish().unwrap(), 10);
            let (b, _) = super::super::parquet::open_table(&path).unwrap();
            let groups: Vec<i64> = b
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows())
                .collect();
            let want: Vec<i64> = (0..10)
                .step_by(group)
                .map(|f| (10 - f).min(group) as i64)
                .collect();
            assert_eq!(groups, want, "row groups of {group}");
        }
        let parts = part_files(&root).unwrap();
        assert_eq!(
            parts,
            [2, 10].map(|s| shard_dir(&root, s).join(FIRST_PART)),
            "numeric shard order"
        );
        let e = part_files(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none") && e.contains("rerun `score`"), "{e}");

        // A writer dropped unfinished leaves nothing; bad rows are refused naming the file.
        let path = dir.path().join("p/part-00000.parquet");
        let mut w = PartWriter::create(&path, &fields, &[], 2).unwrap();
        let e = w.write(&[Column::I64(vec![1])]).unwrap_err().to_string();
        assert!(e.contains("part-00000.parquet"), "{e}");
        drop(w);
        assert!(!path.exists() && !crate::util::fsx::temp_sibling(&path).exists());
        let e = PartWriter::create(&path, &fields, &[], 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("row groups of 0 rows"), "{e}");
    }
}
