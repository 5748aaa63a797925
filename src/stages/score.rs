//! `score`: the backwards walk over segments and the training passes that score every
//! document of every segment's data against every query, per document and per token, in
//! one pass per checkpoint (docs/design.md §2, §5). Writes `scores.parquet`,
//! `token_scores.parquet` (top-k documents per query, or all), `queries.parquet` and
//! `train_docs.parquet`.
//!
//! `score` is the raw Σ_ℓ ⟨u_ℓ, ḡ_ℓ(m)⟩ and `n_train` the N of the document's data set, so
//! τ = score / n_train; τ > 0 means the document helped the model produce the completion (a
//! proponent). Per-segment columns `segment_K_STAGE` add up to `score`.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::attribution::{score_pass_on, LayerQuery};
use crate::config::{Config, MethodKind};
use crate::curvature::FactorFile;
use crate::data::tokenize::load_tokenizer;
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::output::{write_table, Column};
use crate::pipeline::{Stage, StageContext};
use crate::train::{OptimizerInfo, Trajectory};
use crate::util::hash::sha256_json;

use super::attribute::{
    device_view, fit_options, load_model, load_model_on, open_backend, plan, plan_score_memory,
    role_docs, AttributionPlan,
};
use super::fetch::Fetched;
use super::score_precondition::preconditioned;

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
    let segments: Vec<serde_json::Value> = p
        .segments
        .iter()
        .map(|s| {
            json!({"index": s.index, "stage": s.stage, "role": s.role, "n": s.n_docs,
                        "mass": s.mass, "checkpoints": s.checkpoints.len()})
        })
        .collect();
    Ok(vec![
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
        ("source_tda.sign_convention".into(), SIGN_CONVENTION.into()),
    ])
}

/// Query gradients written by the `query` stage, per layer in `layers` order.
fn load_query_gradients(ctx: &StageContext, layers: &[String]) -> Result<Vec<Tensor>> {
    let path = ctx.run.stage_dir("query").join("gradients.safetensors");
    let bytes = std::fs::read(&path).ctx("reading", &path)?;
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    layers
        .iter()
        .map(|l| {
            map.get(l).cloned().ok_or_else(|| {
                Error::Pipeline(format!(
                    "{}: no gradient for layer `{l}`; rerun the query stage",
                    path.display()
                ))
            })
        })
        .collect()
}

