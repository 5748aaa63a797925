//! Owns the rows of the scores dataset: `ScoreTable` (one query set's document scores, per
//! segment) and `write_scores`, which streams them into a part file ranked per query — every
//! document, or each query's top and bottom K (`[attribution] keep_top_bottom`).
//! Layer: ground — may import error, util and config; siblings `dataset`, `keep`, `parquet`.
//!
//! Columns (docs/design.md §5): `query_id`, `train_id`, `dataset` (utf8), `score` (float64,
//! Σ of the segment columns), `n_train` (uint32), `tau` = score / n_train (float64), `rank`
//! (uint32, 1-based by τ descending among all the query's documents, ties by document order)
//! and one float64 column per segment. Rows go out a chunk at a time: memory holds one
//! query's ranking (O(N) indices, or O(K) with K kept) and one chunk, never the table.
//! With K kept, [`Kept`] chooses the rows from τ streamed one document at a time, so the
//! table written ([`KeptRows::write`]) need only hold the documents chosen.

use super::dataset::PartWriter;
use super::keep::{Ranked, TopBottom};
use super::parquet::Column;
use crate::error::Result;

/// Rows gathered before they go to the part file.
const CHUNK: usize = 4096;

/// One scored document: its id, data role and the N of its data set.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredDoc {
    /// `train_id`.
    pub train_id: String,
    /// `dataset`: the data role.
    pub dataset: String,
    /// `n_train`: N of the document's data set.
    pub n_train: u32,
}

/// (column name `segment_K_STAGE`, [Q][N] scores) per planned segment.
pub type SegmentScores = Vec<(String, Vec<Vec<f64>>)>;

/// One query set's scores: `segments[s].1[q][j]` is segment `s`'s score of document `j` for
/// query `q` (0 for a document of another data set).
pub struct ScoreTable<'a> {
    /// The queries, in row order of the segment matrices.
    pub query_ids: &'a [String],
    /// The documents, in column order of the segment matrices.
    pub docs: &'a [ScoredDoc],
    /// Per planned segment, [`SegmentScores`].
    pub segments: &'a [(String, Vec<Vec<f64>>)],
    /// Each document's index among all the stage's documents, written as an int64 column
    /// `doc_index` after the segment columns (a sharded `score`'s partial rows, for the merge
    /// to rank them again); None: no such column.
    pub doc_index: Option<&'a [i64]>,
}

impl ScoreTable<'_> {
    /// score = Σ_s segment scores, in segment order.
    pub fn score(&self, q: usize, j: usize) -> f64 {
        self.segments.iter().map(|(_, s)| s[q][j]).sum()
    }

    /// τ = score / n_train.
    pub fn tau(&self, q: usize, j: usize) -> f64 {
        self.score(q, j) / self.docs[j].n_train as f64
    }

    /// The columns of the table, empty: (name, a column of its type).
    pub fn fields(&self) -> Vec<(String, Column)> {
        let mut f: Vec<(String, Column)> = vec![
            ("query_id".into(), Column::Str(vec![])),
            ("train_id".into(), Column::Str(vec![])),
            ("dataset".into(), Column::Str(vec![])),
            ("score".into(), Column::F64(vec![])),
            ("n_train".into(), Column::U32(vec![])),
            ("tau".into(), Column::F64(vec![])),
            ("rank".into(), Column::U32(vec![])),
        ];
        for (name, _) in self.segments {
            f.push((name.clone(), Column::F64(vec![])));
        }
        if self.doc_index.is_some() {
            f.push(("doc_index".into(), Column::I64(vec![])));
        }
        f
    }
}

/// Which rows of each query's ranking are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every document.
    All,
    /// The K first and K last by τ (all of them when 2K ≥ N).
    TopBottom(usize),
}

/// Rows waiting for the part file, column by column.
struct Chunk {
    cols: Vec<Column>,
}

impl Chunk {
    fn new(t: &ScoreTable) -> Chunk {
        Chunk {
            cols: t.fields().into_iter().map(|(_, c)| c).collect(),
        }
    }

