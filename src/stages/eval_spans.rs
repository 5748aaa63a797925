//! Owns token-span recall in `eval-recall`: the fact spans of known sources as token sets,
//! and each method's per-token scores of those sources measured against them.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `eval_methods` (where each method's scores are).
//!
//! The queries' fact spans ([`crate::eval::read_fact_spans`]) are character spans of the
//! known sources' texts; each becomes the set S of the document's tokens whose character
//! range ([`crate::data::token_char_ranges`], the partition the tables' `token_text` is cut
//! by) overlaps it. A method's per-token scores of the document for the query come from its
//! `score/token_scores.parquet`, which holds the top `[attribution] top_k` documents of each
//! query (or all, with `all_token_scores`): a known source without per-token scores there is
//! counted as not measured, not as a miss. token-span recall@k is
//! [`crate::eval::token_span`]'s.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::json;

use crate::config::Config;
use crate::data::{token_char_ranges, PreparedDoc};
use crate::error::{Error, IoContext, Result};
use crate::eval::{best_span_rank, chance_recall, span_tokens, token_span_recall, QuerySpans};

/// One (query, known source) pair with a fact span on the source's tokens.
#[derive(Debug, Clone)]
pub struct SpanPair {
    /// The query id.
    pub query_id: String,
    /// The known source's id.
    pub source: String,
    /// The source's tokens' character ranges (None: a special token).
    pub ranges: Vec<Option<(usize, usize)>>,
    /// Its text, to show the top token.
    pub chars: Vec<char>,
    /// S: the tokens on the fact span, ascending.
    pub span: Vec<usize>,
}

/// The (query, known source) pairs to measure: every source a query gives fact spans for,
/// with its spans checked against the document's text (each end within its length in
/// characters) and mapped to its tokens. `docs` are the fine-tuning documents by id;
/// `special` whether they were tokenised with special tokens. A pair whose spans cover no
/// token (past truncation) is left out with a warning.
pub fn span_pairs(
    spans: &BTreeMap<String, QuerySpans>,
    docs: &HashMap<&str, &PreparedDoc>,
    tokenizer: &tokenizers::Tokenizer,
    special: bool,
    column: &str,
) -> Result<Vec<SpanPair>> {
    let mut out = Vec::new();
    for (query, qs) in spans {
        for (source, list) in &qs.spans {
            let doc = docs.get(source.as_str()).ok_or_else(|| {
                Error::Pipeline(format!(
                    "{}: query `{query}` gives fact spans for `{source}`, which is not a \
                     document of the fine-tuning set",
                    qs.loc
                ))
            })?;
            let chars: Vec<char> = doc.text.chars().collect();
            if let Some(&(s, e)) = list.iter().find(|(_, e)| *e > chars.len()) {
                return Err(Error::Data(format!(
                    "{}: query `{query}`'s fact span [{s}, {e}) of `{source}` (column \
                     `{column}`) ends past its text, which has {} characters; spans are \
                     character offsets [start, end) into the document's text",
                    qs.loc,
                    chars.len()
                )));
            }
            let ranges = token_char_ranges(tokenizer, &doc.text, &doc.input_ids, special)
                .ok_or_else(|| {
                    Error::Pipeline(format!(
                        "`{source}`'s text does not tokenise back to its prepared token ids; \
                         rerun the prepare stage"
                    ))
                })?;
            let span = span_tokens(&ranges, list);
            if span.is_empty() {
                tracing::warn!(
                    "eval-recall: query `{query}`'s fact spans of `{source}` cover none of its \
                     {} tokens (cut by max_length?); the pair is not measured",
                    ranges.len()
                );
                continue;
            }
            out.push(SpanPair {
                query_id: query.clone(),
                source: source.clone(),
                ranges,
                chars,
                span,
            });
        }
    }
    Ok(out)
}

/// Per-token scores of the wanted (query, document) pairs in a `token_scores.parquet`, each
/// indexed by token position; pairs the file does not hold are absent.
fn read_token_scores(
    path: &Path,
    wanted: &HashMap<(&str, &str), usize>,
) -> Result<HashMap<(String, String), Vec<f64>>> {
    let mut out: HashMap<(String, String), Vec<f64>> = HashMap::new();
    let file = std::fs::File::open(path).ctx("opening", path)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| Error::parquet(path, e))?;
    for batch in reader {
        let b = batch.map_err(|e| Error::parquet(path, e))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| Error::parquet(path, format!("no `{name}` column")))
        };
        let (q, d) = (
            col("query_id")?.as_string::<i32>().clone(),
            col("train_id")?.as_string::<i32>().clone(),
        );
        let t = col("token_index")?.as_primitive::<UInt32Type>().clone();
        let s = col("score")?.as_primitive::<Float32Type>().clone();
        for i in 0..b.num_rows() {
            let Some(&n) = wanted.get(&(q.value(i), d.value(i))) else {
                continue;
            };
            let (ti, si) = (t.value(i) as usize, s.value(i) as f64);
            if ti >= n {
                return Err(Error::parquet(
                    path,
                    format!(
                        "token_index {ti} of query `{}` and document `{}` is past its {n} \
                         tokens; rerun the score stage",
                        q.value(i),
                        d.value(i)
                    ),
                ));
            }
            let v = out
                .entry((q.value(i).to_string(), d.value(i).to_string()))
                .or_insert_with(|| vec![f64::NAN; n]);
            v[ti] = si;
        }
    }
    for ((q, d), v) in &out {
        if let Some(t) = v.iter().position(|x| x.is_nan()) {
            return Err(Error::parquet(
                path,
                format!("query `{q}` and document `{d}` have no score for token {t}"),
            ));
        }
    }
    Ok(out)
}

