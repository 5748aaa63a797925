//! Owns `ReportData` and its loaders: everything the report shows, read from a run directory.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! eval.rs, gen_data.rs, table.rs.
//!
//! Everything the report shows, gathered from a run directory: the score stage's tables, the
//! manifest's timings, the known sources of the queries and, when present, evaluation
//! results.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::config::STAGE_ORDER;
use crate::error::Result;
use crate::pipeline::{RunDir, StageStatus};

use super::eval::{read_lds, read_recall, EvalResults, LDS_STAGE, RECALL_STAGE};
use super::table::{doc_texts, Table};

/// How many proponents (highest τ) the report shows per query.
pub const PROPONENTS: usize = 5;
/// How many opponents (lowest τ, when negative) the report shows per query.
pub const OPPONENTS: usize = 3;

/// One token of a shown document with its score (the token's share of the document score).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Token {
    /// The decoded token.
    pub text: String,
    /// Its per-token score (they add up to the document's `score`).
    pub score: f64,
}

/// A shown document of one query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocEntry {
    /// Training document id.
    pub train_id: String,
    /// The data set it belongs to (`train`, `pretrain`).
    pub dataset: String,
    /// Rank by τ within the query (1 = strongest proponent).
    pub rank: u32,
    /// τ = score / n_train.
    pub tau: f64,
    /// The raw sum Σ_ℓ ⟨u_ℓ, ḡ_ℓ(m)⟩.
    pub score: f64,
    /// N of the document's data set.
    pub n_train: u32,
    /// Contribution of each segment to `score`, in [`ReportData::segment_columns`] order.
    pub segments: Vec<f64>,
    /// Whether it is one of the query's known sources.
    pub known: bool,
    /// The document's text.
    pub text: String,
    /// Per-token scores, when the score stage kept them for this document.
    pub tokens: Option<Vec<Token>>,
}

/// Where one known source of a query ranks among all scored documents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnownRank {
    /// Training document id.
    pub train_id: String,
    /// Rank by τ (1 = strongest proponent).
    pub rank: u32,
    /// τ = score / n_train.
    pub tau: f64,
}

/// How far down the ranking a known source must be to count as "near the bottom": the
/// lowest [`BOTTOM_FRACTION`] of the scored documents.
pub const BOTTOM_FRACTION: f64 = 0.02;

/// Known sources ranking below this rank are flagged in the summary.
pub const FLAG_BELOW_RANK: u32 = 10;

/// One query and its top documents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryReport {
    /// Query id.
    pub query_id: String,
    /// The prompt.
    pub prompt: String,
    /// The completion being attributed.
    pub completion: String,
    /// f(q) = −log p(completion | prompt) of the final model.
    pub measurement: f64,
    /// Ids of the documents known to state the answer (may be empty).
    pub known_sources: Vec<String>,
    /// The best rank of any known source among all scored documents.
    pub best_known_rank: Option<u32>,
    /// Every known source that was scored, with its rank and τ, best rank first.
    pub known_ranks: Vec<KnownRank>,
    /// Documents scored for this query.
    pub n_scored: usize,
    /// The highest-τ documents.
    pub proponents: Vec<DocEntry>,
    /// The lowest-τ documents with τ < 0.
    pub opponents: Vec<DocEntry>,
    /// A generated query's own generation, token by token with its top proponents.
    pub generation: Option<Vec<super::gen_data::Generated>>,
    /// A given completion's mean −log p per token, when above
    /// [`super::gen_data::IMPROBABLE_NATS_PER_TOKEN`] (the model would not say it).
    pub improbable: Option<f64>,
}

impl QueryReport {
    /// Whether the top proponent is a known source (`None` without known sources).
    pub fn found_at_top(&self) -> Option<bool> {
        if self.known_sources.is_empty() {
            None
        } else {
            Some(self.best_known_rank == Some(1))
        }
    }
}

