//! Owns the generated tokens' score tables: `GenScores` and `write_gen_outputs`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `fetch`, `query_tokens`, `score_text`.
//!
//! Writes, beside the whole-completion tables, `gen_tokens.parquet` (every generated token:
//! query_id, gen_index, gen_token_id, gen_token_text, logprob = log p(y_j | prompt, y_<j)),
//! `gen_scores.parquet` (the top `[attribution.generated] top_k` documents of each generated
//! token by τ = score / n_train, with rank) and `gen_token_scores.parquet` (per-token scores
//! of the top `detail_docs` documents of the generated tokens picked within `detail_budget`).

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::data::tokenize::load_tokenizer;
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::output::{write_table, Column};
use crate::pipeline::StageContext;
use crate::report::table::Table;

use super::fetch::Fetched;
use super::query_tokens::GEN_TOKENS;
use super::score_text::doc_token_texts;

/// The documents of one data role and the generated tokens' scores against them.
pub(super) struct GenRole {
    /// The role's documents.
    pub docs: Vec<PreparedDoc>,
    /// N of the role's data set.
    pub n_train: u64,
    /// Σ over the role's segments and scoring points: `[K][N]`.
    pub scores: Vec<Vec<f64>>,
}

/// The key-value metadata of a table, by the table's name (the score stage's).
pub(super) type Metadata<'a> = dyn Fn(&str) -> Result<Vec<(String, String)>> + 'a;

/// One generated token as the query stage recorded it.
struct GenTokenRow {
    query_id: String,
    gen_index: u32,
    token_id: u32,
    text: String,
    logprob: f64,
}

/// (role, document index within the role).
type DocKey = (String, usize);

/// The generated tokens' document scores, their rankings and the per-token details.
pub(super) struct GenScores {
    tokens: Vec<GenTokenRow>,
    /// The roles' documents and `[K][N]` scores.
    pub roles: BTreeMap<String, GenRole>,
    /// Per generated token, every document by τ descending: (role, m, score, τ).
    ranked: Vec<Vec<(String, usize, f64, f64)>>,
    /// Per-training-token scores of (generated token, document).
    detail: BTreeMap<(usize, String, usize), Vec<f32>>,
}

impl GenScores {
    /// Reads the query stage's token table (which must list the K tokens of the gradients)
    /// and ranks every token's documents.
    pub fn new(ctx: &StageContext, roles: BTreeMap<String, GenRole>) -> Result<GenScores> {
        let path = ctx.input_dir("query").join(GEN_TOKENS);
        let t = Table::read(&path)?;
        let (q, gi, id, text, lp) = (
            t.strings("query_id")?,
            t.u32s("gen_index")?,
            t.u32s("gen_token_id")?,
            t.strings("gen_token_text")?,
            t.floats("logprob")?,
        );
        let k = roles.values().next().map(|r| r.scores.len()).unwrap_or(0);
        if q.len() != k {
            return Err(Error::Pipeline(format!(
                "{} lists {} generated tokens but their gradients have {k}; rerun the query stage",
                path.display(),
                q.len()
            )));
        }
        let tokens: Vec<GenTokenRow> = (0..k)
            .map(|i| GenTokenRow {
                query_id: q[i].clone(),
                gen_index: gi[i],
                token_id: id[i],
                text: text[i].clone(),
                logprob: lp[i],
            })
            .collect();
        let ranked = (0..k)
            .map(|t| {
                let mut rows: Vec<(String, usize, f64, f64)> = roles
                    .iter()
                    .flat_map(|(role, r)| {
                        r.scores[t]
                            .iter()
                            .enumerate()
                            .map(move |(m, &s)| (role.clone(), m, s, s / r.n_train.max(1) as f64))
                    })
                    .collect();
                rows.sort_by(|a, b| b.3.total_cmp(&a.3));
                rows
            })
            .collect();
        Ok(GenScores {
            tokens,
            roles,
            ranked,
            detail: BTreeMap::new(),
        })
    }

    /// The generated tokens whose top `docs` documents get per-token scores, with those
    /// documents: tokens taken by generation index, then query (every query's first token,
    /// then every query's second, …), while the documents' tokens fit in `budget` rows.
    pub fn pick_detail(&self, docs: usize, budget: usize) -> BTreeMap<usize, Vec<DocKey>> {
        let mut order: Vec<usize> = (0..self.tokens.len()).collect();
        order.sort_by_key(|&t| (self.tokens[t].gen_index, t));
        let mut picked = BTreeMap::new();
        let mut used = 0usize;
        if docs == 0 {
            return picked;
        }
        for t in order {
            let top: Vec<DocKey> = self.ranked[t]
                .iter()
                .take(docs)
                .map(|(r, m, _, _)| (r.clone(), *m))
                .collect();
            let rows: usize = top
                .iter()
                .map(|(r, m)| self.roles[r].docs[*m].n_tokens())
                .sum();
            if used + rows > budget {
                tracing::info!(
                    "score: per-token scores for {} of {} generated tokens \
                     (attribution.generated.detail_budget = {budget} rows)",
                    picked.len(),
                    self.tokens.len()
                );
                break;
            }
            used += rows;
            picked.insert(t, top);
        }
        picked
    }

