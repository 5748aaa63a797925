//! Owns the score stage's output tables: `write_outputs` (the scores dataset,
//! `token_scores.parquet`, `train_docs.parquet`, `queries.parquet`) from the scratch scores
//! of [`super::score_docs`].
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `fetch`, `score_docs`, `score_meta`, `score_queries`, `score_text`.
//!
//! With `[attribution] keep_top_bottom = K`, one streaming pass over the documents adds up
//! each one's segment scores (Σ_s in segment order, as `output::score_rows::ScoreTable::score`
//! does) and keeps each query's K first and K last by τ and its top_k leaders (bounded
//! heaps); only those documents' ids, texts and segment scores are read back to write the
//! rows. Memory is then flat in N. Without it (every (query, document) row, ranks over all
//! totals) the table is built in memory, [Q][N] per segment, linear in N; so are
//! `all_token_scores = true` (or `top_k = 0`), which keeps every document's per-token scores.
//! `train_docs.parquet` lists every scored document either way, streamed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use crate::attribution::plan::AttributionPlan;
use crate::data::tokenize::load_tokenizer;
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::output::dataset::{shard_dir, PartWriter, FIRST_PART};
use crate::output::keep::Ranked;
use crate::output::parquet::ROW_GROUP;
use crate::output::score_rows::{write_scores, Keep, Kept, ScoreTable, ScoredDoc, SegmentScores};
use crate::output::{write_table, Column};
use crate::pipeline::{scores_root_in_stage, StageContext};
use crate::util::scratch::RowReader;
use crate::util::shard::Shard;

use super::fetch::Fetched;
use super::score_docs::{add_leader_tokens, all_tokens, DocIndex, RoleScores};
use super::score_meta::table_metadata;
use super::score_queries::Queries;
use super::score_text::doc_token_texts;

/// Rows gathered before they go to `train_docs.parquet`.
const CHUNK: usize = 4096;

/// Writes `queries.parquet`, the scores dataset (`query_set=NAME/shard=0/part-00000.parquet`,
/// streamed: every document of each query, or its top and bottom `keep_top_bottom`),
/// `token_scores.parquet` and `train_docs.parquet`; returns the stage's summary (rows, token
/// rows, each query's top document).
pub(super) fn write_outputs(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    roles: &mut BTreeMap<String, RoleScores>,
    shard: Option<Shard>,
) -> Result<serde_json::Value> {
    let q = queries.q;
    let query_ids = copy_queries(ctx, q)?;
    let fetched = Fetched::load(ctx.run)?;
    let tokenizer = load_tokenizer(fetched.tokenizer_path())?;
    let index = DocIndex::new(roles);
    let n_train = n_train_u32(roles)?;
    let a = &ctx.config.attribution;
    let all_tokens = all_tokens(ctx.config);
    let lead = if all_tokens { index.n } else { a.top_k.max(1) };
    let set = ctx.query_set.map(|s| s.name.as_str());
    let folder = shard.map_or(0, |s| s.index as u32);
    let part = shard_dir(&ctx.out(scores_root_in_stage(set)), folder).join(FIRST_PART);
    let meta = table_metadata(ctx, "scores")?;
    let out = Out {
        query_ids: &query_ids,
        n_train: &n_train,
        part: &part,
        meta: &meta,
        sharded: shard.is_some(),
    };
    let (rows, leaders) = match a.keep_top_bottom {
        // A shard keeps max(K, top_k) at both ends, so that the merge finds the leaders.
        Some(k) if shard.is_some() => write_kept(p, roles, &index, &out, k.max(lead), lead)?,
        Some(k) => write_kept(p, roles, &index, &out, k, lead)?,
        None => write_all(p, roles, &index, &out, lead)?,
    };
    if !all_tokens {
        add_leader_tokens(ctx, p, queries, roles, &leaders)?;
    }
    let wanted: BTreeSet<usize> = leaders.iter().flatten().map(|r| r.j).collect();
    let docs = collect_docs(roles, &index, &wanted)?;
    let sharded = shard.is_some();
    let n_token_rows = write_token_scores(
        ctx,
        (roles, &index),
        &docs,
        &query_ids,
        &leaders,
        (&tokenizer, sharded),
    )?;
    write_train_docs(ctx, roles, &index, sharded)?;
    let top: Vec<serde_json::Value> = leaders
        .iter()
        .enumerate()
        .filter_map(|(qi, l)| l.first().map(|r| (qi, r)))
        .map(|(qi, r)| json!({"query": query_ids[qi], "top": docs[&r.j].doc_id, "tau": r.tau}))
        .collect();
    for t in &top {
        tracing::info!(
            "score: {} ← {} (τ = {})",
            t["query"].as_str().unwrap_or_default(),
            t["top"].as_str().unwrap_or_default(),
            crate::util::num::sig(t["tau"].as_f64().unwrap_or(f64::NAN), 4)
        );
    }
    let mut summary = json!({"pairs": rows, "token_rows": n_token_rows, "top1": top,
        "kept_per_query": a.keep_top_bottom.map(|k| json!({"top": k, "bottom": k}))});
    if let Some(s) = shard {
        let scored: usize = roles.values().map(RoleScores::scored).sum();
        summary["shard"] = json!({"index": s.index, "count": s.count, "documents": scored,
            "total_documents": index.n});
    }
    Ok(summary)
}

