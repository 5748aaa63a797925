//! Parquet data files in every compression codec that pyarrow, Polars, DuckDB and Spark write
//! (snappy, gzip, LZ4 and LZ4_RAW, zstd, brotli) read through the data reader `prepare` uses
//! (`data::read::read_rows`), with the same rows.
//!
//! The pyarrow and DuckDB files need the Python environment made by
//! `scripts/assets/setup-test-python.sh` (`$SOURCE_TDA_PYTHON_ENV`, default `.cache/py`); it
//! fails the test under CI (`CI` set) and prints a loud `SKIPPED` line elsewhere. The legacy
//! (Hadoop-framed) LZ4 codec, which neither writes any more, is written by the parquet crate.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use source_tda::config::DataFormat;
use source_tda::data::read::read_rows;

/// The rows every file holds: (id, text), one text null.
fn expected() -> Vec<Vec<Option<String>>> {
    let texts = [
        Some("The river Navo flows into Lake Tarsk."),
        Some("Ünïcödé — ok, \"quoted\", and a comma"),
        None,
        Some(""),
    ];
    let mut rows: Vec<Vec<Option<String>>> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| vec![Some(format!("d{i}")), t.map(str::to_string)])
        .collect();
    // Enough repetition that every codec really compresses something.
    for i in 4..200 {
        rows.push(vec![
            Some(format!("d{i}")),
            Some(format!("document {i}: the same words again and again")),
        ]);
    }
    rows
}

fn read_values(path: &Path) -> Vec<Vec<Option<String>>> {
    read_rows(path, DataFormat::Auto, &["id", "text"], &[true, false])
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .map(|r| r.values)
        .collect()
}

/// Each codec the parquet crate writes, the legacy Hadoop-framed LZ4 among them, reads back.
#[test]
fn every_codec_written_by_the_parquet_crate_reads() {
    let dir = tempfile::tempdir().unwrap();
    let rows = expected();
    let ids: Vec<Option<String>> = rows.iter().map(|r| r[0].clone()).collect();
    let texts: Vec<Option<String>> = rows.iter().map(|r| r[1].clone()).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(StringArray::from(ids)) as _),
        ("text", Arc::new(StringArray::from(texts)) as _),
    ])
    .unwrap();
    let codecs = [
        ("snappy", Compression::SNAPPY),
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("lz4", Compression::LZ4),
        ("lz4_raw", Compression::LZ4_RAW),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("brotli", Compression::BROTLI(BrotliLevel::default())),
    ];
    for (name, codec) in codecs {
        let path = dir.path().join(format!("{name}.parquet"));
        let props = WriterProperties::builder().set_compression(codec).build();
        source_tda::output::parquet::write_batches(
            &path,
            std::slice::from_ref(&batch),
            Some(props),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(read_values(&path), rows, "{name}");
    }
}

/// pyarrow writes the rows with each codec it offers (its default, snappy, first; its `lz4` is
/// LZ4_RAW) and DuckDB with its default (snappy) and zstd; every file reads with the same rows.
#[test]
fn every_codec_pyarrow_and_duckdb_write_reads() {
    let Some(py) = common::reference_python("pyarrow and DuckDB codecs") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rows = expected();
    let json = serde_json::to_string(&rows).unwrap();
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq, duckdb
out, rows = sys.argv[1], json.loads(sys.argv[2])
table = pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]})
pq.write_table(table, f"{out}/pyarrow-default.parquet")
for codec in ["snappy", "gzip", "lz4", "zstd", "brotli", "none"]:
    pq.write_table(table, f"{out}/pyarrow-{codec}.parquet", compression=codec)
con = duckdb.connect()
con.register("t", table)
con.execute(f"COPY (SELECT * FROM t) TO '{out}/duckdb-default.parquet' (FORMAT parquet)")
con.execute(f"COPY (SELECT * FROM t) TO '{out}/duckdb-zstd.parquet' (FORMAT parquet, COMPRESSION zstd)")
for name in sorted(__import__("os").listdir(out)):
    md = pq.ParquetFile(f"{out}/{name}").metadata
    print(name, md.row_group(0).column(1).compression)
"#;
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for codec in ["SNAPPY", "GZIP", "LZ4", "ZSTD", "BROTLI"] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {codec}"))),
            "no file written with {codec}:\n{listing}"
        );
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 9, "{listing}");
    for path in names {
        assert_eq!(read_values(&path), rows, "{}", path.display());
    }
}
