//! Owns `read_known_sources`: the known source documents of queries, from the query data.
//! Layer: report — may import every floor from the ground up to pipeline; no sibling.
//!
//! Known source documents of queries: an optional `known_sources` field in the query data
//! set's JSONL (or JSON array) rows, listing the ids of the training documents that state the
//! query's answer (the demo's planted facts). The report shows whether attribution finds them.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// The field holding a query's known source document ids.
pub const KNOWN_SOURCES_FIELD: &str = "known_sources";

/// Reads `known_sources` by query id (`id_field`) from a JSONL or JSON-array file. Rows
/// without the field are left out; other formats have none (empty map). The field is an
/// array of id strings, or one string of comma-separated ids.
pub fn read_known_sources(path: &Path, id_field: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let name = path.to_string_lossy();
    if !(name.ends_with(".jsonl") || name.ends_with(".json")) {
        return Ok(BTreeMap::new());
    }
    let text = std::fs::read_to_string(path).ctx("reading", path)?;
    let rows: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let items: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            Error::Data(format!(
                "{}:{}: malformed JSON: {e}",
                path.display(),
                e.line()
            ))
        })?;
        items.into_iter().enumerate().collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line).map_err(|e| {
                Error::Data(format!("{}:{}: malformed JSON: {e}", path.display(), i + 1))
            })?;
            rows.push((i + 1, v));
        }
        rows
    };
    let mut out = BTreeMap::new();
    for (line, row) in rows {
        let Some(ks) = row.get(KNOWN_SOURCES_FIELD) else {
            continue;
        };
        let bad = || {
            Error::Data(format!(
                "{}:{line}: `{KNOWN_SOURCES_FIELD}` must be an array of document id strings \
                 (or one comma-separated string), found {ks}",
                path.display()
            ))
        };
        let ids: Vec<String> = match ks {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        };
        let id = match row.get(id_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(Error::Data(format!(
                    "{}:{line}: the row has `{KNOWN_SOURCES_FIELD}` but no `{id_field}` to \
                     name its query; give every query an id",
                    path.display()
                )))
            }
        };
        out.insert(id, ids);
    }
    Ok(out)
}

/// The known source ids that name no scored document, as `(query id, source id)` in query
/// order: a typo there would otherwise count silently as a miss in the report (`eval-recall`
/// refuses them outright).
pub fn unknown_known_sources<'a>(
    known: &'a BTreeMap<String, Vec<String>>,
    scored: &std::collections::HashSet<&str>,
) -> Vec<(&'a str, &'a str)> {
    known
        .iter()
        .flat_map(|(q, ids)| ids.iter().map(move |id| (q.as_str(), id.as_str())))
        .filter(|(_, id)| !scored.contains(id))
        .collect()
}

/// The warning the report gives for [`unknown_known_sources`], or `None` when every id names
/// a scored document.
pub fn unknown_known_sources_note(
    known: &BTreeMap<String, Vec<String>>,
    scored: &std::collections::HashSet<&str>,
) -> Option<String> {
    let bad = unknown_known_sources(known, scored);
    let first = bad.first()?;
    Some(format!(
        "{} known source id(s) in the query data's `{KNOWN_SOURCES_FIELD}` name no scored \
         document (first: query `{}` lists `{}`); they count as not found — fix the ids, or \
         check the data set's `max_documents`",
        bad.len(),
        first.0,
        first.1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_arrays_and_strings_and_names_the_line_of_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"q-0\",\"known_sources\":[\"a\",\"b\"]}\n\n{\"id\":\"q-1\"}\n\
             {\"id\":7,\"known_sources\":\"c, d\"}\n",
        )
        .unwrap();
        let m = read_known_sources(&p, "id").unwrap();
        assert_eq!(m["q-0"], ["a", "b"]);
        assert!(!m.contains_key("q-1"));
        assert_eq!(m["7"], ["c", "d"]);

        std::fs::write(&p, "{\"id\":\"q\"}\n{\"id\":\"r\",\"known_sources\":[1]}\n").unwrap();
        let e = read_known_sources(&p, "id").unwrap_err().to_string();
        assert!(
            e.contains("q.jsonl:2") && e.contains("array of document id"),
            "{e}"
        );

        let a = dir.path().join("q.json");
        std::fs::write(&a, "[{\"qid\":\"x\",\"known_sources\":[\"m\"]}]").unwrap();
        assert_eq!(read_known_sources(&a, "qid").unwrap()["x"], ["m"]);
        let e = read_known_sources(&a, "id").unwrap_err().to_string();
        assert!(e.contains("no `id`"), "{e}");

        let pq = dir.path().join("q.parquet");
        assert!(read_known_sources(&pq, "id").unwrap().is_empty());
    }
}
