//! Owns the merge of a sharded `score`: the shards' partial tables ranked again into the
//! tables an unsharded `score` writes.
//! Layer: stages — may import every library layer (ground up to pipeline and report);
//! siblings `score_docs`, `score_meta`, `score_shard`, `score_write`.
//!
//! Each shard wrote its rows with their document index j (the unsharded order) and their
//! segment scores, bitwise the unsharded ones (design.md §11). The union of the shards' rows
//! holds, per query, every document (without `keep_top_bottom`) or each shard's first
//! max(K, top_k) and last K, which contain the global first max(K, top_k) and last K: a
//! document among the global first K is among its own shard's first K. Ranking the union by
//! (τ descending, j) with the unsharded code ([`write_scores`], [`Kept`]) among all N
//! documents gives the unsharded rows and ranks; the token rows of the global top_k are
//! among the shards' (each shard wrote its own top_k's), and `train_docs.parquet` is the
//! shards' documents by j. The merge holds the rows it reads: O(N) without
//! `keep_top_bottom`, O(shards × queries × K) with it; and the documents' texts, O(N).

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::error::{Error, IoContext, Result};
use crate::output::dataset::{part_files, shard_dir, PartWriter, FIRST_PART};
use crate::output::keep::Ranked;
use crate::output::parquet::ROW_GROUP;
use crate::output::score_rows::{write_scores, Keep, Kept, ScoreTable, ScoredDoc};
use crate::output::{write_table, Column};
use crate::pipeline::{scores_root_in_stage, StageContext};
use crate::report::table::Table;

use super::score_docs::all_tokens;
use super::score_meta::table_metadata;
use super::score_shard::{shard_folder, ScoreShardRecord};
use super::score_write::read_query_ids;

/// Files a shard computed alike to every other (from the queries, not the documents): the
/// merge takes the first shard's.
const SHARED: [&str; 4] = [
    "queries.parquet",
    "acting.json",
    "refine.json",
    "refined_queries.safetensors",
];

/// One scores row of a shard: query position, document index, its document, segment values.
struct Row {
    q: usize,
    j: u64,
    seg: Vec<f64>,
}

fn int(t: &Table, name: &str) -> Result<Vec<u64>> {
    Ok(t.floats(name)?.into_iter().map(|x| x as u64).collect())
}