/// Where and how the scores part is written.
struct Out<'a> {
    query_ids: &'a [String],
    n_train: &'a HashMap<String, u32>,
    part: &'a std::path::Path,
    meta: &'a [(String, String)],
    /// A shard's partial rows: with the `doc_index` column.
    sharded: bool,
}

/// Each role's N as the `n_train` column's uint32.
fn n_train_u32(roles: &BTreeMap<String, RoleScores>) -> Result<HashMap<String, u32>> {
    roles
        .iter()
        .map(|(role, r)| {
            let n = u32::try_from(r.n_train).map_err(|_| {
                Error::Pipeline(format!(
                    "data set `{role}` has {} documents, more than n_train's uint32 holds",
                    r.n_train
                ))
            })?;
            Ok((role.clone(), n))
        })
        .collect()
}

/// The segment columns' names, `segment_K_STAGE`, in plan order.
fn segment_names(p: &AttributionPlan) -> Vec<String> {
    (p.segments.iter())
        .map(|seg| format!("segment_{}_{}", seg.index, seg.stage))
        .collect()
}

/// Opens the scores part for `table`'s columns.
fn part_writer(
    path: &std::path::Path,
    t: &ScoreTable,
    meta: &[(String, String)],
) -> Result<PartWriter> {
    let fields = t.fields();
    let fields: Vec<(&str, Column)> = fields
        .iter()
        .map(|(n, c)| (n.as_str(), c.clone()))
        .collect();
    PartWriter::create(path, &fields, meta, ROW_GROUP)
}

/// Keep::All: the whole table in memory ([Q][N] per segment), every row written (a shard's:
/// every row of its documents, ranked among them).
fn write_all(
    p: &AttributionPlan,
    roles: &BTreeMap<String, RoleScores>,
    index: &DocIndex,
    out: &Out,
    lead: usize,
) -> Result<(usize, Vec<Vec<Ranked>>)> {
    let q = out.query_ids.len();
    // The scored documents' global indices, and the documents at their positions there.
    let mut order: Vec<usize> = Vec::new();
    let mut docs: Vec<ScoredDoc> = Vec::new();
    for (role, r) in roles {
        let first = index.first(role);
        r.for_each_doc(|m, d| {
            if r.scores(m) {
                order.push(first + m);
                docs.push(ScoredDoc {
                    train_id: d.doc_id,
                    dataset: role.clone(),
                    n_train: out.n_train[role],
                });
            }
            Ok(())
        })?;
    }
    let mut segments: SegmentScores = Vec::new();
    let mut row = vec![0f64; q];
    for (seg, name) in p.segments.iter().zip(segment_names(p)) {
        let mut m = vec![vec![0f64; order.len()]; q];
        if let Some(r) = roles.get(&seg.role) {
            let first = index.first(&seg.role);
            let at = order.partition_point(|&j| j < first);
            let mut rd = r.per_segment[&seg.index].reader()?;
            let mut c = at;
            for k in 0..r.len() {
                rd.next_row(&mut row)?;
                if r.scores(k) {
                    for (col, x) in m.iter_mut().zip(&row) {
                        col[c] = *x;
                    }
                    c += 1;
                }
            }
        }
        segments.push((name, m));
    }
    let ix: Vec<i64> = order.iter().map(|&j| j as i64).collect();
    let table = ScoreTable {
        query_ids: out.query_ids,
        docs: &docs,
        segments: &segments,
        doc_index: out.sharded.then_some(&ix[..]),
    };
    let mut w = part_writer(out.part, &table, out.meta)?;
    let mut leaders = write_scores(&mut w, &table, Keep::All, lead)?;
    for r in leaders.iter_mut().flatten() {
        r.j = order[r.j];
    }
    Ok((w.finish()?, leaders))
}

