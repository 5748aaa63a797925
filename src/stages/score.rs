//! Owns the `score` stage: preconditioned queries, scoring passes, and the score tables.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `fetch`, `score_acting`, `score_gen`, `score_queries`, `score_text`.
//!
//! `score`: the backwards walk over segments and the training passes that score every
//! document of every segment's data against every query, per document and per token, in
//! one pass per checkpoint (docs/design.md §2, §5). Writes the scores dataset
//! (`query_set=NAME/shard=0/part-00000.parquet`, streamed a row group at a time, every
//! document or each query's top and bottom `keep_top_bottom`), `token_scores.parquet` (top-k
//! documents per query, or all), `queries.parquet` and `train_docs.parquet`; for generated
//! queries also the per-generated-token tables ([`super::score_gen`]).
//!
//! `score` is the raw Σ_ℓ ⟨u_ℓ, ḡ_ℓ(m)⟩ and `n_train` the N of the document's data set, so
//! τ = score / n_train; τ > 0 means the document helped the model produce the completion (a
//! proponent). Per-segment columns `segment_K_STAGE` add up to `score`.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::attribution::plan::AttributionPlan;
use crate::attribution::{score_pass_parts, ScoreParts};
use crate::backend::Backend;
use crate::config::{Config, MethodKind};
use crate::data::tokenize::load_tokenizer;
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::linalg::LayerQuery;
use crate::output::dataset::{shard_dir, PartWriter, FIRST_PART};
use crate::output::keep::Ranked;
use crate::output::parquet::ROW_GROUP;
use crate::output::score_rows::{write_scores, Keep, ScoreTable, ScoredDoc, SegmentScores};
use crate::output::{write_table, Column};
use crate::passes::PassOptions;
use crate::pipeline::{scores_root_in_stage, Stage, StageContext};
use crate::train::{OptimizerInfo, Trajectory};
use crate::util::hash::sha256_json;

use super::attribute::{device_view, fit_options, load_model_on, plan, role_docs};
use super::fetch::Fetched;
use super::score_acting::write_acting;
use super::score_candidates::{find_candidates, Candidates};
use super::score_queries::{precondition_queries, Queries};
use super::score_text::doc_token_texts;

/// How τ's sign reads; stored in every output file.
pub const SIGN_CONVENTION: &str = "tau = score / n_train approximates f(trained without m) - \
    f(trained with m), f = -log p(completion | prompt); tau > 0: the document helped the model \
    produce the completion (proponent); tau < 0: opponent";

/// The `score` stage.
pub struct ScoreStage;