/// Writes the merged tables of `set` into the stage's folder; returns the stage's summary.
pub(super) fn merge(ctx: &StageContext, set: &[ScoreShardRecord]) -> Result<serde_json::Value> {
    let first = shard_folder(ctx.run, set[0].shard);
    for f in SHARED {
        let from = first.join(f);
        if from.exists() {
            std::fs::copy(&from, ctx.out(f)).ctx("copying", &from)?;
        }
    }
    let query_ids = read_query_ids(&ctx.out("queries.parquet"))?;
    let q_of: HashMap<&str, usize> = (query_ids.iter().enumerate())
        .map(|(i, q)| (q.as_str(), i))
        .collect();
    let n = set[0].total_documents;
    tracing::info!("score: merging {} shards ({n} documents)", set.len());

    // The union of the shards' rows, and each document's id, data set and N.
    let mut seg_names: Vec<String> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut docs: BTreeMap<u64, ScoredDoc> = BTreeMap::new();
    for rec in set {
        let root = shard_folder(ctx.run, rec.shard).join(scores_root_in_stage(None));
        for part in part_files(&root)? {
            let t = Table::read(&part)?;
            let names: Vec<String> = (t.column_names().into_iter())
                .filter(|c| c.starts_with("segment_"))
                .collect();
            if seg_names.is_empty() {
                seg_names = names.clone();
            } else if names != seg_names {
                return Err(Error::Pipeline(format!(
                    "{}: segment columns {names:?}, another shard's are {seg_names:?}; rerun \
                     every shard",
                    part.display()
                )));
            }
            let (qid, tid, ds) = (
                t.strings("query_id")?,
                t.strings("train_id")?,
                t.strings("dataset")?,
            );
            let (nt, j) = (t.u32s("n_train")?, int(&t, "doc_index")?);
            let segs: Vec<Vec<f64>> = (names.iter()).map(|c| t.floats(c)).collect::<Result<_>>()?;
            for i in 0..t.len() {
                let q = *q_of.get(qid[i].as_str()).ok_or_else(|| {
                    Error::Pipeline(format!(
                        "{}: query `{}` is not in queries.parquet; rerun every shard",
                        part.display(),
                        qid[i]
                    ))
                })?;
                docs.entry(j[i]).or_insert_with(|| ScoredDoc {
                    train_id: tid[i].clone(),
                    dataset: ds[i].clone(),
                    n_train: nt[i],
                });
                rows.push(Row {
                    q,
                    j: j[i],
                    seg: segs.iter().map(|s| s[i]).collect(),
                });
            }
        }
    }
    // Documents by j; the table holds them at their position c in that order.
    let js: Vec<u64> = docs.keys().copied().collect();
    let docs: Vec<ScoredDoc> = docs.into_values().collect();
    let at = |j: u64| js.binary_search(&j).expect("every row's document");
    let nq = query_ids.len();
    let mut segments: Vec<(String, Vec<Vec<f64>>)> = (seg_names.iter())
        .map(|s| (s.clone(), vec![vec![0f64; js.len()]; nq]))
        .collect();
    for r in &rows {
        let c = at(r.j);
        for (s, x) in segments.iter_mut().zip(&r.seg) {
            s.1[r.q][c] = *x;
        }
    }
    let table = ScoreTable {
        query_ids: &query_ids,
        docs: &docs,
        segments: &segments,
        doc_index: None,
    };
    let a = &ctx.config.attribution;
    let lead = if all_tokens(ctx.config) {
        n
    } else {
        a.top_k.max(1)
    };
    let part = shard_dir(&ctx.out(scores_root_in_stage(None)), 0).join(FIRST_PART);
    let fields = table.fields();
    let fields: Vec<(&str, Column)> = (fields.iter())
        .map(|(n, c)| (n.as_str(), c.clone()))
        .collect();
    let mut w = PartWriter::create(&part, &fields, &table_metadata(ctx, "scores")?, ROW_GROUP)?;
    let leaders: Vec<Vec<Ranked>> = match a.keep_top_bottom {
        None => {
            if js.len() != n || rows.len() != n * nq {
                return Err(Error::Pipeline(format!(
                    "the score shards hold {} rows of {} documents, {n} documents × {nq} \
                     queries expected; rerun every shard",
                    rows.len(),
                    js.len()
                )));
            }
            write_scores(&mut w, &table, Keep::All, lead)?
        }
        Some(k) => {
            let mut kept = Kept::new(nq, k, lead);
            for r in &rows {
                let c = at(r.j);
                kept.push_one(
                    r.q,
                    Ranked {
                        tau: table.tau(r.q, c),
                        j: c,
                    },
                );
            }
            let chosen = kept.finish_among(n);
            chosen.write(&mut w, &table, |c| c)?;
            chosen.leaders()
        }
    };
    let pairs = w.finish()?;
    drop(rows);
    let token_rows = merge_token_scores(ctx, set, &query_ids, &leaders, &js)?;
    merge_train_docs(ctx, set)?;

    let top: Vec<serde_json::Value> = (leaders.iter().enumerate())
        .filter_map(|(qi, l)| l.first().map(|r| (qi, r)))
        .map(|(qi, r)| json!({"query": query_ids[qi], "top": docs[r.j].train_id, "tau": r.tau}))
        .collect();
    let mut summary = set[0].summary.clone();
    if let Some(o) = summary.as_object_mut() {
        o.remove("shard");
        o.insert("pairs".into(), json!(pairs));
        o.insert("token_rows".into(), json!(token_rows));
        o.insert("top1".into(), json!(top));
        o.insert("merged_shards".into(), json!(set.len()));
    }
    Ok(summary)
}

