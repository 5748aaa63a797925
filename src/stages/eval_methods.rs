//! Owns τ of each compared method: the run's own scores, or a sub-run's `fit`/`query`/`score`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no sibling.
//!
//! τ of every compared method over the fine-tuning set, through the pipeline's own stages.
//!
//! The run's own `[attribution] method` is read from `RUN_DIR/score/`. Every other method
//! runs `fit`, `query` and `score` in a sub-run `RUN_DIR/eval-methods/METHOD/`: a run
//! directory whose config is the run's with `attribution.method` overridden, whose `fetch`,
//! `prepare` and `finetune` folders are links to the run's, and whose manifest carries the
//! run's records of those three stages (hashes unchanged). The runner then skips what is
//! complete and reruns what the run's upstream changes affect: one code path for the math,
//! resumable, and nothing finished is redone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;

use crate::config::{Config, EvalMethod, MethodKind};
use crate::error::{Error, IoContext, Result};
use crate::output::dataset::part_files;
use crate::output::parquet::open_table;
use crate::pipeline::{
    run_stages, scores_root, Registry, RunDir, RunOptions, StageContext, StageStatus,
};

/// The stages a sub-run shares with its parent run (linked, records copied).
const SHARED: [&str; 3] = ["fetch", "prepare", "finetune"];

/// τ = score / n_train of one method for every (query, fine-tuning document).
#[derive(Debug, Clone)]
pub struct MethodScores {
    /// The method.
    pub method: EvalMethod,
    /// Where its scores were read.
    pub scores_path: PathBuf,
    /// `τ[q][m]`, rows in `query_ids` order, columns in `train_ids` order.
    pub tau: Vec<Vec<f64>>,
}

/// The run directory whose `score/` holds `method`'s scores, running the sub-run's `fit`,
/// `query` and `score` (from `registry`) first when `method` is not the run's own.
pub fn scored_run(
    registry: &Registry,
    config: &Config,
    run: &RunDir,
    method: EvalMethod,
) -> Result<RunDir> {
    let own_refined = config.attribution.refine.is_some();
    if method.kind == config.attribution.method
        && (method.refined == own_refined || method.kind != MethodKind::Influence)
    {
        return RunDir::at(run.path());
    }
    let sub = RunDir::at(&run.path().join("eval-methods").join(method.name()))?;
    let parent = run.manifest()?;
    let config_file = PathBuf::from(&parent.config_path);
    let mut c = config.clone();
    c.attribution.method = method.kind;
    c.attribution.refine = match method.refined {
        true => Some(config.attribution.refine.unwrap_or_default()),
        false => None,
    };
    // The evaluations read the whole completions' scores; the tokens' would be unused work.
    c.attribution.generated.enabled = false;
    std::fs::create_dir_all(sub.path()).ctx("creating", sub.path())?;
    {
        let _lock = sub.lock()?;
        let mut manifest = sub.open_for(&c, &config_file, true)?;
        for stage in SHARED {
            let record = parent
                .stages
                .get(stage)
                .filter(|r| r.status == StageStatus::Complete)
                .ok_or_else(|| {
                    Error::Pipeline(format!(
                        "comparing methods needs the run's `{stage}` stage to be complete in {}",
                        run.path().display()
                    ))
                })?;
            link_stage(&sub.stage_dir(stage), stage)?;
            manifest.stages.insert(stage.to_string(), record.clone());
        }
        manifest.save(&sub.manifest_path())?;
    }
    tracing::info!(
        "eval: scoring with method `{}` in {}",
        method.name(),
        sub.path().display()
    );
    let stages: Vec<String> = ["fit", "query", "score"].map(String::from).into();
    run_stages(
        registry,
        &c,
        &config_file,
        &sub,
        &stages,
        &RunOptions::default(),
    )?;
    Ok(sub)
}

/// Makes `link` a symbolic link to the parent run's `stage` folder (`../../STAGE`).
fn link_stage(link: &Path, stage: &str) -> Result<()> {
    let target = Path::new("../..").join(stage);
    if let Ok(current) = std::fs::read_link(link) {
        if current == target {
            return Ok(());
        }
    }
    if link.is_dir() && !link.is_symlink() {
        std::fs::remove_dir_all(link).ctx("removing", link)?;
    } else if link.is_symlink() || link.exists() {
        std::fs::remove_file(link).ctx("removing", link)?;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, link).ctx("linking", link)?;
    #[cfg(not(unix))]
    return Err(Error::Pipeline(
        "comparing methods needs symbolic links (a Unix system)".into(),
    ));
    Ok(())
}