/// Key-value metadata every output table carries.
pub fn table_metadata(ctx: &StageContext, table: &str) -> Result<Vec<(String, String)>> {
    let fetched = Fetched::load(ctx.run)?;
    let p = plan(ctx.config, ctx.run)?;
    // The score stage's own tables carry where curvature acts (`acting.json`, written first).
    let acting: serde_json::Value = match table {
        "queries" => json!([]),
        _ => std::fs::read_to_string(ctx.out("acting.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(json!([])),
    };
    let segments: Vec<serde_json::Value> = p
        .segments
        .iter()
        .enumerate()
        .map(|(l, s)| {
            let mut j = json!({"index": s.index, "stage": s.stage, "role": s.role,
                "n": s.n_docs, "mass": s.mass, "checkpoints": s.checkpoints.len()});
            if let Some(a) = acting.get(l) {
                for k in ["curvature_share", "query_energy_share"] {
                    if let Some(x) = a.get(k).filter(|x| !x.is_null()) {
                        j[k] = x.clone();
                    }
                }
            }
            j
        })
        .collect();
    let mut meta: Vec<(String, String)> = vec![
        ("source_tda.version".into(), crate::VERSION.into()),
        ("source_tda.table".into(), table.into()),
        (
            "source_tda.config_hash".into(),
            sha256_json(&ctx.config.to_json()),
        ),
        ("source_tda.model_id".into(), fetched.model.id.clone()),
        (
            "source_tda.model_revision".into(),
            fetched.model.revision.clone().unwrap_or_default(),
        ),
        (
            "source_tda.model_commit".into(),
            fetched.model.commit.clone().unwrap_or_default(),
        ),
        (
            "source_tda.method".into(),
            format!("{:?}", p.method).to_lowercase(),
        ),
        ("source_tda.segments".into(), json!(segments).to_string()),
        (
            "source_tda.preconditioning".into(),
            preconditioning(ctx, p.method, table).to_string(),
        ),
        ("source_tda.sign_convention".into(), SIGN_CONVENTION.into()),
    ];
    if let Some(c) = &ctx.config.attribution.candidates {
        // Only candidates were scored: ranks are among them.
        meta.push(("source_tda.candidates".into(), json!(c).to_string()));
    }
    Ok(meta)
}

/// How the queries were preconditioned, for the tables' metadata: `none` (gradient dot
/// product), `ekfac`, or the refinement's method, iterations, document sample and largest
/// final relative residual (`refine.json`, written before the score tables).
fn preconditioning(ctx: &StageContext, method: MethodKind, table: &str) -> serde_json::Value {
    let refined: Option<serde_json::Value> = (table != "queries")
        .then(|| std::fs::read_to_string(ctx.out("refine.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    match (method, refined) {
        (MethodKind::GradientDot, _) => json!({"method": "none"}),
        (_, Some(r)) => json!({"method": "ekfac+cg", "iterations": r["iterations"],
            "tolerance": r["tolerance"], "documents": r["documents"],
            "final_residual_max": r["final_residual_max"]}),
        _ => json!({"method": "ekfac"}),
    }
}

/// Scores of one data role: per segment [Q][N], and per-token sums [Q][T] of the documents
/// that get them (every document with `all_token_scores`, else each query's top-k, added
/// after the ranking by [`add_leader_tokens`]), by position in `docs`.
struct RoleScores {
    docs: Vec<PreparedDoc>,
    n_train: u64,
    per_segment: BTreeMap<usize, Vec<Vec<f64>>>,
    tokens: HashMap<usize, Vec<Vec<f32>>>,
}

/// Whether every document's per-token scores are written (`all_token_scores`, or top_k 0):
/// then the scoring passes keep them; otherwise only the top-k documents' are computed, in a
/// second pass over those documents once the ranking is known.
fn all_tokens(config: &Config) -> bool {
    config.attribution.all_token_scores || config.attribution.top_k == 0
}

/// The passes of plan segment `l`: each scoring model with its u.
fn segment_passes<'a>(
    p: &'a AttributionPlan,
    queries: &'a Queries,
    l: usize,
) -> Vec<(std::path::PathBuf, &'a [LayerQuery])> {
    p.score_points()
        .into_iter()
        .zip(&queries.u)
        .filter(|(pt, _)| pt.segment == l)
        .map(|(pt, u)| (pt.model, &u[..]))
        .collect()
}

impl Stage for ScoreStage {
    fn name(&self) -> &'static str {
        "score"
    }

    fn describe(&self) -> &'static str {
        "walk the query back through the segments and score documents and tokens to Parquet"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune", "fit", "query"]
    }

    /// The queries come from the `query` stage (or are not read at all): the query data set's
    /// files upstream are not inputs, so new queries do not rerun this stage.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[("fetch", "data/query.json"), ("prepare", "query.parquet")]
    }

    /// The candidate index, read with `[attribution.candidates]`.
    fn optional_inputs(&self) -> &'static [&'static str] {
        &["index"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"attribution": c.attribution, "batching": c.batching});
        device_view(c, &mut v);
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        log_adam_variant(ctx, &p)?;
        let queries = precondition_queries(ctx, &p)?;
        let acting = write_acting(ctx, &p, &queries.acting)?;
        let cands = find_candidates(ctx, &p, &queries)?;
        let mut roles = score_segments(ctx, &p, &queries, cands.as_ref())?;
        let mut out = write_outputs(ctx, &p, &queries, &mut roles)?;
        drop(roles);
        let meta = |table: &str| table_metadata(ctx, table);
        if let Some(g) =
            super::score_gen::score_generated(ctx, &p, queries.backend.as_ref(), &meta)?
        {
            out["generated_tokens"] = g;
        }
        let Queries {
            estimate,
            needs,
            groups,
            ..
        } = &queries;
        out["memory"] = json!({
            "estimated_peak_bytes": estimate, "model_pass_bytes": estimate
                - needs.query_bytes - groups.largest().1, "query_bytes": needs.query_bytes,
            "layer_factor_bytes": needs.layer_bytes, "groups": groups.groups,
            "group_bytes": groups.group_bytes, "group_budget": groups.budget,
        });
        out["query_rank"] = json!(ctx.config.attribution.query_rank);
        out["device"] = json!(queries.backend.name());
        out["query_rank_kept_energy"] = json!(queries.kept_energy);
        out["acting"] = acting;
        if let Some(c) = cands {
            out["candidates"] = c.summary;
        }
        Ok(out)
    }
}