/// A named query set (`source-tda ask`): its queries, scored against the same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuerySetReport {
    /// The set's name.
    pub name: String,
    /// Whether its scores are current (false: the run's fine-tune or curvature changed since;
    /// its queries are then not shown).
    pub current: bool,
    /// Its queries (empty when not current).
    pub queries: Vec<QueryReport>,
}

/// Wall time and peak memory of one stage, from the manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTiming {
    /// Stage name.
    pub stage: String,
    /// `complete`, `failed`, `running`.
    pub status: String,
    /// Wall-clock seconds.
    pub wall_s: Option<f64>,
    /// Peak resident memory, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// When it finished (RFC 3339).
    pub finished_at: Option<String>,
}

/// A data set the run used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetInfo {
    /// Role (`train`, `query`, `pretrain`).
    pub role: String,
    /// Hub id or local path.
    pub id: String,
    /// Resolved commit, when from the hub.
    pub commit: Option<String>,
    /// Documents scored from it (0 for queries).
    pub n_docs: usize,
}

/// Everything in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ReportData {
    /// The run's name (`[run] name`).
    pub run_name: String,
    /// Model id.
    pub model_id: String,
    /// Model commit (empty for local models).
    pub model_commit: String,
    /// Attribution method (`source`, `influence`, `gradient_dot`).
    pub method: String,
    /// The segments as the score stage recorded them (index, stage, role, n, mass, …).
    pub segments: serde_json::Value,
    /// The per-segment score columns, `segment_K_STAGE`.
    pub segment_columns: Vec<String>,
    /// The data sets.
    pub datasets: Vec<DatasetInfo>,
    /// Training documents scored.
    pub n_docs: usize,
    /// The queries.
    pub queries: Vec<QueryReport>,
    /// The named query sets, by name.
    pub query_sets: Vec<QuerySetReport>,
    /// The stages' timings.
    pub stages: Vec<StageTiming>,
    /// Evaluation results, when eval stages completed.
    #[serde(skip)]
    pub eval: EvalResults,
    /// The sign convention the tables carry.
    pub sign_convention: String,
    /// The fine-tune's loss, when the run fine-tuned here (not for an imported trajectory).
    pub loss: Option<LossCurve>,
}

/// Counts of the known sources that attribution ranks badly, over all queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KnownFlags {
    /// Known sources that were scored.
    pub scored: usize,
    /// Ranked below [`FLAG_BELOW_RANK`].
    pub below_top_10: usize,
    /// With τ < 0: they worked against the completion (opponents).
    pub opponents: usize,
    /// Among the lowest [`BOTTOM_FRACTION`] of their query's scored documents.
    pub bottom_2_percent: usize,
}

impl KnownFlags {
    /// The summary's warning ("8 of 24 known sources rank below the top 10: 8 as opponents
    /// (τ < 0), 8 among the bottom 2%"), or `None` when every known source is in the top 10.
    pub fn warning(&self) -> Option<String> {
        if self.below_top_10 == 0 {
            return None;
        }
        Some(format!(
            "{} of {} known sources rank below the top {FLAG_BELOW_RANK}: {} as opponents \
             (τ < 0), {} among the bottom {}%",
            self.below_top_10,
            self.scored,
            self.opponents,
            self.bottom_2_percent,
            BOTTOM_FRACTION * 100.0
        ))
    }
}

/// The fine-tune's training loss: per optimizer step, and the mean of each epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LossCurve {
    /// (global step, loss J of the step).
    pub steps: Vec<(u64, f64)>,
    /// (first step, last step, mean loss) of each epoch, per training stage.
    pub epochs: Vec<(u64, u64, f64)>,
}

impl ReportData {
    /// The known sources ranked below the top 10, as opponents, or near the bottom.
    pub fn known_flags(&self) -> KnownFlags {
        let mut f = KnownFlags::default();
        for q in &self.queries {
            let bottom = q.n_scored as f64 * (1.0 - BOTTOM_FRACTION);
            for k in &q.known_ranks {
                f.scored += 1;
                if k.rank > FLAG_BELOW_RANK {
                    f.below_top_10 += 1;
                    f.opponents += usize::from(k.tau < 0.0);
                    f.bottom_2_percent += usize::from(k.rank as f64 > bottom);
                }
            }
        }
        f
    }

