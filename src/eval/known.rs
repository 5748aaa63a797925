//! Owns reading each query's known source documents (and any query column's cells) from the
//! query data files.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no sibling.
//!
//! Each query's known source documents (planted facts): read from the query data set's
//! `[eval] known_sources_column`, which `prepare` does not keep. JSON/JSONL files may hold
//! a JSON array of ids (or one string); CSV and Parquet a string of ids separated by commas.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{DataFormat, DatasetConfig};
use crate::data::read::read_rows;
use crate::error::{Error, IoContext, Result};

/// One query row's value of a column.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The query id (`id_column`, else `SPLIT-ROW`).
    pub id: String,
    /// Where the row is, for messages: `FILE:LINE` (JSONL), `FILE:item I` (a JSON array) or
    /// `FILE` (CSV, Parquet).
    pub loc: String,
    /// The value: JSON as written (JSON/JSONL), a string (CSV, Parquet); None when absent or
    /// null.
    pub value: Option<serde_json::Value>,
}

/// Every query row's value of `column` in `files` (the query data set `ds`), in file order.
pub fn column_cells(files: &[&Path], ds: &DatasetConfig, column: &str) -> Result<Vec<Cell>> {
    let mut out = Vec::new();
    for file in files {
        let name = file.display().to_string();
        let json = matches!(
            crate::data::format_of(&name, ds.format),
            Some(DataFormat::Jsonl)
        );
        if json {
            out.extend(read_json(file, ds.id_column.as_deref(), column)?);
            continue;
        }
        let mut cols = vec![column];
        let mut req = vec![false];
        if let Some(id) = &ds.id_column {
            cols.push(id);
            req.push(true);
        }
        for r in read_rows(file, ds.format, &cols, &req)? {
            out.push(Cell {
                id: r.values.get(1).cloned().flatten().unwrap_or_default(),
                loc: name.clone(),
                value: r.values[0].clone().map(serde_json::Value::String),
            });
        }
    }
    // Without an id column a row's id is its place among all files' rows.
    for (row_index, c) in out.iter_mut().enumerate() {
        if ds.id_column.is_none() {
            c.id = format!("{}-{row_index}", ds.split);
        }
    }
    Ok(out)
}

/// Known source ids by query id, for the queries that list any.
pub fn read_known_sources(
    files: &[&Path],
    ds: &DatasetConfig,
    column: &str,
) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for cell in column_cells(files, ds, column)? {
        let bad = |what: &str| {
            Error::Data(format!(
                "{}: column `{column}` (eval.known_sources_column) {what}; expected a list of \
                 document ids such as [\"doc-1\", \"doc-7\"]",
                cell.loc
            ))
        };
        let sources: Vec<String> = match &cell.value {
            None => Vec::new(),
            Some(serde_json::Value::String(s)) => s
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => Ok(s.clone()),
                    serde_json::Value::Number(n) => Ok(n.to_string()),
                    _ => Err(bad("holds a list with a non-string entry")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("holds neither a list nor a string")),
        };
        if !sources.is_empty() {
            out.insert(cell.id, sources);
        }
    }
    Ok(out)
}

/// The cells of `column` in a JSONL file or JSON array.
fn read_json(path: &Path, id_column: Option<&str>, column: &str) -> Result<Vec<Cell>> {
    let text = std::fs::read_to_string(path).ctx("reading", path)?;
    let items: Vec<(String, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            Error::Data(format!(
                "{}:{}: malformed JSON: {e}",
                path.display(),
                e.line()
            ))
        })?;
        v.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("item {i}"), v))
            .collect()
    } else {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let val = serde_json::from_str(line).map_err(|e| {
                Error::Data(format!(
                    "{}:{}: malformed JSON line ({e})",
                    path.display(),
                    i + 1
                ))
            })?;
            v.push(((i + 1).to_string(), val));
        }
        v
    };
    items
        .into_iter()
        .map(|(loc, v)| {
            let id = match id_column {
                Some(c) => match v.get(c) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => n.to_string(),
                    _ => {
                        return Err(Error::Data(format!(
                            "{}:{loc}: no id in column `{c}`",
                            path.display()
                        )))
                    }
                },
                None => String::new(),
            };
            let value = v.get(column).filter(|x| !x.is_null()).cloned();
            Ok(Cell {
                id,
                loc: format!("{}:{loc}", path.display()),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(id_column: Option<&str>) -> DatasetConfig {
        let mut d: DatasetConfig = toml::from_str("id = \"x\"\nsplit = \"queries\"").unwrap();
        d.id_column = id_column.map(str::to_string);
        d
    }

    #[test]
    fn reads_lists_strings_and_default_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queries.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"known_sources\":[\"d1\",\"d2\"]}\n\n{\"id\":\"b\"}\n\
             {\"id\":\"c\",\"known_sources\":\"d3, d4\"}\n",
        )
        .unwrap();
        let k = read_known_sources(&[&p], &ds(Some("id")), "known_sources").unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k["a"], vec!["d1", "d2"]);
        assert_eq!(k["c"], vec!["d3", "d4"]);
        let k = read_known_sources(&[&p], &ds(None), "known_sources").unwrap();
        assert_eq!(k["queries-2"], vec!["d3", "d4"]);

        let csv = dir.path().join("q.csv");
        std::fs::write(&csv, "id,known_sources\na,\"d1,d2\"\nb,\n").unwrap();
        let k = read_known_sources(&[&csv], &ds(Some("id")), "known_sources").unwrap();
        assert_eq!(k.len(), 1);
        assert_eq!(k["a"], vec!["d1", "d2"]);
    }

    #[test]
    fn a_wrong_value_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queries.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"src\":[\"d1\"]}\n{\"id\":\"b\",\"src\":{}}\n",
        )
        .unwrap();
        let e = read_known_sources(&[&p], &ds(Some("id")), "src")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queries.jsonl:2"), "{e}");
        assert!(
            e.contains("`src`") && e.contains("eval.known_sources_column"),
            "{e}"
        );
    }
}