    fn push(&mut self, t: &ScoreTable, q: usize, r: Ranked, rank: u32) {
        let d = &t.docs[r.j];
        let mut cols = self.cols.iter_mut();
        let mut next = || cols.next().expect("one column per field");
        let (Column::Str(qid), Column::Str(tid), Column::Str(ds)) = (next(), next(), next()) else {
            unreachable!("fields() order")
        };
        qid.push(t.query_ids[q].clone());
        tid.push(d.train_id.clone());
        ds.push(d.dataset.clone());
        let (Column::F64(score), Column::U32(n), Column::F64(tau), Column::U32(rk)) =
            (next(), next(), next(), next())
        else {
            unreachable!("fields() order")
        };
        score.push(t.score(q, r.j));
        n.push(d.n_train);
        tau.push(r.tau);
        rk.push(rank);
        for (_, s) in t.segments {
            let Column::F64(c) = next() else {
                unreachable!("fields() order")
            };
            c.push(s[q][r.j]);
        }
        if let Some(ix) = t.doc_index {
            let Column::I64(c) = next() else {
                unreachable!("fields() order")
            };
            c.push(ix[r.j]);
        }
    }

    fn len(&self) -> usize {
        self.cols.first().map(Column::len).unwrap_or(0)
    }

    /// Adds a row, writing the chunk out once it holds [`CHUNK`] rows.
    fn emit(
        &mut self,
        w: &mut PartWriter,
        t: &ScoreTable,
        q: usize,
        r: Ranked,
        rank: u32,
    ) -> Result<()> {
        self.push(t, q, r, rank);
        if self.len() >= CHUNK {
            self.flush(w, t)?;
        }
        Ok(())
    }

    fn flush(&mut self, w: &mut PartWriter, t: &ScoreTable) -> Result<()> {
        if self.len() > 0 {
            w.write(&self.cols)?;
            *self = Chunk::new(t);
        }
        Ok(())
    }
}

/// Writes `t`'s rows to `w`, query by query, each query's rows by rank; returns each query's
/// first `lead` documents in ranking order (they rank 1, 2, …), whatever `keep` writes.
pub fn write_scores(
    w: &mut PartWriter,
    t: &ScoreTable,
    keep: Keep,
    lead: usize,
) -> Result<Vec<Vec<Ranked>>> {
    let n = t.docs.len();
    let nq = t.query_ids.len();
    match keep {
        Keep::All => {
            let mut chunk = Chunk::new(t);
            let mut leaders = Vec::with_capacity(nq);
            for q in 0..nq {
                let mut order: Vec<Ranked> = (0..n)
                    .map(|j| Ranked {
                        tau: t.tau(q, j),
                        j,
                    })
                    .collect();
                order.sort_unstable();
                for (i, r) in order.iter().enumerate() {
                    chunk.emit(w, t, q, *r, i as u32 + 1)?;
                }
                order.truncate(lead);
                leaders.push(order);
            }
            chunk.flush(w, t)?;
            Ok(leaders)
        }
        Keep::TopBottom(k) => {
            let mut kept = Kept::new(nq, k, lead);
            let mut tau = vec![0f64; nq];
            for j in 0..n {
                for (q, x) in tau.iter_mut().enumerate() {
                    *x = t.tau(q, j);
                }
                kept.push(j, &tau);
            }
            let rows = kept.finish();
            rows.write(w, t, |j| j)?;
            Ok(rows.leaders())
        }
    }
}

/// Chooses each query's rows under [`Keep::TopBottom`] from τ seen one document at a time
/// (documents in index order), in O(queries × (K + lead)) memory.
pub struct Kept {
    k: usize,
    lead: usize,
    sel: Vec<TopBottom>,
}

impl Kept {
    /// For `queries` queries, keeping the K = `k` first and last rows and the `lead` first.
    pub fn new(queries: usize, k: usize, lead: usize) -> Kept {
        Kept {
            k,
            lead,
            sel: (0..queries)
                .map(|_| TopBottom::new(k.max(lead), k))
                .collect(),
        }
    }

    /// Document `j` (the next index) with its τ per query.
    pub fn push(&mut self, j: usize, tau: &[f64]) {
        for (s, &tau) in self.sel.iter_mut().zip(tau) {
            s.push(Ranked { tau, j });
        }
    }

    /// One (query `q`, document) row: for a merge, whose rows per query are a subset of the
    /// documents that holds each query's ends (then see [`Kept::finish_among`]).
    pub fn push_one(&mut self, q: usize, r: Ranked) {
        self.sel[q].push(r);
    }

    /// The rows chosen, ranked among the documents seen.
    pub fn finish(self) -> KeptRows {
        let n = self.sel.first().map(TopBottom::seen).unwrap_or(0);
        self.finish_among(n)
    }

    /// The rows chosen, ranked among `n` documents: the rows seen ([`Kept::push_one`]) hold
    /// each query's first max(K, lead) and last K of the n.
    pub fn finish_among(self, n: usize) -> KeptRows {
        KeptRows {
            k: self.k,
            lead: self.lead,
            n,
            ends: self.sel.into_iter().map(TopBottom::finish).collect(),
        }
    }
}