    /// Queries whose top proponent is a known source, out of those with known sources.
    pub fn found_counts(&self) -> (usize, usize) {
        let with: Vec<bool> = self
            .queries
            .iter()
            .filter_map(|q| q.found_at_top())
            .collect();
        (with.iter().filter(|&&f| f).count(), with.len())
    }
}

/// Whether stage `name` has completed in `run` (per its manifest).
fn completed(run: &RunDir, name: &str) -> Result<bool> {
    Ok(run
        .manifest()?
        .stages
        .get(name)
        .is_some_and(|r| r.status == StageStatus::Complete))
}

/// Reads evaluation results of the completed eval stages.
pub fn load_eval(run: &RunDir) -> Result<EvalResults> {
    let mut eval = EvalResults::default();
    if completed(run, RECALL_STAGE)? {
        eval.recall = Some(read_recall(&run.stage_dir(RECALL_STAGE))?);
    }
    if completed(run, LDS_STAGE)? {
        let (s, p) = read_lds(&run.stage_dir(LDS_STAGE))?;
        eval.lds = Some(s);
        eval.points = p;
    }
    Ok(eval)
}

/// Stage timings in pipeline order (then any others by name), leaving out `skip`.
pub fn load_timings(run: &RunDir, skip: &str) -> Result<Vec<StageTiming>> {
    let manifest = run.manifest()?;
    let mut names: Vec<&String> = manifest.stages.keys().filter(|n| *n != skip).collect();
    let pos = |n: &str| {
        STAGE_ORDER
            .iter()
            .position(|s| *s == n)
            .unwrap_or(usize::MAX)
    };
    names.sort_by(|a, b| pos(a).cmp(&pos(b)).then(a.cmp(b)));
    Ok(names
        .into_iter()
        .map(|n| {
            let r = &manifest.stages[n];
            StageTiming {
                stage: n.clone(),
                status: format!("{:?}", r.status).to_lowercase(),
                wall_s: r.wall_s,
                peak_rss_bytes: r.peak_rss_bytes,
                finished_at: r.finished_at.clone(),
            }
        })
        .collect())
}

/// The fine-tune's loss curve: `finetune/loss.parquet` per step, and the epoch means the
/// stage recorded in its summary (`stages[].epoch_mean_loss`, epochs of `steps_per_epoch`
/// steps from each training stage's `first_step`). `None` without a loss log.
pub fn load_loss(run: &RunDir) -> Result<Option<LossCurve>> {
    let path = run.stage_dir("finetune").join("loss.parquet");
    if !completed(run, "finetune")? || !path.is_file() {
        return Ok(None);
    }
    let t = Table::read(&path)?;
    let steps: Vec<(u64, f64)> = t
        .floats("step")?
        .into_iter()
        .map(|s| s as u64)
        .zip(t.floats("loss")?)
        .collect();
    let manifest = run.manifest()?;
    let summary = &manifest.stages["finetune"].summary;
    let mut epochs = Vec::new();
    for s in summary["stages"].as_array().into_iter().flatten() {
        let (Some(first), Some(n), Some(spe)) = (
            s["first_step"].as_u64(),
            s["steps"].as_u64(),
            s["steps_per_epoch"].as_u64(),
        ) else {
            continue;
        };
        let last = first + n.max(1) - 1;
        for (e, m) in s["epoch_mean_loss"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let lo = first + e as u64 * spe.max(1);
            if let Some(m) = m.as_f64().filter(|_| lo <= last) {
                epochs.push((lo, (lo + spe.max(1) - 1).min(last), m));
            }
        }
    }
    Ok(Some(LossCurve { steps, epochs }))
}

