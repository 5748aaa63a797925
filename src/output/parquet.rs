//! Owns the tool's Parquet tables: `Column`, `write_table`, `write_batches`, `read_batches`.
//! Layer: ground — may import error, util and config; no sibling.
//!
//! A small column-oriented Parquet writer (zstd, key-value metadata, row groups) for the
//! tool's output tables.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, Float64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, IoContext, Result};

/// One column's values.
#[derive(Debug, Clone)]
pub enum Column {
    /// UTF-8 strings.
    Str(Vec<String>),
    /// Unsigned 32-bit integers.
    U32(Vec<u32>),
    /// Signed 64-bit integers (ids and counts that may pass 2³²: Spark reads UINT64 as a
    /// decimal, so the tables never use it).
    I64(Vec<i64>),
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Booleans.
    Bool(Vec<bool>),
}

impl Column {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Column::Str(v) => v.len(),
            Column::U32(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::F32(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::Bool(v) => v.len(),
        }
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its Arrow type.
    pub fn data_type(&self) -> DataType {
        match self {
            Column::Str(_) => DataType::Utf8,
            Column::U32(_) => DataType::UInt32,
            Column::I64(_) => DataType::Int64,
            Column::F32(_) => DataType::Float32,
            Column::F64(_) => DataType::Float64,
            Column::Bool(_) => DataType::Boolean,
        }
    }

    /// Values `from..to` as an Arrow array.
    pub fn slice(&self, from: usize, to: usize) -> ArrayRef {
        match self {
            Column::Str(v) => Arc::new(StringArray::from_iter_values(&v[from..to])),
            Column::U32(v) => Arc::new(UInt32Array::from(v[from..to].to_vec())),
            Column::I64(v) => Arc::new(arrow_array::Int64Array::from(v[from..to].to_vec())),
            Column::F32(v) => Arc::new(Float32Array::from(v[from..to].to_vec())),
            Column::F64(v) => Arc::new(Float64Array::from(v[from..to].to_vec())),
            Column::Bool(v) => Arc::new(arrow_array::BooleanArray::from(v[from..to].to_vec())),
        }
    }
}

/// The key-value metadata key holding a table's format, [`crate::FORMAT_VERSION`].
pub const FORMAT_KEY: &str = "source_tda.format_version";

/// The project's Parquet writer settings: zstd level 3 and key-value `metadata`, to which
/// [`FORMAT_KEY`] is added (unless `metadata` has it).
pub fn writer_properties(metadata: &[(String, String)]) -> WriterProperties {
    let mut kv: Vec<KeyValue> = metadata
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    if !metadata.iter().any(|(k, _)| k == FORMAT_KEY) {
        kv.push(KeyValue::new(
            FORMAT_KEY.to_string(),
            crate::FORMAT_VERSION.to_string(),
        ));
    }
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid level"),
        ))
        .set_key_value_metadata(Some(kv))
        .build()
}

/// Rows per row group.
pub const ROW_GROUP: usize = 65_536;

/// Writes named columns (equal lengths) to `path` atomically, zstd-compressed, in row groups
/// of [`ROW_GROUP`], with key-value `metadata`.
pub fn write_table(
    path: &Path,
    columns: &[(&str, Column)],
    metadata: &[(String, String)],
) -> Result<()> {
    let n = columns.first().map(|(_, c)| c.len()).unwrap_or(0);
    if let Some((name, c)) = columns.iter().find(|(_, c)| c.len() != n) {
        return Err(Error::parquet(
            path,
            format!("column `{name}` has {} rows, expected {n}", c.len()),
        ));
    }
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, c)| Field::new(*name, c.data_type(), false))
            .collect::<Vec<_>>(),
    ));
    let props = writer_properties(metadata);
    write_atomically(path, schema.clone(), Some(props), |w| {
        let mut from = 0;
        while from < n || (n == 0 && from == 0) {
            let to = (from + ROW_GROUP).min(n);
            let arrays: Vec<ArrayRef> = columns.iter().map(|(_, c)| c.slice(from, to)).collect();
            let batch = RecordBatch::try_new(schema.clone(), arrays)
                .map_err(|e| Error::parquet(path, e))?;
            w.write(&batch).map_err(|e| Error::parquet(path, e))?;
            w.flush().map_err(|e| Error::parquet(path, e))?;
            if n == 0 {
                break;
            }
            from = to;
        }
        Ok(())
    })
}