/// Keep::TopBottom(k): one pass over the scratch scores chooses the rows; only the documents
/// chosen are read back and written.
fn write_kept(
    p: &AttributionPlan,
    roles: &BTreeMap<String, RoleScores>,
    index: &DocIndex,
    out: &Out,
    k: usize,
    lead: usize,
) -> Result<(usize, Vec<Vec<Ranked>>)> {
    let (query_ids, n_train) = (out.query_ids, out.n_train);
    let q = query_ids.len();
    let mut kept = Kept::new(q, k, lead);
    let mut rows = vec![vec![0f64; q]; p.segments.len()];
    let mut tau = vec![0f64; q];
    let mut j = 0;
    for (role, r) in roles {
        let mut readers = Vec::new();
        for seg in &p.segments {
            readers.push(match seg.role == *role {
                true => Some(r.per_segment[&seg.index].reader()?),
                false => None,
            });
        }
        let n = n_train[role] as f64;
        for m in 0..r.len() {
            for (rd, row) in readers.iter_mut().zip(rows.iter_mut()) {
                match rd {
                    Some(rd) => rd.next_row(row)?,
                    None => row.fill(0.0),
                }
            }
            if !r.scores(m) {
                j += 1;
                continue;
            }
            for (qi, t) in tau.iter_mut().enumerate() {
                // score = Σ_s in segment order, as ScoreTable::score adds.
                let score: f64 = rows.iter().map(|row| row[qi]).sum();
                *t = score / n;
            }
            kept.push(j, &tau);
            j += 1;
        }
    }
    let chosen = kept.finish();
    let wanted = chosen.docs();
    let full = collect_docs(roles, index, &wanted)?;
    let order: Vec<usize> = wanted.iter().copied().collect();
    let docs: Vec<ScoredDoc> = order
        .iter()
        .map(|j| {
            let role = index.locate(*j).0;
            ScoredDoc {
                train_id: full[j].doc_id.clone(),
                dataset: role.to_string(),
                n_train: n_train[role],
            }
        })
        .collect();
    drop(full);
    let mut segments: SegmentScores = Vec::new();
    let mut row = vec![0f64; q];
    let mut readers: BTreeMap<usize, RowReader> = BTreeMap::new();
    for (seg, name) in p.segments.iter().zip(segment_names(p)) {
        let mut m = vec![vec![0f64; order.len()]; q];
        for (c, &j) in order.iter().enumerate() {
            let (role, at) = index.locate(j);
            if role == seg.role {
                let rd = match readers.entry(seg.index) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(roles[role].per_segment[&seg.index].reader()?)
                    }
                };
                rd.read_at(at, &mut row)?;
                for (col, x) in m.iter_mut().zip(&row) {
                    col[c] = *x;
                }
            }
        }
        segments.push((name, m));
    }
    let ix: Vec<i64> = order.iter().map(|&j| j as i64).collect();
    let table = ScoreTable {
        query_ids,
        docs: &docs,
        segments: &segments,
        doc_index: out.sharded.then_some(&ix[..]),
    };
    let mut w = part_writer(out.part, &table, out.meta)?;
    chosen.write(&mut w, &table, |j| {
        order.binary_search(&j).expect("a chosen document")
    })?;
    Ok((w.finish()?, chosen.leaders()))
}

