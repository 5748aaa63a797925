//! Owns `read_rows` and `format_of`: rows of named string columns from JSONL, CSV and Parquet.
//! Layer: data — may import the ground, linalg, backend, model and, in this folder, cells.rs.
//!
//! Reading rows of named string columns from JSONL, CSV and Parquet files, with errors that
//! name the file and the line (or row) that is wrong.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::config::DataFormat;
use crate::error::{Error, IoContext, Result};

use super::cells::json_value;

/// File extensions read as data, by format.
pub const DATA_EXTENSIONS: [(&str, DataFormat); 5] = [
    ("jsonl", DataFormat::Jsonl),
    ("ndjson", DataFormat::Jsonl),
    ("json", DataFormat::Jsonl),
    ("csv", DataFormat::Csv),
    ("parquet", DataFormat::Parquet),
];

/// The format a data file is read as.
pub fn format_of(name: &str, configured: DataFormat) -> Option<DataFormat> {
    if configured != DataFormat::Auto {
        return Some(configured);
    }
    let ext = Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())?;
    DATA_EXTENSIONS
        .iter()
        .find(|(e, _)| *e == ext)
        .map(|(_, f)| *f)
}

/// One row: where it came from and the requested columns' values (`None`: null or absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `FILE:LINE` (JSONL, CSV) or `FILE:row N` (Parquet, 0-based), for messages.
    pub location: String,
    /// Values of the requested columns, in request order.
    pub values: Vec<Option<String>>,
}

/// Reads `columns` from every row of `path`. `required[i]` says whether column i must exist
/// in the file, and in JSON rows hold a value, not null (optional columns read as `None` when
/// absent or null).
pub fn read_rows(
    path: &Path,
    format: DataFormat,
    columns: &[&str],
    required: &[bool],
) -> Result<Vec<Row>> {
    read_rows_json(path, format, columns, required, &vec![false; columns.len()])
}

/// [`read_rows`], with the columns where `json[i]` holds structured values (lists, objects:
/// a `messages` conversation) read as their JSON text (a CSV cell is taken as JSON text).
pub fn read_rows_json(
    path: &Path,
    format: DataFormat,
    columns: &[&str],
    required: &[bool],
    json: &[bool],
) -> Result<Vec<Row>> {
    let name = path.display().to_string();
    let format = format_of(&name, format).ok_or_else(|| {
        Error::Data(format!(
            "{name}: cannot tell the format from the extension; set `format` to jsonl, csv or \
             parquet"
        ))
    })?;
    match format {
        DataFormat::Jsonl => read_jsonl(path, columns, required, json),
        DataFormat::Csv => read_csv(path, columns, required),
        DataFormat::Parquet => read_parquet(path, columns, required, json),
        DataFormat::Auto => unreachable!("format_of resolves auto"),
    }
}

fn missing_column(path: &Path, col: &str, available: &[String], where_: &str) -> Error {
    Error::Data(format!(
        "{}{where_}: no column `{col}`; columns present: {}. Set the column name in the data \
         set's config (text_column, prompt_column, completion_column, id_column).",
        path.display(),
        if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        }
    ))
}

fn read_jsonl(path: &Path, columns: &[&str], required: &[bool], json: &[bool]) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).ctx("reading", path)?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    // A `.json` file holding one array of objects is accepted too.
    if first == Some(&b'[') {
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            Error::Data(format!(
                "{}: not valid UTF-8 (at byte {}); re-encode the file as UTF-8",
                path.display(),
                e.valid_up_to()
            ))
        })?;
        let items: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
            Error::Data(format!(
                "{}:{}: malformed JSON: {e}",
                path.display(),
                e.line()
            ))
        })?;
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| json_row(path, &format!("item {i}"), v, columns, required, json))
            .collect();
    }
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let lineno = i + 1;
        let line = std::str::from_utf8(line).map_err(|e| {
            Error::Data(format!(
                "{}:{lineno}: not valid UTF-8 (at byte {} of the line); re-encode the file as \
                 UTF-8",
                path.display(),
                e.valid_up_to()
            ))
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::Data(format!(
                "{}:{lineno}: malformed JSON line ({e}); each line must be one JSON object",
                path.display()
            ))
        })?;
        rows.push(json_row(
            path,
            &lineno.to_string(),
            &v,
            columns,
            required,
            json,
        )?);
    }
    Ok(rows)
}

