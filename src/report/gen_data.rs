//! Owns what the report shows of each query's own generation: `Generated`, `load_generations`.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! table.rs.
//!
//! For generated queries: each generated token y_j with log p(y_j | prompt, y_<j) and its
//! top proponent documents (`gen_scores.parquet`, τ > 0) with their per-token scores where
//! the score stage kept them (`gen_token_scores.parquet`). For given completions: whether the
//! model finds the completion improbable, by its mean −log p per completion token.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::error::Result;

use super::table::{doc_texts, Table};

/// One token of a shown document with its score (the scores add up to the document's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shade {
    /// The token's text.
    pub text: String,
    /// Its score.
    pub score: f64,
}

/// Proponent documents shown per generated token.
pub const GEN_PROPONENTS: usize = 3;

/// A given completion is flagged as improbable when its mean −log p per token is above this
/// (nats): the model gives its tokens less than 10% on average (geometric mean), so it would
/// not say it and the attribution explains a completion the model does not produce.
pub const IMPROBABLE_NATS_PER_TOKEN: f64 = std::f64::consts::LN_10;

/// One proponent document of a generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenDoc {
    /// Training document id.
    pub train_id: String,
    /// Its data set.
    pub dataset: String,
    /// Rank by τ for this generated token.
    pub rank: u32,
    /// τ = score / n_train.
    pub tau: f64,
    /// N of its data set.
    pub n_train: u32,
    /// Its text.
    pub text: String,
    /// Per-token scores, when kept.
    pub tokens: Option<Vec<Shade>>,
}

/// One generated token of a query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generated {
    /// j.
    pub gen_index: u32,
    /// Its text.
    pub text: String,
    /// log p(y_j | prompt, y_<j) under the final model.
    pub logprob: f64,
    /// Its top proponents (at most [`GEN_PROPONENTS`], τ > 0).
    pub docs: Vec<GenDoc>,
}

/// The generations and flags of one score folder's queries, by query id.
#[derive(Debug, Clone, Default)]
pub struct Generations {
    /// Each generated query's tokens (when `gen_tokens.parquet` exists).
    pub by_query: BTreeMap<String, Vec<Generated>>,
    /// The mean −log p per token of each given completion above
    /// [`IMPROBABLE_NATS_PER_TOKEN`].
    pub improbable: HashMap<String, f64>,
}

/// Reads the generations of the generated queries of score folder `dir` and flags the
/// improbable given completions (from `queries.parquet`'s `n_completion_tokens`).
pub fn load_generations(dir: &Path) -> Result<Generations> {
    let improbable = flag_improbable(dir)?;
    if !dir.join("gen_tokens.parquet").exists() {
        return Ok(Generations {
            by_query: BTreeMap::new(),
            improbable,
        });
    }
    let g = Table::read(&dir.join("gen_tokens.parquet"))?;
    let (gq, gi, gt, gl) = (
        g.strings("query_id")?,
        g.u32s("gen_index")?,
        g.strings("gen_token_text")?,
        g.floats("logprob")?,
    );
    let mut by_query: BTreeMap<String, Vec<Generated>> = BTreeMap::new();
    for i in 0..g.len() {
        by_query.entry(gq[i].clone()).or_default().push(Generated {
            gen_index: gi[i],
            text: gt[i].clone(),
            logprob: gl[i],
            docs: Vec::new(),
        });
    }
    for v in by_query.values_mut() {
        v.sort_by_key(|t| t.gen_index);
    }
    attach_docs(dir, &mut by_query)?;
    Ok(Generations {
        by_query,
        improbable,
    })
}

/// The top proponents of every generated token, with text and per-token scores.
fn attach_docs(dir: &Path, by_query: &mut BTreeMap<String, Vec<Generated>>) -> Result<()> {
    let path = dir.join("gen_scores.parquet");
    if !path.exists() {
        return Ok(());
    }
    let s = Table::read(&path)?;
    let (q, gi, tid, ds, tau, n, rank) = (
        s.strings("query_id")?,
        s.u32s("gen_index")?,
        s.strings("train_id")?,
        s.strings("dataset")?,
        s.floats("tau")?,
        s.u32s("n_train")?,
        s.u32s("rank")?,
    );
    let mut rows: Vec<usize> = (0..s.len()).filter(|&i| tau[i] > 0.0).collect();
    rows.sort_by_key(|&i| rank[i]);
    let mut wanted: HashSet<(String, String)> = HashSet::new();
    for i in rows {
        let Some(toks) = by_query.get_mut(&q[i]) else {
            continue;
        };
        let Some(t) = toks.iter_mut().find(|t| t.gen_index == gi[i]) else {
            continue;
        };
        if t.docs.len() < GEN_PROPONENTS {
            wanted.insert((ds[i].clone(), tid[i].clone()));
            t.docs.push(GenDoc {
                train_id: tid[i].clone(),
                dataset: ds[i].clone(),
                rank: rank[i],
                tau: tau[i],
                n_train: n[i],
                text: String::new(),
                tokens: None,
            });
        }
    }
    let texts = doc_texts(dir, &wanted)?;
    let mut tokens: HashMap<(String, u32, String), Vec<(u32, Shade)>> = HashMap::new();
    let tpath = dir.join("gen_token_scores.parquet");
    if tpath.exists() {
        let t = Table::read(&tpath)?;
        let (tq, tg, tt, ti, tx, ts) = (
            t.strings("query_id")?,
            t.u32s("gen_index")?,
            t.strings("train_id")?,
            t.u32s("token_index")?,
            t.strings("token_text")?,
            t.floats("score")?,
        );
        for i in 0..t.len() {
            tokens
                .entry((tq[i].clone(), tg[i], tt[i].clone()))
                .or_default()
                .push((
                    ti[i],
                    Shade {
                        text: tx[i].clone(),
                        score: ts[i],
                    },
                ));
        }
    }
    for (q, toks) in by_query.iter_mut() {
        for t in toks.iter_mut() {
            for d in t.docs.iter_mut() {
                d.text = texts
                    .get(&(d.dataset.clone(), d.train_id.clone()))
                    .cloned()
                    .unwrap_or_default();
                d.tokens = tokens
                    .get(&(q.clone(), t.gen_index, d.train_id.clone()))
                    .map(|v| {
                        let mut v = v.clone();
                        v.sort_by_key(|(k, _)| *k);
                        v.into_iter().map(|(_, t)| t).collect()
                    });
            }
        }
    }
    Ok(())
}

/// The mean −log p per completion token of every given (not generated) completion above
/// [`IMPROBABLE_NATS_PER_TOKEN`], by query id; none for tables without the columns (older
/// runs).
fn flag_improbable(dir: &Path) -> Result<HashMap<String, f64>> {
    let t = Table::read(&dir.join("queries.parquet"))?;
    let cols = t.column_names();
    let has = |c: &str| cols.iter().any(|x| x == c);
    let mut out = HashMap::new();
    if !has("n_completion_tokens") {
        return Ok(out);
    }
    let ids = t.strings("query_id")?;
    let n = t.u32s("n_completion_tokens")?;
    let f = t.floats("measurement")?;
    let generated = if has("generated") {
        t.bools("generated")?
    } else {
        vec![false; ids.len()]
    };
    for i in 0..ids.len() {
        if generated[i] || n[i] == 0 {
            continue;
        }
        let per_token = f[i] / f64::from(n[i]);
        if per_token > IMPROBABLE_NATS_PER_TOKEN {
            out.insert(ids[i].clone(), per_token);
        }
    }
    Ok(out)
}