    /// Records the per-token scores of generated token `t` against document `m` of `role`.
    pub fn add_detail(&mut self, t: usize, role: &str, m: usize, scores: &[f32]) {
        let n = self.roles[role].docs[m].n_tokens();
        self.detail
            .insert((t, role.to_string(), m), scores[..n].to_vec());
    }
}

/// Writes the three tables; returns the summary's part.
pub(super) fn write_gen_outputs(
    ctx: &StageContext,
    s: &GenScores,
    top_k: usize,
    metadata: &Metadata,
) -> Result<serde_json::Value> {
    let from = ctx.input_dir("query").join(GEN_TOKENS);
    std::fs::copy(&from, ctx.out(GEN_TOKENS)).ctx("copying", &from)?;
    // gen_scores.parquet
    let mut c = ScoreCols::default();
    for (t, rows) in s.ranked.iter().enumerate() {
        let keep = if top_k == 0 { rows.len() } else { top_k };
        for (rank, (role, m, score, tau)) in rows.iter().take(keep).enumerate() {
            let r = &s.roles[role];
            c.push(
                &s.tokens[t],
                &r.docs[*m].doc_id,
                role,
                *score,
                r.n_train,
                *tau,
            );
            c.rank.push(rank as u32 + 1);
        }
    }
    let n_rows = c.query_id.len();
    write_table(
        &ctx.out("gen_scores.parquet"),
        &c.columns(),
        &metadata("gen_scores")?,
    )?;
    // gen_token_scores.parquet
    let tokenizer = load_tokenizer(Fetched::load(ctx.run)?.tokenizer_path())?;
    let mut texts: HashMap<(String, usize), Vec<String>> = HashMap::new();
    let (mut q, mut gi, mut tid, mut ds, mut ti, mut tok, mut tt, mut sc) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for ((t, role, m), scores) in &s.detail {
        let doc = &s.roles[role].docs[*m];
        let pieces = texts
            .entry((role.clone(), *m))
            .or_insert_with(|| doc_token_texts(ctx, role, doc, &tokenizer));
        for (i, &x) in scores.iter().enumerate() {
            q.push(s.tokens[*t].query_id.clone());
            gi.push(s.tokens[*t].gen_index);
            tid.push(doc.doc_id.clone());
            ds.push(role.clone());
            ti.push(i as u32);
            tok.push(doc.input_ids[i]);
            tt.push(pieces[i].clone());
            sc.push(x);
        }
    }
    let n_detail = q.len();
    write_table(
        &ctx.out("gen_token_scores.parquet"),
        &[
            ("query_id", Column::Str(q)),
            ("gen_index", Column::U32(gi)),
            ("train_id", Column::Str(tid)),
            ("dataset", Column::Str(ds)),
            ("token_index", Column::U32(ti)),
            ("token_id", Column::U32(tok)),
            ("token_text", Column::Str(tt)),
            ("score", Column::F32(sc)),
        ],
        &metadata("gen_token_scores")?,
    )?;
    let detailed: std::collections::BTreeSet<usize> = s.detail.keys().map(|k| k.0).collect();
    Ok(
        json!({"tokens": s.tokens.len(), "rows": n_rows, "detail_tokens": detailed.len(),
              "detail_rows": n_detail}),
    )
}

/// The columns of `gen_scores.parquet`.
#[derive(Default)]
struct ScoreCols {
    query_id: Vec<String>,
    gen_index: Vec<u32>,
    gen_token_id: Vec<u32>,
    gen_token_text: Vec<String>,
    logprob: Vec<f64>,
    train_id: Vec<String>,
    dataset: Vec<String>,
    score: Vec<f64>,
    n_train: Vec<u32>,
    tau: Vec<f64>,
    rank: Vec<u32>,
}

impl ScoreCols {
    fn push(&mut self, g: &GenTokenRow, doc: &str, role: &str, score: f64, n: u64, tau: f64) {
        self.query_id.push(g.query_id.clone());
        self.gen_index.push(g.gen_index);
        self.gen_token_id.push(g.token_id);
        self.gen_token_text.push(g.text.clone());
        self.logprob.push(g.logprob);
        self.train_id.push(doc.to_string());
        self.dataset.push(role.to_string());
        self.score.push(score);
        self.n_train.push(n as u32);
        self.tau.push(tau);
    }

    fn columns(&self) -> Vec<(&'static str, Column)> {
        vec![
            ("query_id", Column::Str(self.query_id.clone())),
            ("gen_index", Column::U32(self.gen_index.clone())),
            ("gen_token_id", Column::U32(self.gen_token_id.clone())),
            ("gen_token_text", Column::Str(self.gen_token_text.clone())),
            ("logprob", Column::F64(self.logprob.clone())),
            ("train_id", Column::Str(self.train_id.clone())),
            ("dataset", Column::Str(self.dataset.clone())),
            ("score", Column::F64(self.score.clone())),
            ("n_train", Column::U32(self.n_train.clone())),
            ("tau", Column::F64(self.tau.clone())),
            ("rank", Column::U32(self.rank.clone())),
        ]
    }
}
