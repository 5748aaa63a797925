//! Owns the score stage's scoring passes over documents streamed from disk: `RoleScores` (a
//! data role's token ids in a scratch `DocStore`, each segment's scores in a scratch
//! `ScratchMatrix`), `score_segments` and `add_leader_tokens`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `score`, `score_candidates`, `score_queries`.
//!
//! Memory does not grow with the number of documents N beyond 16 bytes per document (the
//! store's offsets and the batch plan): documents are read from the prepared table a record
//! batch at a time into the store, and each scoring pass runs the length-sorted batch plan of
//! the whole role ([`crate::passes::for_each_batch`]) a chunk of consecutive batches at a
//! time. Every batch holds the same documents, padded the same way, as in one pass over all
//! documents, so every document score is bitwise the one that pass computes; the scores of a
//! segment's scoring models are added, model after model, into its [N][Q] scratch matrix,
//! 0.0 + s₁ + s₂ + … as in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::attribution::plan::AttributionPlan;
use crate::attribution::{score_pass_parts, ScoreParts};
use crate::backend::Backend;
use crate::config::Config;
use crate::data::{for_each_prepared, plan_batches, Batch, BatchOrder, DocStore, PreparedDoc};
use crate::error::Result;
use crate::linalg::LayerQuery;
use crate::output::keep::Ranked;
use crate::passes::PassOptions;
use crate::pipeline::StageContext;
use crate::util::scratch::ScratchMatrix;
use crate::util::shard::Shard;

use super::attribute::{fit_options, load_model_on, prepared_path};
use super::score_candidates::Candidates;
use super::score_queries::Queries;

/// A chunk of a scoring pass closes before its batches hold more than this many token
/// budgets (padded tokens) or [`CHUNK_BATCHES`] batches: it bounds the documents held at
/// once, whatever N.
const CHUNK_BUDGETS: usize = 8;

/// At most this many batches per chunk.
const CHUNK_BATCHES: usize = 16;

/// The documents of one data role that are scored (every prepared document, or the
/// candidates) and what the passes computed for them, by position m among them.
pub(super) struct RoleScores {
    /// The role's prepared table.
    pub(super) path: PathBuf,
    /// The positions in the prepared table of the documents scored; None: all of them.
    pub(super) picked: Option<BTreeSet<usize>>,
    /// Their token ids and loss masks.
    pub(super) store: DocStore,
    /// N of the role's data set.
    pub(super) n_train: u64,
    /// Per planned segment of this role (by index), its scores [m][Q].
    pub(super) per_segment: BTreeMap<usize, ScratchMatrix>,
    /// Per-token sums [Q][T] of the documents that get them (every document with
    /// `all_token_scores`, else each query's top-k, added by [`add_leader_tokens`]).
    pub(super) tokens: HashMap<usize, Vec<Vec<f32>>>,
    /// A shard's: which documents its batches hold (the others are not scored); None: all.
    pub(super) owned: Option<Vec<bool>>,
}

impl RoleScores {
    /// Streams role `role`'s prepared table (only the positions `picked`, if given) into a
    /// store in `dir`.
    fn open(
        ctx: &StageContext,
        role: &str,
        n_train: u64,
        picked: Option<BTreeSet<usize>>,
        (dir, shard): (&Path, Option<Shard>),
    ) -> Result<RoleScores> {
        let path = prepared_path(ctx.run, role)?;
        let mut w = DocStore::create(&dir.join(format!("{role}.tokens")))?;
        for_each_prepared(&path, |first, docs| {
            for (i, d) in docs.iter().enumerate() {
                if picked.as_ref().is_none_or(|p| p.contains(&(first + i))) {
                    w.push(d)?;
                }
            }
            Ok(())
        })?;
        let store = w.finish()?;
        let owned = shard.map(|s| {
            let mut owned = vec![false; store.len()];
            for b in chunked_plan(&store, &fit_options(ctx.config), Some(s)).0 {
                for i in b.docs {
                    owned[i] = true;
                }
            }
            owned
        });
        Ok(RoleScores {
            path,
            picked,
            store,
            n_train,
            per_segment: BTreeMap::new(),
            tokens: HashMap::new(),
            owned,
        })
    }