/// `token_scores.parquet`: for each query, its global leaders' token rows (taken from the
/// shard that scored the document), in rank order. Returns the row count.
fn merge_token_scores(
    ctx: &StageContext,
    set: &[ScoreShardRecord],
    query_ids: &[String],
    leaders: &[Vec<Ranked>],
    js: &[u64],
) -> Result<usize> {
    // (query, j) of every leader → its token rows (token_index, token_id, text, score).
    type Tokens = Vec<(u32, u32, String, f32)>;
    let mut want: HashMap<(String, u64), Tokens> = HashMap::new();
    for (qi, l) in leaders.iter().enumerate() {
        for r in l {
            want.insert((query_ids[qi].clone(), js[r.j]), Vec::new());
        }
    }
    for rec in set {
        let path = shard_folder(ctx.run, rec.shard).join("token_scores.parquet");
        let t = Table::read(&path)?;
        let (qid, j) = (t.strings("query_id")?, int(&t, "doc_index")?);
        let (ti, tid) = (t.u32s("token_index")?, t.u32s("token_id")?);
        let (text, score) = (t.strings("token_text")?, t.floats("score")?);
        for i in 0..t.len() {
            if let Some(v) = want.get_mut(&(qid[i].clone(), j[i])) {
                v.push((ti[i], tid[i], text[i].clone(), score[i] as f32));
            }
        }
    }
    let (mut tq, mut tj, mut tidx, mut ttok, mut ttext, mut tscore) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let ids = doc_ids(ctx, set)?;
    for (qi, l) in leaders.iter().enumerate() {
        for r in l {
            let j = js[r.j];
            let rows = want
                .remove(&(query_ids[qi].clone(), j))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Error::Pipeline(format!(
                        "no shard holds the per-token scores of document {j} for query `{}`; \
                         rerun every shard",
                        query_ids[qi]
                    ))
                })?;
            for (i, id, text, s) in rows {
                tq.push(query_ids[qi].clone());
                tj.push(ids[&j].clone());
                tidx.push(i);
                ttok.push(id);
                ttext.push(text);
                tscore.push(s);
            }
        }
    }
    let n = tq.len();
    write_table(
        &ctx.out("token_scores.parquet"),
        &[
            ("query_id", Column::Str(tq)),
            ("train_id", Column::Str(tj)),
            ("token_index", Column::U32(tidx)),
            ("token_id", Column::U32(ttok)),
            ("token_text", Column::Str(ttext)),
            ("score", Column::F32(tscore)),
        ],
        &table_metadata(ctx, "token_scores")?,
    )?;
    Ok(n)
}

/// Every shard's documents' ids by j (from their `train_docs.parquet`).
fn doc_ids(ctx: &StageContext, set: &[ScoreShardRecord]) -> Result<HashMap<u64, String>> {
    let mut out = HashMap::new();
    for rec in set {
        let t = Table::read(&shard_folder(ctx.run, rec.shard).join("train_docs.parquet"))?;
        out.extend(
            int(&t, "doc_index")?
                .into_iter()
                .zip(t.strings("train_id")?),
        );
    }
    Ok(out)
}

/// `train_docs.parquet`: the shards' documents by j.
fn merge_train_docs(ctx: &StageContext, set: &[ScoreShardRecord]) -> Result<()> {
    let mut all: Vec<(u64, String, String, String, u32, u32)> = Vec::new();
    for rec in set {
        let t = Table::read(&shard_folder(ctx.run, rec.shard).join("train_docs.parquet"))?;
        let (j, id, ds, text) = (
            int(&t, "doc_index")?,
            t.strings("train_id")?,
            t.strings("dataset")?,
            t.strings("text")?,
        );
        let (nt, nl) = (t.u32s("n_tokens")?, t.u32s("n_loss_tokens")?);
        for i in 0..t.len() {
            all.push((
                j[i],
                id[i].clone(),
                ds[i].clone(),
                text[i].clone(),
                nt[i],
                nl[i],
            ));
        }
    }
    all.sort_by_key(|r| r.0);
    let mut cols = (vec![], vec![], vec![], vec![], vec![]);
    for (_, id, ds, text, nt, nl) in all {
        cols.0.push(id);
        cols.1.push(ds);
        cols.2.push(text);
        cols.3.push(nt);
        cols.4.push(nl);
    }
    write_table(
        &ctx.out("train_docs.parquet"),
        &[
            ("train_id", Column::Str(cols.0)),
            ("dataset", Column::Str(cols.1)),
            ("text", Column::Str(cols.2)),
            ("n_tokens", Column::U32(cols.3)),
            ("n_loss_tokens", Column::U32(cols.4)),
        ],
        &table_metadata(ctx, "train_docs")?,
    )
}