/// The whole documents `wanted` (global indices), read from the prepared tables.
fn collect_docs(
    roles: &BTreeMap<String, RoleScores>,
    index: &DocIndex,
    wanted: &BTreeSet<usize>,
) -> Result<BTreeMap<usize, PreparedDoc>> {
    let mut out = BTreeMap::new();
    for (role, r) in roles {
        let first = index.first(role);
        if wanted.range(first..first + r.len()).next().is_none() {
            continue;
        }
        r.for_each_doc(|m, d| {
            if wanted.contains(&(first + m)) {
                out.insert(first + m, d);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Copies the query stage's `queries.parquet` into the outputs and returns its query ids,
/// which must be the `q` queries the gradients hold.
fn copy_queries(ctx: &StageContext, q: usize) -> Result<Vec<String>> {
    let queries_path = ctx.input_dir("query").join("queries.parquet");
    std::fs::copy(&queries_path, ctx.out("queries.parquet")).ctx("copying", &queries_path)?;
    let query_ids = read_query_ids(&queries_path)?;
    if query_ids.len() != q {
        return Err(Error::Pipeline(format!(
            "{} lists {} queries but the gradients have {q}; rerun the query stage",
            queries_path.display(),
            query_ids.len()
        )));
    }
    Ok(query_ids)
}

/// `token_scores.parquet`: per-token scores of each query's `leaders` (its top-k documents by
/// rank, or all, with `all_token_scores` or `top_k = 0`), whose whole documents `docs` holds
/// by global index. Returns its row count.
fn write_token_scores(
    ctx: &StageContext,
    (roles, index): (&BTreeMap<String, RoleScores>, &DocIndex),
    docs: &BTreeMap<usize, PreparedDoc>,
    query_ids: &[String],
    leaders: &[Vec<Ranked>],
    (tokenizer, sharded): (&tokenizers::Tokenizer, bool),
) -> Result<usize> {
    if let Some(note) = ctx.config.attribution.top_k_note(index.n) {
        tracing::warn!("{note}");
    }
    let (mut tq, mut tid, mut tidx, mut ttok, mut ttext, mut tscore) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut tj: Vec<i64> = Vec::new();
    // Each kept document's token texts, cut from its text at the tokenizer's offsets.
    let mut texts: HashMap<usize, Vec<String>> = HashMap::new();
    for (qi, l) in leaders.iter().enumerate() {
        for r in l {
            let (role, m) = index.locate(r.j);
            let doc = &docs[&r.j];
            let pieces = texts
                .entry(r.j)
                .or_insert_with(|| doc_token_texts(ctx, role, doc, tokenizer));
            let tokens = roles[role].tokens.get(&m).ok_or_else(|| {
                Error::Pipeline(format!("no per-token scores for document {}", doc.doc_id))
            })?;
            for (t, &s) in tokens[qi].iter().enumerate() {
                tq.push(query_ids[qi].clone());
                tid.push(doc.doc_id.clone());
                tidx.push(t as u32);
                ttok.push(doc.input_ids[t]);
                ttext.push(pieces[t].clone());
                tscore.push(s);
                tj.push(r.j as i64);
            }
        }
    }
    let n_token_rows = tq.len();
    let mut cols = vec![
        ("query_id", Column::Str(tq)),
        ("train_id", Column::Str(tid)),
        ("token_index", Column::U32(tidx)),
        ("token_id", Column::U32(ttok)),
        ("token_text", Column::Str(ttext)),
        ("score", Column::F32(tscore)),
    ];
    if sharded {
        cols.push(("doc_index", Column::I64(tj)));
    }
    write_table(
        &ctx.out("token_scores.parquet"),
        &cols,
        &table_metadata(ctx, "token_scores")?,
    )?;
    Ok(n_token_rows)
}

/// `train_docs.parquet`: every scored document (data roles by name, then each role's
/// order), so results join back to text; streamed a chunk of rows at a time. A shard's has
/// its documents, with their `doc_index`.
fn write_train_docs(
    ctx: &StageContext,
    roles: &BTreeMap<String, RoleScores>,
    index: &DocIndex,
    sharded: bool,
) -> Result<()> {
    let empty = || {
        let mut c = vec![
            Column::Str(vec![]),
            Column::Str(vec![]),
            Column::Str(vec![]),
            Column::U32(vec![]),
            Column::U32(vec![]),
        ];
        if sharded {
            c.push(Column::I64(vec![]));
        }
        c
    };
    let names = [
        "train_id",
        "dataset",
        "text",
        "n_tokens",
        "n_loss_tokens",
        "doc_index",
    ];
    let fields: Vec<(&str, Column)> = names.into_iter().zip(empty()).collect();
    let path = ctx.out("train_docs.parquet");
    let mut w = PartWriter::create(
        &path,
        &fields,
        &table_metadata(ctx, "train_docs")?,
        ROW_GROUP,
    )?;
    let mut cols = empty();
    for (role, r) in roles {
        let first = index.first(role);
        r.for_each_doc(|m, d| {
            if !r.scores(m) {
                return Ok(());
            }
            let [Column::Str(id), Column::Str(ds), Column::Str(text), Column::U32(nt), Column::U32(nl), rest @ ..] =
                &mut cols[..]
            else {
                unreachable!("the columns above")
            };
            if let [Column::I64(ix)] = rest {
                ix.push((first + m) as i64);
            }
            nt.push(d.n_tokens() as u32);
            nl.push(d.n_loss_tokens() as u32);
            id.push(d.doc_id);
            ds.push(role.clone());
            text.push(d.text);
            if id.len() >= CHUNK {
                w.write(&std::mem::replace(&mut cols, empty()))?;
            }
            Ok(())
        })?;
    }
    w.write(&cols)?;
    w.finish()?;
    Ok(())
}

pub(super) fn read_query_ids(path: &std::path::Path) -> Result<Vec<String>> {
    use arrow_array::cast::AsArray;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).ctx("opening", path)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| Error::parquet(path, e))?;
    let mut ids = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| Error::parquet(path, e))?;
        let col = b
            .column_by_name("query_id")
            .ok_or_else(|| Error::parquet(path, "no query_id column"))?
            .as_string::<i32>()
            .clone();
        ids.extend(col.iter().map(|s| s.unwrap_or_default().to_string()));
    }
    Ok(ids)
}