/// Says so when Source's Adam variant applies (a segment of the trajectory used AdamW).
fn log_adam_variant(ctx: &StageContext, p: &AttributionPlan) -> Result<()> {
    let traj = Trajectory::load(&ctx.run.stage_dir("finetune").join("trajectory.json"))?;
    let adam = traj
        .segments
        .iter()
        .any(|s| matches!(s.optimizer, OptimizerInfo::AdamW { .. }));
    if adam && p.method == MethodKind::Source {
        tracing::info!("score: AdamW segments use Source's Adam variant (saved second moments)");
    }
    Ok(())
}

/// Scores every document of every segment's data role against every query: per segment,
/// the sum of its scoring passes ([`AttributionPlan::score_points`]: one per model its step
/// groups took gradients at, or the average over its checkpoints for a declared segment);
/// with `cands`, only the candidate documents.
fn score_segments(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    cands: Option<&Candidates>,
) -> Result<BTreeMap<String, RoleScores>> {
    let opts = fit_options(ctx.config);
    let q = queries.q;
    let mut roles: BTreeMap<String, RoleScores> = BTreeMap::new();
    let tokens = all_tokens(ctx.config);
    for (l, seg) in p.segments.iter().enumerate() {
        crate::util::progress::set_part(format!("segment {}/{}", l + 1, p.segments.len()));
        if !roles.contains_key(&seg.role) {
            let mut docs = role_docs(ctx.run, &seg.role)?;
            if let Some(c) = cands {
                docs = c.filter(&seg.role, docs);
            }
            roles.insert(
                seg.role.clone(),
                RoleScores {
                    docs,
                    n_train: seg.n_docs,
                    per_segment: BTreeMap::new(),
                    tokens: HashMap::new(),
                },
            );
        }
        let r = roles.get_mut(&seg.role).expect("inserted above");
        let passes = segment_passes(p, queries, l);
        let backend = queries.backend.as_ref();
        let acc = score_segment(ctx.config, backend, &passes, r, None, tokens, &opts, q)?;
        r.per_segment.insert(seg.index, acc);
        ctx.failpoint(&format!("after-segment-{}", seg.index))?;
    }
    Ok(roles)
}

/// One segment's document scores [Q][N'], the sum of one scoring pass per (model, u) in
/// `passes` over the role's documents (or only those at positions `only`, N' of them); with
/// `tokens`, their per-token scores are added likewise to `r.tokens`.
#[allow(clippy::too_many_arguments)]
fn score_segment(
    config: &Config,
    backend: &dyn Backend,
    passes: &[(std::path::PathBuf, &[LayerQuery])],
    r: &mut RoleScores,
    only: Option<&[usize]>,
    tokens: bool,
    opts: &PassOptions,
    q: usize,
) -> Result<Vec<Vec<f64>>> {
    let picked: Vec<PreparedDoc>;
    let (docs, at): (&[PreparedDoc], Vec<usize>) = match only {
        Some(m) => {
            picked = m.iter().map(|&i| r.docs[i].clone()).collect();
            (&picked, m.to_vec())
        }
        None => (&r.docs, (0..r.docs.len()).collect()),
    };
    let mut acc = vec![vec![0f64; docs.len()]; q];
    let parts = ScoreParts {
        tokens,
        per_layer: false,
    };
    for (ckpt, u) in passes {
        let model = load_model_on(ckpt, backend.device(), config)?;
        let s = score_pass_parts(backend, &model, docs, u, opts, parts)?;
        for (qi, row) in s.docs.iter().enumerate() {
            for (m, v) in row.iter().enumerate() {
                acc[qi][m] += v;
            }
        }
        for (k, per_q) in s.tokens.into_iter().flatten().enumerate() {
            let slot = r
                .tokens
                .entry(at[k])
                .or_insert_with(|| per_q.iter().map(|row| vec![0f32; row.len()]).collect());
            for (qi, row) in per_q.iter().enumerate() {
                for (t, v) in row.iter().enumerate() {
                    slot[qi][t] += *v;
                }
            }
        }
    }
    Ok(acc)
}