fn json_row(
    path: &Path,
    loc: &str,
    v: &serde_json::Value,
    columns: &[&str],
    required: &[bool],
    json: &[bool],
) -> Result<Row> {
    let obj = v.as_object().ok_or_else(|| {
        Error::Data(format!(
            "{}:{loc}: expected a JSON object with the data set's columns, found {}",
            path.display(),
            json_kind(v)
        ))
    })?;
    let mut values = Vec::with_capacity(columns.len());
    for ((col, req), as_json) in columns.iter().zip(required).zip(json) {
        match obj.get(*col) {
            None if *req => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                return Err(missing_column(path, col, &keys, &format!(":{loc}")));
            }
            Some(serde_json::Value::Null) if *req => {
                return Err(Error::Data(format!(
                    "{}:{loc}: column `{col}` is null; every row needs a value there (a string)",
                    path.display()
                )))
            }
            None | Some(serde_json::Value::Null) => values.push(None),
            Some(serde_json::Value::String(s)) => values.push(Some(s.clone())),
            Some(other) if *as_json => values.push(Some(other.to_string())),
            Some(serde_json::Value::Number(n)) => values.push(Some(n.to_string())),
            Some(other) => {
                return Err(Error::Data(format!(
                    "{}:{loc}: column `{col}` holds {}, expected a string",
                    path.display(),
                    json_kind(other)
                )))
            }
        }
    }
    Ok(Row {
        location: format!("{}:{loc}", path.display()),
        values,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_csv(path: &Path, columns: &[&str], required: &[bool]) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let headers = reader
        .byte_headers()
        .map_err(|e| Error::Data(format!("{}:1: reading the header row: {e}", path.display())))?
        .clone();
    let header_names: Vec<String> = headers
        .iter()
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    let mut idx = Vec::new();
    for (col, req) in columns.iter().zip(required) {
        match header_names.iter().position(|h| h == col) {
            Some(i) => idx.push(Some(i)),
            None if *req => return Err(missing_column(path, col, &header_names, ":1")),
            None => idx.push(None),
        }
    }
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let more = reader.read_byte_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            Error::Data(format!("{}:{line}: malformed CSV: {e}", path.display()))
        })?;
        if !more {
            break;
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let mut values = Vec::with_capacity(idx.len());
        for (k, i) in idx.iter().enumerate() {
            let Some(i) = i else {
                values.push(None);
                continue;
            };
            let field = record.get(*i).ok_or_else(|| {
                Error::Data(format!(
                    "{}:{line}: the row has {} fields but the header has {}",
                    path.display(),
                    record.len(),
                    header_names.len()
                ))
            })?;
            let s = std::str::from_utf8(field).map_err(|e| {
                Error::Data(format!(
                    "{}:{line}: column `{}` is not valid UTF-8 (at byte {} of the field); \
                     re-encode the file as UTF-8",
                    path.display(),
                    columns[k],
                    e.valid_up_to()
                ))
            })?;
            values.push(Some(s.to_string()));
        }
        rows.push(Row {
            location: format!("{}:{line}", path.display()),
            values,
        });
    }
    Ok(rows)
}