/// Scores of one data role: per segment [Q][N] and per-token sums [N][Q][T].
struct RoleScores {
    docs: Vec<PreparedDoc>,
    n_train: u64,
    per_segment: BTreeMap<usize, Vec<Vec<f64>>>,
    tokens: Vec<Vec<Vec<f32>>>,
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

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"attribution": c.attribution, "batching": c.batching});
        device_view(c, &mut v);
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let p = plan(ctx.config, ctx.run)?;
        let traj = Trajectory::load(&ctx.run.stage_dir("finetune").join("trajectory.json"))?;
        let adam = traj
            .segments
            .iter()
            .any(|s| matches!(s.optimizer, OptimizerInfo::AdamW { .. }));
        if adam && p.method == MethodKind::Source {
            tracing::info!(
                "score: AdamW segments use Source's Adam variant (saved second moments)"
            );
        }
        let final_model = load_model(&p.final_checkpoint)?;
        let layers: Vec<String> = final_model
            .tracked_layers()
            .iter()
            .map(|l| l.name.clone())
            .collect();
        let v = load_query_gradients(ctx, &layers)?;
        let q = v.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let files: Vec<FactorFile> = if p.needs_factors() {
            p.segments
                .iter()
                .map(|s| {
                    FactorFile::open(
                        &ctx.run
                            .stage_dir("fit")
                            .join(format!("segment-{}.safetensors", s.index)),
                    )
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        // Per layer: its stored factors in every segment, plus f32 working copies of
        // [d_out, d_in] (spectral weights, Adam's p̄ and σ_p) per segment.
        let mut layer_bytes = Vec::with_capacity(layers.len());
        let mut grad_elems = 0u64;
        for (name, vl) in layers.iter().zip(&v) {
            let (_, o, i) = vl.dims3()?;
            grad_elems += (o * i) as u64;
            let mut b = 0u64;
            for f in &files {
                b += f.layer_bytes(name)? + 12 * (o * i) as u64;
            }
            layer_bytes.push(b);
        }
        // v, the walk's v and u per segment, f32.
        let query_bytes = 4 * q as u64 * grad_elems * (p.segments.len() as u64 + 2);
        let (estimate, groups) =
            plan_score_memory(&final_model, ctx.config, &layers, &layer_bytes, query_bytes)?;
        drop(final_model);
        let backend = open_backend(ctx.config)?;
        let u = preconditioned(ctx, backend.as_ref(), &p, &files, &v, &layers, &groups)?;
        drop(files);
        let rank = ctx.config.attribution.query_rank;
        let (u, kept_energy) = query_forms(u, rank)?;
        if let (Some(r), Some(e)) = (rank, kept_energy) {
            tracing::info!(
                "score: preconditioned queries in rank-{r} form ({:.4}% of ‖u‖² kept on average)",
                100.0 * e
            );
        }
        let opts = fit_options(ctx.config);

        let mut roles: BTreeMap<String, RoleScores> = BTreeMap::new();
        for (seg, u_seg) in p.segments.iter().zip(&u) {
            if !roles.contains_key(&seg.role) {
                let docs = role_docs(ctx.run, &seg.role)?;
                let tokens = docs
                    .iter()
                    .map(|d| vec![vec![0f32; d.n_tokens()]; q])
                    .collect();
                roles.insert(
                    seg.role.clone(),
                    RoleScores {
                        docs,
                        n_train: seg.n_docs,
                        per_segment: BTreeMap::new(),
                        tokens,
                    },
                );
            }
            let r = roles.get_mut(&seg.role).expect("inserted above");
            let c = seg.checkpoints.len() as f64;
            let mut acc = vec![vec![0f64; r.docs.len()]; q];
            for ckpt in &seg.checkpoints {
                let model = load_model_on(ckpt, backend.device())?;
                let s = score_pass_on(backend.as_ref(), &model, &r.docs, u_seg, &opts, true)?;
                for (qi, row) in s.docs.iter().enumerate() {
                    for (m, v) in row.iter().enumerate() {
                        acc[qi][m] += v / c;
                    }
                }
                for (m, per_q) in s.tokens.expect("asked for tokens").iter().enumerate() {
                    for (qi, row) in per_q.iter().enumerate() {
                        for (t, v) in row.iter().enumerate() {
                            r.tokens[m][qi][t] += (*v as f64 / c) as f32;
                        }
                    }
                }
            }
            r.per_segment.insert(seg.index, acc);
            ctx.failpoint(&format!("after-segment-{}", seg.index))?;
        }
        let mut out = write_outputs(ctx, &p, q, &roles)?;
        out["memory"] = json!({
            "estimated_peak_bytes": estimate, "model_pass_bytes": estimate
                - query_bytes - groups.largest().1, "query_bytes": query_bytes,
            "layer_factor_bytes": layer_bytes, "groups": groups.groups,
            "group_bytes": groups.group_bytes, "group_budget": groups.budget,
        });
        out["query_rank"] = json!(rank);
        out["device"] = json!(backend.name());
        out["query_rank_kept_energy"] = json!(kept_energy);
        Ok(out)
    }
}

/// Each segment's u in the form the scoring pass contracts with: dense, or (with `rank`)
/// its truncated SVD per query and layer. Also the mean fraction of ‖u‖² the truncation kept.
fn query_forms(
    u: Vec<Vec<Tensor>>,
    rank: Option<usize>,
) -> Result<(Vec<Vec<LayerQuery>>, Option<f64>)> {
    let (mut kept, mut count) = (0f64, 0usize);
    let forms = u
        .into_iter()
        .map(|seg| {
            seg.into_iter()
                .map(|ul| {
                    let f = LayerQuery::new(ul, rank)?;
                    if let (LayerQuery::LowRank(l), Some(r)) = (&f, rank) {
                        for sv in &l.singular_values {
                            let all: f64 = sv.iter().map(|s| s * s).sum();
                            let top: f64 = sv.iter().take(r).map(|s| s * s).sum();
                            kept += if all > 0.0 { top / all } else { 1.0 };
                            count += 1;
                        }
                    }
                    Ok(f)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((forms, (count > 0).then(|| kept / count as f64)))
}

fn write_outputs(
    ctx: &StageContext,
    p: &AttributionPlan,
    q: usize,
    roles: &BTreeMap<String, RoleScores>,
) -> Result<serde_json::Value> {
    let queries_path = ctx.run.stage_dir("query").join("queries.parquet");
    std::fs::copy(&queries_path, ctx.out("queries.parquet")).ctx("copying", &queries_path)?;
    let query_ids = read_query_ids(&queries_path)?;
    if query_ids.len() != q {
        return Err(Error::Pipeline(format!(
            "{} lists {} queries but the gradients have {q}; rerun the query stage",
            queries_path.display(),
            query_ids.len()
        )));
    }
    let fetched = Fetched::load(ctx.run)?;
    let tokenizer = load_tokenizer(fetched.tokenizer_path())?;

    // Every (query, document) with τ = score / n_train, ranked per query.
    struct Row<'a> {
        q: usize,
        role: &'a str,
        m: usize,
        score: f64,
        tau: f64,
    }
    let mut rows: Vec<Row> = Vec::new();
    for (role, r) in roles {
        for m in 0..r.docs.len() {
            for qi in 0..q {
                let score: f64 = r.per_segment.values().map(|s| s[qi][m]).sum();
                rows.push(Row {
                    q: qi,
                    role,
                    m,
                    score,
                    tau: score / r.n_train as f64,
                });
            }
        }
    }
    rows.sort_by(|a, b| a.q.cmp(&b.q).then(b.tau.total_cmp(&a.tau)));
    let mut rank = vec![0u32; rows.len()];
    let mut last_q = usize::MAX;
    let mut k = 0;
    for (i, row) in rows.iter().enumerate() {
        if row.q != last_q {
            last_q = row.q;
            k = 0;
        }
        k += 1;
        rank[i] = k;
    }
    let top_k = ctx.config.attribution.top_k;
    let keep_all = ctx.config.attribution.all_token_scores || top_k == 0;

    let mut cols: Vec<(String, Column)> = vec![
        (
            "query_id".into(),
            Column::Str(rows.iter().map(|r| query_ids[r.q].clone()).collect()),
        ),
        (
            "train_id".into(),
            Column::Str(
                rows.iter()
                    .map(|r| roles[r.role].docs[r.m].doc_id.clone())
                    .collect(),
            ),
        ),
        (
            "dataset".into(),
            Column::Str(rows.iter().map(|r| r.role.to_string()).collect()),
        ),
        (
            "score".into(),
            Column::F64(rows.iter().map(|r| r.score).collect()),
        ),
        (
            "n_train".into(),
            Column::U32(rows.iter().map(|r| roles[r.role].n_train as u32).collect()),
        ),
        (
            "tau".into(),
            Column::F64(rows.iter().map(|r| r.tau).collect()),
        ),
        ("rank".into(), Column::U32(rank.clone())),
    ];
    for seg in &p.segments {
        let name = format!("segment_{}_{}", seg.index, seg.stage);
        let vals = rows
            .iter()
            .map(|r| {
                roles[r.role]
                    .per_segment
                    .get(&seg.index)
                    .map(|s| s[r.q][r.m])
                    .unwrap_or(0.0)
            })
            .collect();
        cols.push((name, Column::F64(vals)));
    }
    let refs: Vec<(&str, Column)> = cols.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
    write_table(
        &ctx.out("scores.parquet"),
        &refs,
        &table_metadata(ctx, "scores")?,
    )?;

    // Per-token scores of the top-k documents per query.
    let (mut tq, mut tid, mut tidx, mut ttok, mut ttext, mut tscore) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (i, r) in rows.iter().enumerate() {
        if !keep_all && rank[i] as usize > top_k {
            continue;
        }
        let doc = &roles[r.role].docs[r.m];
        for (t, &s) in roles[r.role].tokens[r.m][r.q].iter().enumerate() {
            let id = doc.input_ids[t];
            tq.push(query_ids[r.q].clone());
            tid.push(doc.doc_id.clone());
            tidx.push(t as u32);
            ttok.push(id);
            ttext.push(tokenizer.decode(&[id], false).unwrap_or_default());
            tscore.push(s);
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

    // The documents, so results join back to text.
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
    )?;

    let top: Vec<serde_json::Value> = rows
        .iter()
        .zip(&rank)
        .filter(|(_, &k)| k == 1)
        .map(|(r, _)| {
            json!({"query": query_ids[r.q], "top": roles[r.role].docs[r.m].doc_id, "tau": r.tau})
        })
        .collect();
    for t in &top {
        tracing::info!("score: {} ← {} (τ = {})", t["query"], t["top"], t["tau"]);
    }
    Ok(json!({"pairs": rows.len(), "token_rows": n_token_rows, "top1": top}))
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
