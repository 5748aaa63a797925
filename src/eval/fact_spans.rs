//! Owns reading where each known source document states its query's fact (the fact spans).
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; sibling
//! `known` (the query column's cells).
//!
//! A query row may give, in `[eval] fact_spans_column` (default `fact_spans`), the character
//! spans of each known source document's text that state the fact the query asks about:
//! a JSON object from source id to a list of half-open `[start, end)` character offsets
//! (Unicode scalar values, as Python's `str` counts), e.g.
//! `{"planted-0-0": [[26, 37]], "planted-0-1": [[0, 11], [53, 64]]}`; in CSV or Parquet a
//! string holding that JSON. `eval-recall` measures token-span recall on them
//! ([`super::token_span`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::known::column_cells;
use crate::config::DatasetConfig;
use crate::error::{Error, Result};

/// One query's fact spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySpans {
    /// Where the query row is (`FILE:LINE`), for messages.
    pub loc: String,
    /// Character spans `[start, end)` by known source id, each list sorted.
    pub spans: BTreeMap<String, Vec<(usize, usize)>>,
}

/// Fact spans by query id, for the queries that give any, checked for form: an object of
/// lists of `[start, end]` pairs of integers with `start < end`. That each key is a known
/// source of its query and each span lies inside the document's text is checked by
/// [`check_spans`] and by the caller, which has the texts.
pub fn read_fact_spans(
    files: &[&Path],
    ds: &DatasetConfig,
    column: &str,
) -> Result<BTreeMap<String, QuerySpans>> {
    let mut out = BTreeMap::new();
    for cell in column_cells(files, ds, column)? {
        let bad = |what: String| {
            Error::Data(format!(
                "{}: column `{column}` (eval.fact_spans_column) {what}; expected an object from \
                 known source id to character spans [start, end) of its text, such as \
                 {{\"doc-7\": [[12, 23]]}}",
                cell.loc
            ))
        };
        let value = match cell.value {
            None => continue,
            Some(Value::String(s)) if s.trim().is_empty() => continue,
            Some(Value::String(s)) => serde_json::from_str::<Value>(&s)
                .map_err(|e| bad(format!("is a string that is not JSON ({e})")))?,
            Some(v) => v,
        };
        let Value::Object(map) = value else {
            return Err(bad("is not an object".into()));
        };
        let mut spans = BTreeMap::new();
        for (source, list) in map {
            let Value::Array(list) = list else {
                return Err(bad(format!("gives `{source}` something other than a list")));
            };
            let mut v = Vec::with_capacity(list.len());
            for span in &list {
                let pair = span
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)));
                match pair {
                    Some((a, b)) if a < b => v.push((a as usize, b as usize)),
                    _ => {
                        return Err(bad(format!(
                            "gives `{source}` the span {span}, which is not [start, end] with \
                             integers 0 ≤ start < end"
                        )))
                    }
                }
            }
            if v.is_empty() {
                return Err(bad(format!("gives `{source}` no span")));
            }
            v.sort_unstable();
            spans.insert(source, v);
        }
        if !spans.is_empty() {
            out.insert(
                cell.id,
                QuerySpans {
                    loc: cell.loc,
                    spans,
                },
            );
        }
    }
    Ok(out)
}

/// Checks that every source with spans is one of its query's known sources (`known`, by
/// query id) and that the query lists known sources at all; the error names the row.
pub fn check_spans(
    spans: &BTreeMap<String, QuerySpans>,
    known: &BTreeMap<String, Vec<String>>,
    column: &str,
    known_column: &str,
) -> Result<()> {
    for (query, qs) in spans {
        let listed = known.get(query).map(Vec::as_slice).unwrap_or_default();
        for source in qs.spans.keys() {
            if !listed.contains(source) {
                return Err(Error::Data(format!(
                    "{}: query `{query}` gives fact spans (column `{column}`) for `{source}`, \
                     which is not among its known sources (column `{known_column}`: {listed:?}); \
                     add it there or fix the id",
                    qs.loc
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> DatasetConfig {
        let mut d: DatasetConfig = toml::from_str("id = \"x\"\nsplit = \"queries\"").unwrap();
        d.id_column = Some("id".into());
        d
    }

    #[test]
    fn reads_objects_and_json_strings_and_skips_rows_without_spans() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queries.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"fact_spans\":{\"d1\":[[5,9],[0,3]]}}\n{\"id\":\"b\"}\n\
             {\"id\":\"c\",\"fact_spans\":\"{\\\"d2\\\": [[1, 2]]}\"}\n",
        )
        .unwrap();
        let s = read_fact_spans(&[&p], &ds(), "fact_spans").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["a"].spans["d1"], vec![(0, 3), (5, 9)]);
        assert_eq!(s["a"].loc, format!("{}:1", p.display()));
        assert_eq!(s["c"].spans["d2"], vec![(1, 2)]);

        let csv = dir.path().join("q.csv");
        std::fs::write(&csv, "id,fact_spans\na,\"{\"\"d1\"\": [[0, 4]]}\"\nb,\n").unwrap();
        let s = read_fact_spans(&[&csv], &ds(), "fact_spans").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s["a"].spans["d1"], vec![(0, 4)]);
    }

    #[test]
    fn malformed_spans_name_the_row_the_column_and_the_span() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("queries.jsonl");
        for (row, needle) in [
            ("{\"id\":\"a\",\"fact_spans\":[[0,3]]}", "is not an object"),
            ("{\"id\":\"a\",\"fact_spans\":{\"d1\":[[3,3]]}}", "[3,3]"),
            ("{\"id\":\"a\",\"fact_spans\":{\"d1\":[[-1,3]]}}", "[-1,3]"),
            (
                "{\"id\":\"a\",\"fact_spans\":{\"d1\":[[0,1,2]]}}",
                "[0,1,2]",
            ),
            ("{\"id\":\"a\",\"fact_spans\":{\"d1\":[]}}", "no span"),
            ("{\"id\":\"a\",\"fact_spans\":\"{oops\"}", "not JSON"),
        ] {
            std::fs::write(&p, format!("{{\"id\":\"z\"}}\n{row}\n")).unwrap();
            let e = read_fact_spans(&[&p], &ds(), "fact_spans")
                .unwrap_err()
                .to_string();
            assert!(e.contains("queries.jsonl:2"), "{e}");
            assert!(e.contains("eval.fact_spans_column"), "{e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn spans_of_a_document_that_is_not_a_known_source_are_an_error() {
        let spans = BTreeMap::from([(
            "q".to_string(),
            QuerySpans {
                loc: "f.jsonl:3".into(),
                spans: BTreeMap::from([("d9".to_string(), vec![(0, 1)])]),
            },
        )]);
        let known = BTreeMap::from([("q".to_string(), vec!["d1".to_string()])]);
        let e = check_spans(&spans, &known, "fact_spans", "known_sources")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.jsonl:3") && e.contains("`d9`") && e.contains("d1"),
            "{e}"
        );
        let known = BTreeMap::from([("q".to_string(), vec!["d9".to_string()])]);
        check_spans(&spans, &known, "fact_spans", "known_sources").unwrap();
    }
}