/// The per-token scores of the documents `leaders` names (global positions in `docs` order:
/// roles by name, then each role's documents), from one more scoring pass per scoring model
/// over those documents only.
fn add_leader_tokens(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    roles: &mut BTreeMap<String, RoleScores>,
    leaders: &[Vec<Ranked>],
) -> Result<()> {
    let mut at: Vec<(String, usize)> = Vec::new();
    for (role, r) in roles.iter() {
        at.extend((0..r.docs.len()).map(|m| (role.clone(), m)));
    }
    let mut wanted: BTreeMap<String, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for r in leaders.iter().flatten() {
        let (role, m) = &at[r.j];
        wanted.entry(role.clone()).or_default().insert(*m);
    }
    let opts = fit_options(ctx.config);
    for (l, seg) in p.segments.iter().enumerate() {
        let (Some(only), Some(r)) = (wanted.get(&seg.role), roles.get_mut(&seg.role)) else {
            continue;
        };
        let only: Vec<usize> = only.iter().copied().collect();
        let passes = segment_passes(p, queries, l);
        let backend = queries.backend.as_ref();
        score_segment(
            ctx.config,
            backend,
            &passes,
            r,
            Some(&only),
            true,
            &opts,
            queries.q,
        )?;
    }
    Ok(())
}

/// Every scored document in one order (data roles by name, then each role's documents) and
/// each segment's scores over it, [Q][N] (0 for documents of another role), taken out of
/// `roles` so that the scores are held once.
fn flat_scores(
    p: &AttributionPlan,
    roles: &mut BTreeMap<String, RoleScores>,
    q: usize,
) -> Result<(Vec<ScoredDoc>, SegmentScores)> {
    let mut docs = Vec::new();
    let mut offset: HashMap<String, usize> = HashMap::new();
    for (role, r) in roles.iter() {
        offset.insert(role.clone(), docs.len());
        let n_train = u32::try_from(r.n_train).map_err(|_| {
            Error::Pipeline(format!(
                "data set `{role}` has {} documents, more than n_train's uint32 holds",
                r.n_train
            ))
        })?;
        docs.extend(r.docs.iter().map(|d| ScoredDoc {
            train_id: d.doc_id.clone(),
            dataset: role.clone(),
            n_train,
        }));
    }
    let n = docs.len();
    let mut taken: BTreeMap<usize, Vec<Vec<f64>>> = BTreeMap::new();
    for r in roles.values_mut() {
        taken.extend(std::mem::take(&mut r.per_segment));
    }
    let segments = p
        .segments
        .iter()
        .map(|seg| {
            let mut m = vec![vec![0f64; n]; q];
            if let Some(s) = taken.remove(&seg.index) {
                let at = offset[&seg.role];
                for (row, src) in m.iter_mut().zip(&s) {
                    row[at..at + src.len()].copy_from_slice(src);
                }
            }
            (format!("segment_{}_{}", seg.index, seg.stage), m)
        })
        .collect();
    Ok((docs, segments))
}