/// Writes a Parquet file at `path` atomically: `write` fills a writer on a temporary sibling,
/// which is renamed into place once closed, or removed if anything fails.
fn write_atomically(
    path: &Path,
    schema: arrow_schema::SchemaRef,
    props: Option<WriterProperties>,
    write: impl FnOnce(&mut ArrowWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = crate::util::fsx::temp_sibling(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp).ctx("creating", &tmp)?;
        let mut w =
            ArrowWriter::try_new(file, schema, props).map_err(|e| Error::parquet(path, e))?;
        write(&mut w)?;
        w.close().map_err(|e| Error::parquet(path, e))?;
        std::fs::rename(&tmp, path).ctx("renaming into place", path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole Parquet file into record batches, with errors that name the file. Not
/// generic: a caller in another crate (the integration tests) links the reader compiled here
/// instead of instantiating parquet's generic reader stack again (minutes of a release build).
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let (builder, _) = open_table(path)?;
    builder
        .build()
        .map_err(|e| Error::parquet(path, e))?
        .map(|b| b.map_err(|e| Error::parquet(path, e)))
        .collect()
}

/// Writes `batches` (one schema) to `path` atomically with writer settings `props` (`None`:
/// parquet's defaults, uncompressed). Not generic, like [`read_batches`].
pub fn write_batches(
    path: &Path,
    batches: &[RecordBatch],
    props: Option<WriterProperties>,
) -> Result<()> {
    let Some(first) = batches.first() else {
        return Err(Error::parquet(path, "no record batch to write"));
    };
    write_atomically(path, first.schema(), props, |w| {
        for b in batches {
            w.write(b).map_err(|e| Error::parquet(path, e))?;
        }
        Ok(())
    })
}

/// Opens a Parquet file for reading: the record-batch reader builder and the file's
/// key-value metadata, with errors that name the file. A table the tool wrote in another
/// format ([`FORMAT_KEY`]) is refused; one without the key (written by other tools) is read.
pub fn open_table(
    path: &Path,
) -> Result<(
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<std::fs::File>,
    std::collections::HashMap<String, String>,
)> {
    let file = std::fs::File::open(path).ctx("opening", path)?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::parquet(path, e))?;
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|e| (e.key.clone(), e.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    check_format(path, &metadata)?;
    Ok((builder, metadata))
}

fn check_format(path: &Path, metadata: &std::collections::HashMap<String, String>) -> Result<()> {
    match metadata.get(FORMAT_KEY) {
        Some(v) if v.trim() != crate::FORMAT_VERSION.to_string() => Err(Error::parquet(
            path,
            format!(
                "written by source-tda's table format {v}, this build reads format {}: rerun \
                 the stage that wrote it into a new --run-dir",
                crate::FORMAT_VERSION
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_carry_the_format_and_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_table(&path, &[("x", Column::U32(vec![1]))], &[]).unwrap();
        let (_, metadata) = open_table(&path).unwrap();
        assert_eq!(metadata[FORMAT_KEY], crate::FORMAT_VERSION.to_string());

        let other = (crate::FORMAT_VERSION + 1).to_string();
        write_table(
            &path,
            &[("x", Column::U32(vec![1]))],
            &[(FORMAT_KEY.to_string(), other.clone())],
        )
        .unwrap();
        let e = read_batches(&path).unwrap_err().to_string();
        assert!(e.contains("t.parquet"), "{e}");
        assert!(
            e.contains(&format!(
                "written by source-tda's table format {other}, this build reads format {}",
                crate::FORMAT_VERSION
            )),
            "{e}"
        );

        // Another tool's table (no key) is read.
        let plain = dir.path().join("plain.parquet");
        let batch = RecordBatch::try_from_iter([(
            "y",
            Arc::new(UInt32Array::from(vec![1u32])) as ArrayRef,
        )])
        .unwrap();
        write_batches(&plain, &[batch], None).unwrap();
        assert_eq!(read_batches(&plain).unwrap()[0].num_rows(), 1);
    }

    #[test]
    fn batches_round_trip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let columns = [
            ("x", Column::F64(vec![1.0, 2.0])),
            ("s", Column::Str(vec!["a".into(), "b".into()])),
        ];
        write_table(&path, &columns, &[]).unwrap();
        let read = read_batches(&path).unwrap();
        assert_eq!(read.iter().map(|b| b.num_rows()).sum::<usize>(), 2);

        let copy = dir.path().join("copy.parquet");
        write_batches(&copy, &read, None).unwrap();
        let again = read_batches(&copy).unwrap();
        assert_eq!(again.len(), read.len());
        for (a, b) in again.iter().zip(&read) {
            assert_eq!(a.columns(), b.columns());
        }
        assert!(!crate::util::fsx::temp_sibling(&copy).exists());

        std::fs::write(&path, b"not parquet").unwrap();
        let e = read_batches(&path).unwrap_err().to_string();
        assert!(e.contains("t.parquet"), "{e}");
        let e = write_batches(&dir.path().join("none.parquet"), &[], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.parquet"), "{e}");

        // A failed write (a second batch of another schema) leaves neither file behind.
        let other = RecordBatch::try_from_iter([(
            "y",
            Arc::new(UInt32Array::from(vec![1u32])) as ArrayRef,
        )])
        .unwrap();
        let bad = dir.path().join("bad.parquet");
        let e = write_batches(&bad, &[again[0].clone(), other], None).unwrap_err();
        assert!(e.to_string().contains("bad.parquet"), "{e}");
        assert!(!bad.exists());
        assert!(!crate::util::fsx::temp_sibling(&bad).exists());
    }
}