/// Each query's first max(K, lead) and last K rows among n documents ([`Kept`]).
pub struct KeptRows {
    k: usize,
    lead: usize,
    n: usize,
    ends: Vec<(Vec<Ranked>, Vec<Ranked>)>,
}

impl KeptRows {
    /// Every document some query writes or leads with, in index order.
    pub fn docs(&self) -> std::collections::BTreeSet<usize> {
        let mut s = std::collections::BTreeSet::new();
        for (top, bottom) in &self.ends {
            s.extend(top.iter().chain(bottom).map(|r| r.j));
        }
        s
    }

    /// Each query's first `lead` documents in ranking order.
    pub fn leaders(&self) -> Vec<Vec<Ranked>> {
        (self.ends.iter())
            .map(|(top, _)| top.iter().take(self.lead).copied().collect())
            .collect()
    }

    /// The rows in the order they are written: query by query, each query's by rank, as
    /// (query, document, rank among all n documents).
    pub fn rows(&self) -> Vec<(usize, Ranked, u32)> {
        let k = self.k;
        let mut out = Vec::new();
        for (q, (top, bottom)) in self.ends.iter().enumerate() {
            for (i, r) in top.iter().take(k).enumerate() {
                out.push((q, *r, i as u32 + 1));
            }
            let first_bottom = self.n - bottom.len();
            for (i, r) in bottom.iter().enumerate() {
                let rank = first_bottom + i + 1;
                if rank > k {
                    out.push((q, *r, rank as u32));
                }
            }
        }
        out
    }

    /// Writes [`KeptRows::rows`]: `t` holds the documents written, document j at
    /// `t.docs[at(j)]`.
    pub fn write(
        &self,
        w: &mut PartWriter,
        t: &ScoreTable,
        at: impl Fn(usize) -> usize,
    ) -> Result<()> {
        let mut chunk = Chunk::new(t);
        for (q, r, rank) in self.rows() {
            let local = Ranked {
                tau: r.tau,
                j: at(r.j),
            };
            chunk.emit(w, t, q, local, rank)?;
        }
        chunk.flush(w, t)
    }
}