fn read_parquet(
    path: &Path,
    columns: &[&str],
    required: &[bool],
    json: &[bool],
) -> Result<Vec<Row>> {
    let file = std::fs::File::open(path).ctx("opening", path)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    })?;
    let schema = builder.schema().clone();
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    for (col, req) in columns.iter().zip(required) {
        if *req && !names.iter().any(|n| n == col) {
            return Err(missing_column(path, col, &names, ""));
        }
    }
    let reader = builder
        .build()
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let mut rows = Vec::new();
    let mut base = 0usize;
    for batch in reader {
        let batch: RecordBatch =
            batch.map_err(|e| Error::Data(format!("{}: reading rows: {e}", path.display())))?;
        let n = batch.num_rows();
        let mut cols: Vec<Vec<Option<String>>> = Vec::new();
        for (col, as_json) in columns.iter().zip(json) {
            match batch.column_by_name(col) {
                None => cols.push(vec![None; n]),
                Some(a) if *as_json => cols.push(
                    (0..n)
                        .map(|r| match json_value(a.as_ref(), r) {
                            Ok(serde_json::Value::Null) => Ok(None),
                            Ok(serde_json::Value::String(s)) => Ok(Some(s)),
                            Ok(v) => Ok(Some(v.to_string())),
                            Err(e) => Err(Error::Data(format!(
                                "{}:row {}: column `{col}`: {e}",
                                path.display(),
                                base + r
                            ))),
                        })
                        .collect::<Result<_>>()?,
                ),
                Some(a) => cols.push(string_values(path, col, a.as_ref(), base)?),
            }
        }
        for r in 0..n {
            rows.push(Row {
                location: format!("{}:row {}", path.display(), base + r),
                values: cols.iter().map(|c| c[r].clone()).collect(),
            });
        }
        base += n;
    }
    Ok(rows)
}

/// A Parquet column's values as strings (string, large string, string view, binary holding
/// UTF-8, or integers for id columns).
fn string_values(
    path: &Path,
    col: &str,
    a: &dyn Array,
    base: usize,
) -> Result<Vec<Option<String>>> {
    let n = a.len();
    let get = |i: usize, f: &dyn Fn(usize) -> String| if a.is_null(i) { None } else { Some(f(i)) };
    let out: Vec<Option<String>> = match a.data_type() {
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            (0..n)
                .map(|i| get(i, &|i| s.value(i).to_string()))
                .collect()
        }
        DataType::LargeUtf8 => {
            let s = a.as_string::<i64>();
            (0..n)
                .map(|i| get(i, &|i| s.value(i).to_string()))
                .collect()
        }
        DataType::Utf8View => {
            let s = a.as_string_view();
            (0..n)
                .map(|i| get(i, &|i| s.value(i).to_string()))
                .collect()
        }
        DataType::Binary | DataType::LargeBinary => {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                if a.is_null(i) {
                    out.push(None);
                    continue;
                }
                let bytes: &[u8] = if *a.data_type() == DataType::Binary {
                    a.as_binary::<i32>().value(i)
                } else {
                    a.as_binary::<i64>().value(i)
                };
                let s = std::str::from_utf8(bytes).map_err(|e| {
                    Error::Data(format!(
                        "{}:row {}: column `{col}` is not valid UTF-8 (at byte {})",
                        path.display(),
                        base + i,
                        e.valid_up_to()
                    ))
                })?;
                out.push(Some(s.to_string()));
            }
            out
        }
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => {
            let c = arrow_cast_to_i128(a);
            (0..n).map(|i| c[i].map(|v| v.to_string())).collect()
        }
        other => {
            return Err(Error::Data(format!(
                "{}: column `{col}` has type {other}, expected strings",
                path.display()
            )))
        }
    };
    Ok(out)
}

fn arrow_cast_to_i128(a: &dyn Array) -> Vec<Option<i128>> {
    use arrow_array::types::*;
    macro_rules! ints {
        ($t:ty) => {{
            let p = a.as_primitive::<$t>();
            (0..p.len())
                .map(|i| (!p.is_null(i)).then(|| p.value(i) as i128))
                .collect()
        }};
    }
    match a.data_type() {
        DataType::Int8 => ints!(Int8Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int64 => ints!(Int64Type),
        DataType::UInt8 => ints!(UInt8Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt32 => ints!(UInt32Type),
        _ => ints!(UInt64Type),
    }
}