    /// Documents of the role (positions m; a shard scores only those it owns).
    pub(super) fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether document m is scored here (every one, or the shard's own).
    pub(super) fn scores(&self, m: usize) -> bool {
        self.owned.as_ref().is_none_or(|o| o[m])
    }

    /// Documents scored here.
    pub(super) fn scored(&self) -> usize {
        self.owned
            .as_ref()
            .map_or(self.len(), |o| o.iter().filter(|&&x| x).count())
    }

    /// Streams the scored documents (whole, with id and text) from the prepared table:
    /// `f(m, doc)` in order.
    pub(super) fn for_each_doc(
        &self,
        mut f: impl FnMut(usize, PreparedDoc) -> Result<()>,
    ) -> Result<()> {
        let mut m = 0;
        for_each_prepared(&self.path, |first, docs| {
            for (i, d) in docs.into_iter().enumerate() {
                if self
                    .picked
                    .as_ref()
                    .is_none_or(|p| p.contains(&(first + i)))
                {
                    f(m, d)?;
                    m += 1;
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// Whether every document's per-token scores are written (`all_token_scores`, or top_k 0):
/// then the scoring passes keep them; otherwise only the top-k documents' are computed, in a
/// second pass over those documents once the ranking is known.
pub(super) fn all_tokens(config: &Config) -> bool {
    config.attribution.all_token_scores || config.attribution.top_k == 0
}

/// The passes of plan segment `l`: each scoring model with its u.
fn segment_passes<'a>(
    p: &'a AttributionPlan,
    queries: &'a Queries,
    l: usize,
) -> Vec<(PathBuf, &'a [LayerQuery])> {
    p.score_points()
        .into_iter()
        .zip(&queries.u)
        .filter(|(pt, _)| pt.segment == l)
        .map(|(pt, u)| (pt.model, &u[..]))
        .collect()
}

/// Scores every document of every segment's data role against every query: per segment,
/// the sum of its scoring passes ([`AttributionPlan::score_points`]: one per model its step
/// groups took gradients at, or the average over its checkpoints for a declared segment),
/// into a scratch matrix in `dir`; with `cands`, only the candidate documents; with
/// `shard`, only the documents of the batches it owns (the others' rows stay 0).
pub(super) fn score_segments(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    cands: Option<&Candidates>,
    (dir, shard): (&Path, Option<Shard>),
) -> Result<BTreeMap<String, RoleScores>> {
    let opts = fit_options(ctx.config);
    let mut roles: BTreeMap<String, RoleScores> = BTreeMap::new();
    let tokens = all_tokens(ctx.config);
    for (l, seg) in p.segments.iter().enumerate() {
        crate::util::progress::set_part(format!("segment {}/{}", l + 1, p.segments.len()));
        if !roles.contains_key(&seg.role) {
            let picked = cands.map(|c| c.picked(&seg.role));
            let r = RoleScores::open(ctx, &seg.role, seg.n_docs, picked, (dir, shard))?;
            roles.insert(seg.role.clone(), r);
        }
        let r = roles.get_mut(&seg.role).expect("inserted above");
        let path = dir.join(format!("segment-{}.f64", seg.index));
        let mut acc = ScratchMatrix::create(&path, r.len(), queries.q)?;
        let passes = segment_passes(p, queries, l);
        let backend = queries.backend.as_ref();
        score_chunks(
            ctx.config,
            backend,
            &passes,
            r,
            &mut acc,
            (tokens, shard),
            &opts,
        )?;
        r.per_segment.insert(seg.index, acc);
        ctx.failpoint(&format!("after-segment-{}", seg.index))?;
    }
    Ok(roles)
}

/// The batch plan of the role's documents (as [`crate::passes::for_each_batch`] makes it; a
/// shard's batches k ≡ i − 1 (mod n) of it) and its chunks: runs of consecutive batches of at
/// most [`CHUNK_BUDGETS`] token budgets and [`CHUNK_BATCHES`] batches. Planning a chunk's
/// documents again (in this order) gives back its batches: sorted by length, a batch is its
/// first document and as many after it as its padded length and the limits allow.
fn chunked_plan(
    store: &DocStore,
    opts: &PassOptions,
    shard: Option<Shard>,
) -> (Vec<Batch>, Vec<Range<usize>>) {
    let plan: Vec<Batch> = plan_batches(
        &store.lengths(),
        opts.token_budget,
        opts.max_batch_size,
        BatchOrder::LengthSorted,
    )
    .into_iter()
    .enumerate()
    .filter(|(k, _)| shard.is_none_or(|s| s.owns(*k)))
    .map(|(_, b)| b)
    .collect();
    let limit = CHUNK_BUDGETS * opts.token_budget.max(1);
    let mut chunks = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (k, b) in plan.iter().enumerate() {
        if k > start && (tokens + b.padded_tokens() > limit || k - start == CHUNK_BATCHES) {
            chunks.push(start..k);
            (start, tokens) = (k, 0);
        }
        tokens += b.padded_tokens();
    }
    if start < plan.len() {
        chunks.push(start..plan.len());
    }
    (plan, chunks)
}

/// Reads documents `idx` of the store.
fn load(store: &mut DocStore, idx: &[usize]) -> Result<Vec<PreparedDoc>> {
    idx.iter().map(|&i| store.get(i)).collect()
}

/// Adds one scoring pass per (model, u) in `passes` over the role's documents (a shard's:
/// those of its batches) into
/// `acc` [m][Q], chunk by chunk of the role's batch plan; with `tokens`, their per-token
/// scores likewise into `r.tokens`.
fn score_chunks(
    config: &Config,
    backend: &dyn Backend,
    passes: &[(PathBuf, &[LayerQuery])],
    r: &mut RoleScores,
    acc: &mut ScratchMatrix,
    (tokens, shard): (bool, Option<Shard>),
    opts: &PassOptions,
) -> Result<()> {
    let (plan, chunks) = chunked_plan(&r.store, opts, shard);
    let parts = ScoreParts {
        tokens,
        per_layer: false,
    };
    let mut row = vec![0f64; acc.cols()];
    for (ckpt, u) in passes {
        let model = load_model_on(ckpt, backend.device(), config)?;
        for c in &chunks {
            // In plan order, so the pass below plans exactly these batches again.
            let idx: Vec<usize> = plan[c.clone()]
                .iter()
                .flat_map(|b| b.docs.iter().copied())
                .collect();
            let docs = load(&mut r.store, &idx)?;
            let s = score_pass_parts(backend, &model, &docs, u, opts, parts)?;
            drop(docs);
            for (k, &i) in idx.iter().enumerate() {
                for (x, per_q) in row.iter_mut().zip(&s.docs) {
                    *x = per_q[k];
                }
                acc.add_row(i, &row)?;
            }
            add_tokens(&mut r.tokens, &idx, s.tokens)?;
        }
    }
    Ok(())
}

/// Adds per-token scores [k][Q][T] of documents `idx` (by position k) into `into`.
fn add_tokens(
    into: &mut HashMap<usize, Vec<Vec<f32>>>,
    idx: &[usize],
    tokens: Option<Vec<Vec<Vec<f32>>>>,
) -> Result<()> {
    for (k, per_q) in tokens.into_iter().flatten().enumerate() {
        let slot = into
            .entry(idx[k])
            .or_insert_with(|| per_q.iter().map(|row| vec![0f32; row.len()]).collect());
        for (qi, row) in per_q.iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                slot[qi][t] += *v;
            }
        }
    }
    Ok(())
}

/// Where each scored document sits: data roles by name, then each role's documents; global
/// index j ↔ (role, m).
pub(super) struct DocIndex {
    /// (role, first j, documents).
    spans: Vec<(String, usize, usize)>,
    /// Documents in all.
    pub(super) n: usize,
}

impl DocIndex {
    pub(super) fn new(roles: &BTreeMap<String, RoleScores>) -> DocIndex {
        let mut spans = Vec::new();
        let mut n = 0;
        for (role, r) in roles {
            spans.push((role.clone(), n, r.len()));
            n += r.len();
        }
        DocIndex { spans, n }
    }

    /// The role and position m of document j.
    pub(super) fn locate(&self, j: usize) -> (&str, usize) {
        let s = self.spans.partition_point(|(_, first, _)| *first <= j) - 1;
        let (role, first, _) = &self.spans[s];
        (role, j - first)
    }

    /// The first j of role `role`.
    pub(super) fn first(&self, role: &str) -> usize {
        self.spans
            .iter()
            .find(|(r, _, _)| r == role)
            .map_or(self.n, |s| s.1)
    }
}

/// The per-token scores of the documents `leaders` names (global indices, [`DocIndex`]), from
/// one more scoring pass per scoring model over those documents only.
pub(super) fn add_leader_tokens(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    roles: &mut BTreeMap<String, RoleScores>,
    leaders: &[Vec<Ranked>],
) -> Result<()> {
    let index = DocIndex::new(roles);
    let mut wanted: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for r in leaders.iter().flatten() {
        let (role, m) = index.locate(r.j);
        wanted.entry(role.to_string()).or_default().insert(m);
    }
    let opts = fit_options(ctx.config);
    let parts = ScoreParts {
        tokens: true,
        per_layer: false,
    };
    for (l, seg) in p.segments.iter().enumerate() {
        let (Some(only), Some(r)) = (wanted.get(&seg.role), roles.get_mut(&seg.role)) else {
            continue;
        };
        let only: Vec<usize> = only.iter().copied().collect();
        let backend = queries.backend.as_ref();
        for (ckpt, u) in segment_passes(p, queries, l) {
            let model = load_model_on(&ckpt, backend.device(), ctx.config)?;
            let docs = load(&mut r.store, &only)?;
            let s = score_pass_parts(backend, &model, &docs, u, &opts, parts)?;
            add_tokens(&mut r.tokens, &only, s.tokens)?;
        }
    }
    Ok(())
}