#[cfg(test)]
mod tests {
    use super::super::dataset::{part_files, shard_dir, FIRST_PART};
    use super::super::parquet::read_batches;
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, UInt32Type};

    /// (query, train_id, score, tau, rank, segment values) per row read back.
    type Row = (String, String, f64, f64, u32, Vec<f64>);

    fn read_rows(path: &std::path::Path, n_seg: usize) -> Vec<Row> {
        let mut out = Vec::new();
        for b in read_batches(path).unwrap() {
            let s = |c: &str| b.column_by_name(c).unwrap().as_string::<i32>().clone();
            let f = |c: &str| {
                b.column_by_name(c)
                    .unwrap()
                    .as_primitive::<Float64Type>()
                    .clone()
            };
            let (q, d, sc, ta) = (s("query_id"), s("train_id"), f("score"), f("tau"));
            let rk = b
                .column_by_name("rank")
                .unwrap()
                .as_primitive::<UInt32Type>()
                .clone();
            for i in 0..b.num_rows() {
                let segs = (0..n_seg)
                    .map(|k| f(&format!("segment_{k}_x")).value(i))
                    .collect();
                out.push((
                    q.value(i).to_string(),
                    d.value(i).to_string(),
                    sc.value(i),
                    ta.value(i),
                    rk.value(i),
                    segs,
                ));
            }
        }
        out
    }

    /// The in-memory table the score stage built before streaming: every (query, document)
    /// row, ranked by a stable sort on τ descending.
    fn reference(t: &ScoreTable) -> Vec<Row> {
        let mut rows = Vec::new();
        for (q, qid) in t.query_ids.iter().enumerate() {
            let mut r: Vec<usize> = (0..t.docs.len()).collect();
            r.sort_by(|&a, &b| t.tau(q, b).total_cmp(&t.tau(q, a)));
            for (i, j) in r.into_iter().enumerate() {
                let segs = t.segments.iter().map(|(_, s)| s[q][j]).collect();
                rows.push((
                    qid.clone(),
                    t.docs[j].train_id.clone(),
                    t.score(q, j),
                    t.tau(q, j),
                    i as u32 + 1,
                    segs,
                ));
            }
        }
        rows
    }

    #[test]
    fn streamed_rows_equal_the_in_memory_table_and_top_bottom_filters_it() {
        let (nq, nd) = (3usize, 23usize);
        let docs: Vec<ScoredDoc> = (0..nd)
            .map(|j| ScoredDoc {
                train_id: format!("d{j}"),
                dataset: if j < 15 { "train" } else { "pretrain" }.into(),
                n_train: if j < 15 { 15 } else { 8 },
            })
            .collect();
        let query_ids: Vec<String> = (0..nq).map(|q| format!("q{q}")).collect();
        let mut state = 11u64;
        let mut draw = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Few distinct values, so ties happen.
            ((state >> 33) % 7) as f64 - 3.0
        };
        let segments: SegmentScores = (0..2)
            .map(|k| {
                let m = (0..nq)
                    .map(|_| {
                        (0..nd)
                            .map(|j| {
                                if (j < 15) == (k == 0) || k == 1 {
                                    draw()
                                } else {
                                    0.0
                                }
                            })
                            .collect()
                    })
                    .collect();
                (format!("segment_{k}_x"), m)
            })
            .collect();
        let t = ScoreTable {
            query_ids: &query_ids,
            docs: &docs,
            segments: &segments,
            doc_index: None,
        };
        let want = reference(&t);
        // Shards of every third document, each keeping its own first max(K, lead) and last
        // max(K, lead): their rows' union, ranked among all documents, is the whole table's.
        for (k, lead) in [(4usize, 5usize), (1, 2), (12, 3), (2, 2)] {
            let mut whole = Kept::new(nq, k, lead);
            let mut union = Kept::new(nq, k, lead);
            for shard in 0..3 {
                let mut own = Kept::new(nq, k.max(lead), lead);
                for j in (0..nd).filter(|j| j % 3 == shard) {
                    let tau: Vec<f64> = (0..nq).map(|q| t.tau(q, j)).collect();
                    own.push(j, &tau);
                }
                for (q, r, _) in own.finish().rows() {
                    union.push_one(q, r);
                }
            }
            for j in 0..nd {
                let tau: Vec<f64> = (0..nq).map(|q| t.tau(q, j)).collect();
                whole.push(j, &tau);
            }
            let (a, b) = (whole.finish(), union.finish_among(nd));
            let key = |v: Vec<(usize, Ranked, u32)>| {
                v.into_iter()
                    .map(|(q, r, rank)| (q, r.j, r.tau.to_bits(), rank))
                    .collect::<Vec<_>>()
            };
            assert_eq!(key(a.rows()), key(b.rows()), "K {k}, lead {lead}");
            let ids = |l: Vec<Vec<Ranked>>| {
                l.into_iter()
                    .map(|v| v.into_iter().map(|r| r.j).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(a.leaders()), ids(b.leaders()), "K {k}, lead {lead}");
        }
        let dir = tempfile::tempdir().unwrap();
        let fields = t.fields();
        let fields: Vec<(&str, Column)> = fields
            .iter()
            .map(|(n, c)| (n.as_str(), c.clone()))
            .collect();
        for (i, (keep, group)) in [
            (Keep::All, 1usize),
            (Keep::All, 7),
            (Keep::All, 65_536),
            (Keep::TopBottom(4), 5),
            (Keep::TopBottom(1), 2),
            (Keep::TopBottom(12), 3),
        ]
        .into_iter()
        .enumerate()
        {
            let root = dir.path().join(format!("r{i}/query_set=default"));
            let path = shard_dir(&root, 0).join(FIRST_PART);
            let mut w = PartWriter::create(&path, &fields, &[], group).unwrap();
            let leaders = write_scores(&mut w, &t, keep, 5).unwrap();
            w.finish().unwrap();
            assert_eq!(part_files(&root).unwrap(), vec![path.to_path_buf()]);
            let got = read_rows(&path, 2);
            let filtered: Vec<Row> = match keep {
                Keep::All => want.clone(),
                Keep::TopBottom(k) => want
                    .iter()
                    .filter(|r| r.4 as usize <= k || r.4 as usize > nd - k)
                    .cloned()
                    .collect(),
            };
            assert_eq!(got, filtered, "{keep:?}, row groups of {group}");
            for (q, l) in leaders.iter().enumerate() {
                let ids: Vec<String> = l.iter().map(|r| docs[r.j].train_id.clone()).collect();
                let want_ids: Vec<String> = want[q * nd..q * nd + 5]
                    .iter()
                    .map(|r| r.1.clone())
                    .collect();
                assert_eq!(ids, want_ids, "{keep:?}: the leaders of q{q}");
            }
        }
    }
}