/// The tables of the score stage, turned into per-query reports.
pub struct ScoreTables {
    /// Run-level facts from the tables' metadata: model id, commit, method, segments.
    pub metadata: HashMap<String, String>,
    /// The `segment_K_STAGE` columns.
    pub segment_columns: Vec<String>,
    /// Scored documents per data set.
    pub docs_per_dataset: BTreeMap<String, usize>,
    /// The queries.
    pub queries: Vec<QueryReport>,
}

/// Reads a query set's scores dataset from `scores` (`score/query_set=NAME/`) and its
/// `{token_scores,train_docs,queries}.parquet` from `dir` and picks each query's top
/// [`PROPONENTS`] and [`OPPONENTS`], marking `known` sources.
pub fn load_scores(
    dir: &std::path::Path,
    scores: &std::path::Path,
    known: &BTreeMap<String, Vec<String>>,
) -> Result<ScoreTables> {
    let scores = Table::read_parts(scores)?;
    let segment_columns: Vec<String> = scores
        .column_names()
        .into_iter()
        .filter(|c| c.starts_with("segment_"))
        .collect();
    let q_ids = scores.strings("query_id")?;
    let t_ids = scores.strings("train_id")?;
    // The scored documents, from their list (the scores may keep only each query's top and
    // bottom `keep_top_bottom`).
    let train_docs = Table::read(&dir.join("train_docs.parquet"))?;
    let all_ids = train_docs.strings("train_id")?;
    let scored: std::collections::HashSet<&str> = all_ids.iter().map(String::as_str).collect();
    if let Some(note) = super::known::unknown_known_sources_note(known, &scored) {
        tracing::warn!("report: {note}");
    }
    let dataset = scores.strings("dataset")?;
    let score = scores.floats("score")?;
    let tau = scores.floats("tau")?;
    let n_train = scores.u32s("n_train")?;
    let rank = scores.u32s("rank")?;
    let seg_vals: Vec<Vec<f64>> = segment_columns
        .iter()
        .map(|c| scores.floats(c))
        .collect::<Result<_>>()?;

    let queries_t = Table::read(&dir.join("queries.parquet"))?;
    let qids = queries_t.strings("query_id")?;
    let prompts = queries_t.strings("prompt")?;
    let completions = queries_t.strings("completion")?;
    let measurements = queries_t.floats("measurement")?;

    // Rows of each query, by τ descending.
    let mut by_query: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, q) in q_ids.iter().enumerate() {
        by_query.entry(q.as_str()).or_default().push(i);
    }
    for rows in by_query.values_mut() {
        rows.sort_by(|&a, &b| tau[b].total_cmp(&tau[a]).then(rank[a].cmp(&rank[b])));
    }
    let mut docs_per_dataset: BTreeMap<String, usize> = BTreeMap::new();
    for d in train_docs.strings("dataset")? {
        *docs_per_dataset.entry(d).or_default() += 1;
    }

    let mut picked: Vec<(usize, Vec<usize>, Vec<usize>)> = Vec::new();
    for (qi, q) in qids.iter().enumerate() {
        let rows = by_query.get(q.as_str()).cloned().unwrap_or_default();
        let pro: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|&i| tau[i] > 0.0)
            .take(PROPONENTS)
            .collect();
        let opp: Vec<usize> = rows
            .iter()
            .rev()
            .copied()
            .filter(|&i| tau[i] < 0.0)
            .take(OPPONENTS)
            .collect();
        picked.push((qi, pro, opp));
    }

    // Text and tokens of the shown documents only.
    let wanted: HashSet<(String, String)> = picked
        .iter()
        .flat_map(|(_, p, o)| p.iter().chain(o))
        .map(|&i| (dataset[i].clone(), t_ids[i].clone()))
        .collect();
    let texts = doc_texts(dir, &wanted)?;
    let mut wanted_pairs: HashSet<(String, String)> = HashSet::new();
    for (qi, p, o) in &picked {
        for &i in p.iter().chain(o) {
            wanted_pairs.insert((qids[*qi].clone(), t_ids[i].clone()));
        }
    }
    let tok = Table::read(&dir.join("token_scores.parquet"))?;
    let mut tokens: HashMap<(String, String), Vec<(u32, Token)>> = HashMap::new();
    let (tq, tt, ti, tx, ts) = (
        tok.strings("query_id")?,
        tok.strings("train_id")?,
        tok.u32s("token_index")?,
        tok.strings("token_text")?,
        tok.floats("score")?,
    );
    for i in 0..tok.len() {
        let key = (tq[i].clone(), tt[i].clone());
        if wanted_pairs.contains(&key) {
            tokens.entry(key).or_default().push((
                ti[i],
                Token {
                    text: tx[i].clone(),
                    score: ts[i],
                },
            ));
        }
    }

    let entry = |q: &str, i: usize, known: &[String]| DocEntry {
        train_id: t_ids[i].clone(),
        dataset: dataset[i].clone(),
        rank: rank[i],
        tau: tau[i],
        score: score[i],
        n_train: n_train[i],
        segments: seg_vals.iter().map(|c| c[i]).collect(),
        known: known.contains(&t_ids[i]),
        text: texts
            .get(&(dataset[i].clone(), t_ids[i].clone()))
            .cloned()
            .unwrap_or_default(),
        tokens: tokens.get(&(q.to_string(), t_ids[i].clone())).map(|v| {
            let mut v = v.clone();
            v.sort_by_key(|(k, _)| *k);
            v.into_iter().map(|(_, t)| t).collect()
        }),
    };
    let queries = picked
        .into_iter()
        .map(|(qi, pro, opp)| {
            let q = qids[qi].as_str();
            let ks = known.get(q).cloned().unwrap_or_default();
            let rows = by_query.get(q).map(Vec::as_slice).unwrap_or(&[]);
            let mut known_ranks: Vec<KnownRank> = rows
                .iter()
                .filter(|&&i| ks.contains(&t_ids[i]))
                .map(|&i| KnownRank {
                    train_id: t_ids[i].clone(),
                    rank: rank[i],
                    tau: tau[i],
                })
                .collect();
            known_ranks.sort_by_key(|k| k.rank);
            let best_known_rank = known_ranks.first().map(|k| k.rank);
            QueryReport {
                query_id: q.to_string(),
                prompt: prompts[qi].clone(),
                completion: completions[qi].clone(),
                measurement: measurements[qi],
                n_scored: rows.len(),
                proponents: pro.iter().map(|&i| entry(q, i, &ks)).collect(),
                opponents: opp.iter().map(|&i| entry(q, i, &ks)).collect(),
                known_sources: ks,
                best_known_rank,
                known_ranks,
                generation: None,
                improbable: None,
            }
        })
        .collect::<Vec<_>>();
    let mut queries = queries;
    let mut gens = super::gen_data::load_generations(dir)?;
    for q in queries.iter_mut() {
        q.generation = gens.by_query.remove(&q.query_id);
        q.improbable = gens.improbable.get(&q.query_id).copied();
    }
    Ok(ScoreTables {
        metadata: scores.metadata.clone(),
        segment_columns,
        docs_per_dataset,
        queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{write_table, Column};

    fn s(v: &[&str]) -> Column {
        Column::Str(v.iter().map(|x| x.to_string()).collect())
    }

    /// Two queries over six documents with hand-picked τ: proponents are the τ > 0 ones by
    /// descending τ (at most PROPONENTS), opponents the τ < 0 ones from the most negative.
    #[test]
    fn picks_proponents_opponents_known_ranks_and_ordered_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let docs = ["d0", "d1", "d2", "d3", "d4", "d5"];
        let tau_a = [0.5, 0.4, 0.3, 0.2, -0.1, -0.6];
        let tau_b = [-0.2, -0.1, -0.3, -0.4, -0.5, 0.05];
        let mut rows: Vec<(&str, &str, f64)> = Vec::new();
        for (q, taus) in [("a", tau_a), ("b", tau_b)] {
            let mut r: Vec<(&str, &str, f64)> =
                docs.iter().zip(taus).map(|(d, t)| (q, *d, t)).collect();
            r.sort_by(|x, y| y.2.total_cmp(&x.2));
            rows.extend(r);
        }
        let rank: Vec<u32> = (0..12).map(|i| (i % 6) as u32 + 1).collect();
        let n = 10u32;
        let root = p.join("query_set=default");
        std::fs::create_dir_all(root.join("shard=0")).unwrap();
        write_table(
            &root.join("shard=0/part-00000.parquet"),
            &[
                ("query_id", s(&rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                ("train_id", s(&rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                ("dataset", s(&["train"; 12])),
                (
                    "score",
                    Column::F64(rows.iter().map(|r| r.2 * n as f64).collect()),
                ),
                ("n_train", Column::U32(vec![n; 12])),
                ("tau", Column::F64(rows.iter().map(|r| r.2).collect())),
                ("rank", Column::U32(rank)),
                (
                    "segment_0_finetune",
                    Column::F64(rows.iter().map(|r| r.2 * n as f64).collect()),
                ),
            ],
            &[("source_tda.method".into(), "source".into())],
        )
        .unwrap();
        write_table(
            &p.join("queries.parquet"),
            &[
                ("query_id", s(&["a", "b"])),
                ("prompt", s(&["P a", "P b"])),
                ("completion", s(&[" x", " y"])),
                ("measurement", Column::F64(vec![1.0, 2.0])),
            ],
            &[],
        )
        .unwrap();
        write_table(
            &p.join("train_docs.parquet"),
            &[
                ("train_id", s(&docs)),
                ("dataset", s(&["train"; 6])),
                ("text", s(&["t0", "t1", "t2", "t3", "t4", "t5"])),
            ],
            &[],
        )
        .unwrap();
        // Tokens of d0 for query a, stored out of order.
        write_table(
            &p.join("token_scores.parquet"),
            &[
                ("query_id", s(&["a", "a"])),
                ("train_id", s(&["d0", "d0"])),
                ("token_index", Column::U32(vec![1, 0])),
                ("token_text", s(&["0", "t"])),
                ("score", Column::F32(vec![2.0, 3.0])),
            ],
            &[],
        )
        .unwrap();
        let known: BTreeMap<String, Vec<String>> =
            [("a".to_string(), vec!["d2".to_string(), "d9".to_string()])].into();
        let t = load_scores(p, &root, &known).unwrap();
        assert_eq!(t.segment_columns, ["segment_0_finetune"]);
        assert_eq!(t.docs_per_dataset["train"], 6);
        let a = &t.queries[0];
        let ids = |v: &[DocEntry]| v.iter().map(|d| d.train_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a.proponents), ["d0", "d1", "d2", "d3"]);
        assert_eq!(ids(&a.opponents), ["d5", "d4"]);
        assert_eq!(a.best_known_rank, Some(3));
        let kr: Vec<(&str, u32)> = a
            .known_ranks
            .iter()
            .map(|k| (k.train_id.as_str(), k.rank))
            .collect();
        assert_eq!(kr, [("d2", 3)], "d9 was not scored");
        assert_eq!(a.found_at_top(), Some(false));
        assert!(a.proponents[2].known && !a.proponents[0].known);
        assert_eq!(a.proponents[0].text, "t0");
        assert_eq!(a.proponents[0].segments, [5.0]);
        let toks = a.proponents[0].tokens.as_ref().unwrap();
        assert_eq!(
            toks.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
            ["t", "0"]
        );
        assert!(a.proponents[1].tokens.is_none());
        let b = &t.queries[1];
        assert_eq!(ids(&b.proponents), ["d5"]);
        assert_eq!(ids(&b.opponents), ["d4", "d3", "d2"], "OPPONENTS = 3");
        assert_eq!(b.found_at_top(), None);
        assert_eq!(b.measurement, 2.0);
        assert_eq!(t.metadata["source_tda.method"], "source");
    }
}