/// Writes `queries.parquet`, the scores dataset (`query_set=NAME/shard=0/part-00000.parquet`,
/// streamed: every document of each query, or its top and bottom `keep_top_bottom`),
/// `token_scores.parquet` and `train_docs.parquet`; returns the stage's summary (rows, token
/// rows, each query's top document).
fn write_outputs(
    ctx: &StageContext,
    p: &AttributionPlan,
    queries: &Queries,
    roles: &mut BTreeMap<String, RoleScores>,
) -> Result<serde_json::Value> {
    let q = queries.q;
    let query_ids = copy_queries(ctx, q)?;
    let fetched = Fetched::load(ctx.run)?;
    let tokenizer = load_tokenizer(fetched.tokenizer_path())?;
    let (docs, segments) = flat_scores(p, roles, q)?;
    let table = ScoreTable {
        query_ids: &query_ids,
        docs: &docs,
        segments: &segments,
    };
    let a = &ctx.config.attribution;
    let keep = match a.keep_top_bottom {
        Some(k) => Keep::TopBottom(k),
        None => Keep::All,
    };
    let all_tokens = all_tokens(ctx.config);
    let lead = if all_tokens {
        docs.len()
    } else {
        a.top_k.max(1)
    };
    let set = ctx.query_set.map(|s| s.name.as_str());
    let part = shard_dir(&ctx.out(scores_root_in_stage(set)), 0).join(FIRST_PART);
    let fields = table.fields();
    let fields: Vec<(&str, Column)> = fields
        .iter()
        .map(|(n, c)| (n.as_str(), c.clone()))
        .collect();
    let mut w = PartWriter::create(&part, &fields, &table_metadata(ctx, "scores")?, ROW_GROUP)?;
    let leaders = write_scores(&mut w, &table, keep, lead)?;
    let rows = w.finish()?;
    drop(segments);
    if !all_tokens {
        add_leader_tokens(ctx, p, queries, roles, &leaders)?;
    }
    let n_token_rows = write_token_scores(ctx, roles, &docs, &query_ids, &leaders, &tokenizer)?;
    write_train_docs(ctx, roles)?;
    let top: Vec<serde_json::Value> = leaders
        .iter()
        .enumerate()
        .filter_map(|(qi, l)| l.first().map(|r| (qi, r)))
        .map(|(qi, r)| json!({"query": query_ids[qi], "top": docs[r.j].train_id, "tau": r.tau}))
        .collect();
    for t in &top {
        tracing::info!(
            "score: {} ← {} (τ = {})",
            t["query"].as_str().unwrap_or_default(),
            t["top"].as_str().unwrap_or_default(),
            crate::util::num::sig(t["tau"].as_f64().unwrap_or(f64::NAN), 4)
        );
    }
    Ok(
        json!({"pairs": rows, "token_rows": n_token_rows, "top1": top,
        "kept_per_query": a.keep_top_bottom.map(|k| json!({"top": k, "bottom": k}))}),
    )
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
/// rank, or all, with `all_token_scores` or `top_k = 0`). Returns its row count.
fn write_token_scores(
    ctx: &StageContext,
    roles: &BTreeMap<String, RoleScores>,
    docs: &[ScoredDoc],
    query_ids: &[String],
    leaders: &[Vec<Ranked>],
    tokenizer: &tokenizers::Tokenizer,
) -> Result<usize> {
    if let Some(note) = ctx.config.attribution.top_k_note(docs.len()) {
        tracing::warn!("{note}");
    }
    // Global document index → (role, index within the role).
    let mut at: Vec<(&str, usize)> = Vec::with_capacity(docs.len());
    for (role, r) in roles {
        at.extend((0..r.docs.len()).map(|m| (role.as_str(), m)));
    }
    let (mut tq, mut tid, mut tidx, mut ttok, mut ttext, mut tscore) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // Each kept document's token texts, cut from its text at the tokenizer's offsets.
    let mut texts: HashMap<(&str, usize), Vec<String>> = HashMap::new();
    for (qi, l) in leaders.iter().enumerate() {
        for r in l {
            let (role, m) = at[r.j];
            let doc = &roles[role].docs[m];
            let pieces = texts
                .entry((role, m))
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
            }
        }
    }
    let n_token_rows = tq.len();
    write_table(
        &ctx.out("token_scores.parquet"),
        &[
            ("query_id", Column::Str(tq)),
            ("train_id", Column::Str(tid)),
            ("token_index", Column::U32(tidx)),
            ("token_id", Column::U32(ttok)),
            ("token_text", Column::Str(ttext)),
            ("score", Column::F32(tscore)),
        ],
        &table_metadata(ctx, "token_scores")?,
    )?;
    Ok(n_token_rows)
}

/// `train_docs.parquet`: the scored documents, so results join back to text.
fn write_train_docs(ctx: &StageContext, roles: &BTreeMap<String, RoleScores>) -> Result<()> {
    let all: Vec<(&String, &PreparedDoc)> = roles
        .iter()
        .flat_map(|(role, r)| r.docs.iter().map(move |d| (role, d)))
        .collect();
    write_table(
        &ctx.out("train_docs.parquet"),
        &[
            (
                "train_id",
                Column::Str(all.iter().map(|(_, d)| d.doc_id.clone()).collect()),
            ),
            (
                "dataset",
                Column::Str(all.iter().map(|(r, _)| r.to_string()).collect()),
            ),
            (
                "text",
                Column::Str(all.iter().map(|(_, d)| d.text.clone()).collect()),
            ),
            (
                "n_tokens",
                Column::U32(all.iter().map(|(_, d)| d.n_tokens() as u32).collect()),
            ),
            (
                "n_loss_tokens",
                Column::U32(all.iter().map(|(_, d)| d.n_loss_tokens() as u32).collect()),
            ),
        ],
        &table_metadata(ctx, "train_docs")?,
    )
}

fn read_query_ids(path: &std::path::Path) -> Result<Vec<String>> {
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