/// The rows of `eval-recall/token_span.parquet`, one per measured (method, pair).
#[derive(Default)]
pub struct SpanRows {
    method: Vec<String>,
    query_id: Vec<String>,
    known_source: Vec<String>,
    n_tokens: Vec<u32>,
    n_span_tokens: Vec<u32>,
    best_span_rank: Vec<u32>,
    top_token_index: Vec<u32>,
    top_token_text: Vec<String>,
    top_token_in_span: Vec<bool>,
}

impl SpanRows {
    /// The table's columns.
    pub fn columns(self) -> Vec<(&'static str, crate::output::Column)> {
        use crate::output::Column;
        vec![
            ("method", Column::Str(self.method)),
            ("query_id", Column::Str(self.query_id)),
            ("known_source", Column::Str(self.known_source)),
            ("n_tokens", Column::U32(self.n_tokens)),
            ("n_span_tokens", Column::U32(self.n_span_tokens)),
            ("best_span_rank", Column::U32(self.best_span_rank)),
            ("top_token_index", Column::U32(self.top_token_index)),
            ("top_token_text", Column::Str(self.top_token_text)),
            ("top_token_in_span", Column::Bool(self.top_token_in_span)),
        ]
    }
}

/// Token-span recall@k of one method over `pairs`, from the `token_scores.parquet` beside
/// its `scores_path`: the summary's `token_span` object (pairs measured and not, mean
/// recall@k and its chance level for each k of `[eval] k`), adding one row per measured
/// pair to `rows`.
pub fn method_span_recall(
    c: &Config,
    method: &str,
    scores_path: &Path,
    pairs: &[SpanPair],
    rows: &mut SpanRows,
) -> Result<serde_json::Value> {
    let path = scores_path.with_file_name("token_scores.parquet");
    let wanted: HashMap<(&str, &str), usize> = pairs
        .iter()
        .map(|p| ((p.query_id.as_str(), p.source.as_str()), p.ranges.len()))
        .collect();
    let scores = read_token_scores(&path, &wanted)?;
    let ks = &c.eval.k;
    let (mut recall, mut chance) = (vec![0.0; ks.len()], vec![0.0; ks.len()]);
    let mut measured = 0usize;
    for p in pairs {
        let Some(s) = scores.get(&(p.query_id.clone(), p.source.clone())) else {
            continue;
        };
        measured += 1;
        for (i, &k) in ks.iter().enumerate() {
            recall[i] += token_span_recall(s, &p.span, k);
            chance[i] += chance_recall(s.len(), p.span.len(), k);
        }
        // The top token: highest score, a tie going to a token off the span.
        let top = (0..s.len())
            .max_by(|&a, &b| {
                s[a].total_cmp(&s[b])
                    .then(p.span.contains(&b).cmp(&p.span.contains(&a)))
                    .then(b.cmp(&a))
            })
            .unwrap_or(0);
        let text = p.ranges[top]
            .map(|(a, b)| p.chars[a..b].iter().collect())
            .unwrap_or_default();
        rows.method.push(method.to_string());
        rows.query_id.push(p.query_id.clone());
        rows.known_source.push(p.source.clone());
        rows.n_tokens.push(s.len() as u32);
        rows.n_span_tokens.push(p.span.len() as u32);
        rows.best_span_rank
            .push(best_span_rank(s, &p.span).unwrap_or(0));
        rows.top_token_index.push(top as u32);
        rows.top_token_text.push(text);
        rows.top_token_in_span.push(p.span.contains(&top));
    }
    if measured < pairs.len() {
        tracing::info!(
            "eval-recall: {method}: {} of {} known sources with fact spans have no per-token \
             scores in {} (not among the top {} documents of their query; \
             `[attribution] all_token_scores = true` scores every document's tokens)",
            pairs.len() - measured,
            pairs.len(),
            path.display(),
            c.attribution.top_k
        );
    }
    let mean = |v: &[f64]| -> serde_json::Map<String, serde_json::Value> {
        ks.iter()
            .zip(v)
            .map(|(k, x)| {
                let m = (measured > 0).then(|| x / measured as f64);
                (k.to_string(), json!(m))
            })
            .collect()
    };
    Ok(
        json!({"n_pairs": measured, "n_pairs_without_token_scores": pairs.len() - measured,
              "recall": mean(&recall), "chance": mean(&chance)}),
    )
}