/// τ of `method` over the documents `train_ids` of data role `role`, for `query_ids`, in the
/// run of `ctx` (a sub-run runs the stages of `ctx.registry`). A (query, document) pair
/// missing from the scores is an error naming the file.
pub fn method_scores(
    ctx: &StageContext,
    method: EvalMethod,
    role: &str,
    query_ids: &[String],
    train_ids: &[String],
) -> Result<MethodScores> {
    let (path, mut tau) = role_scores(ctx, method, query_ids, &[(role, train_ids)])?;
    let tau = tau.pop().flatten().ok_or_else(|| {
        Error::Pipeline(format!(
            "{}: no scores of documents of `{role}`; rerun the score stage of that run",
            path.display()
        ))
    })?;
    Ok(MethodScores {
        method,
        scores_path: path,
        tau,
    })
}

/// τ of `method` for `query_ids` over several data roles at once, each (role, its
/// document ids): `τ[q][m]` per role, or None for a role the method scores no document of
/// (the influence function and the gradient dot product score the `train` role only).
/// Also the scores file read. A role with some but not all (query, document) pairs is an
/// error naming the file.
#[allow(clippy::type_complexity)]
pub fn role_scores(
    ctx: &StageContext,
    method: EvalMethod,
    query_ids: &[String],
    roles: &[(&str, &[String])],
) -> Result<(PathBuf, Vec<Option<Vec<Vec<f64>>>>)> {
    if let Some(k) = ctx.config.attribution.keep_top_bottom {
        return Err(Error::Pipeline(format!(
            "[attribution] keep_top_bottom = {k} keeps only each query's top and bottom {k} \
             documents in the scores, but the evaluations rank every document; remove the key \
             for runs that evaluate"
        )));
    }
    if ctx.config.attribution.candidates.is_some() {
        return Err(Error::Pipeline(
            "[attribution] candidates scores only each query's candidate documents, but the \
             evaluations rank every document; remove `candidates` for runs that evaluate"
                .into(),
        ));
    }
    let scored = scored_run(ctx.registry, ctx.config, ctx.run, method)?;
    let path = scores_root(&scored, None);
    let qpos: HashMap<&str, usize> = query_ids
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let rpos: HashMap<&str, usize> = roles
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (*r, i))
        .collect();
    let mpos: Vec<HashMap<&str, usize>> = roles
        .iter()
        .map(|(_, ids)| {
            ids.iter()
                .enumerate()
                .map(|(i, s)| (s.as_str(), i))
                .collect()
        })
        .collect();
    let mut tau: Vec<Vec<Vec<f64>>> = roles
        .iter()
        .map(|(_, ids)| vec![vec![f64::NAN; ids.len()]; query_ids.len()])
        .collect();
    let mut seen = vec![false; roles.len()];
    for part in part_files(&path)? {
        let reader = open_table(&part)?
            .0
            .build()
            .map_err(|e| Error::parquet(&part, e))?;
        for batch in reader {
            let b = batch.map_err(|e| Error::parquet(&part, e))?;
            let col = |name: &str| {
                b.column_by_name(name)
                    .ok_or_else(|| Error::parquet(&part, format!("no `{name}` column")))
            };
            let (q, t, d) = (
                col("query_id")?.as_string::<i32>().clone(),
                col("train_id")?.as_string::<i32>().clone(),
                col("dataset")?.as_string::<i32>().clone(),
            );
            let v = col("tau")?.as_primitive::<Float64Type>().clone();
            for i in 0..b.num_rows() {
                let Some(&r) = rpos.get(d.value(i)) else {
                    continue;
                };
                seen[r] = true;
                if let (Some(&qi), Some(&mi)) = (qpos.get(q.value(i)), mpos[r].get(t.value(i))) {
                    tau[r][qi][mi] = v.value(i);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(roles.len());
    for (r, (role, ids)) in roles.iter().enumerate() {
        if !seen[r] {
            out.push(None);
            continue;
        }
        for (qi, row) in tau[r].iter().enumerate() {
            if let Some(mi) = row.iter().position(|x| x.is_nan()) {
                return Err(Error::Pipeline(format!(
                    "{}: no score for query `{}` and document `{}` of `{role}`; rerun the \
                     score stage of that run",
                    path.display(),
                    query_ids[qi],
                    ids[mi]
                )));
            }
        }
        out.push(Some(std::mem::take(&mut tau[r])));
    }
    Ok((path, out))
}
