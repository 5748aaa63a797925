//! Owns the `eval-lds` stage and `--shard` runs: retraining jobs, LDS per method, outputs.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `attribute`, `eval_methods`, `fetch`, `finetune`.
//!
//! `eval-lds`: the linear datamodeling score of each compared method (see
//! [`crate::eval::lds`]). Retrains on `[eval] subsets` random subsets of fraction `alpha` of
//! the fine-tuning set, `seeds` times each, with the run's `[train]` (the finetune stage's
//! training code, in memory), measures every query's f(q) = −log p(completion | prompt), and
//! correlates those losses with g_S(q) = −Σ_{m ∈ S} τ(q, m).
//!
//! With `[[train.stages]]` (docs/design.md §6) a subset keeps a fraction α of each data role
//! the stages train on, every stage is retrained on its role's kept part, and g_S sums τ over
//! the kept documents of every role a method scores (a role it scores no document of adds
//! nothing); each method's LDS is also given per role (`by_role`: predictions from that
//! role's documents alone), so methods are compared on the same documents.
//!
//! Retraining results are cached per job in `RUN_DIR/eval-work/lds-KEY/` (KEY: a hash of
//! everything training depends on), written atomically as each job finishes, so a rerun or a
//! change of `methods`, `bootstrap` or `subsets` redoes no finished training. `--shard i/n`
//! ([`run_shard`]) runs only job indices ≡ i − 1 (mod n) without taking the run's lock, so
//! shards can run at the same time; the stage itself (a run without `--shard`, or the last
//! shard once every job is done) merges.
//!
//! Writes `eval-lds/summary.json` and `eval-lds/points.parquet` (method, query_id, subset,
//! seed, predicted, measured).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::config::Config;
use crate::data::PreparedDoc;
use crate::error::{Error, Result};
use crate::eval::{
    all_jobs, auto_workers, available_cores, bootstrap_difference_ci95, lds, model_weight_bytes,
    predicted_losses, run_workers, subset_size, table::lds_table, threads_each, Job, Retrain,
    RoleDocs, Shard, Worker,
};
use crate::output::{write_table, Column};
use crate::pipeline::{
    run_stages, Outcome, Registry, RunDir, RunOptions, Stage, StageContext, StageStatus,
};
use crate::util::fsx::write_json_atomic;
use crate::util::hash::sha256_json;
use crate::util::progress;
use crate::util::threads::pin_threads;

use super::attribute::{fit_options, role_docs};
use super::eval_methods::role_scores;
use super::fetch::Fetched;
use super::finetune::base_model_dir;

/// The `eval-lds` stage.
pub struct EvalLdsStage;

/// The columns of `points.parquet`.
#[derive(Default)]
struct PointColumns {
    method: Vec<String>,
    query_id: Vec<String>,
    subset: Vec<u32>,
    seed: Vec<u32>,
    predicted: Vec<f64>,
    measured: Vec<f64>,
}

/// What retraining reads, owned.
struct Inputs {
    base_dir: PathBuf,
    /// The data roles the fine-tuning stages train on, in first-use order.
    roles: Vec<RoleDocs>,
    queries: Vec<PreparedDoc>,
    jobs_dir: PathBuf,
}

impl Inputs {
    fn load(c: &Config, run: &RunDir) -> Result<Inputs> {
        if c.train.import_from.is_some() {
            return Err(Error::Pipeline(
                "eval-lds retrains with the run's [train]; it cannot retrain an imported \
                 Trainer run (`train.import_from`)"
                    .into(),
            ));
        }
        if c.model.adapter.is_some() {
            return Err(Error::Pipeline(
                "eval-lds retrains with the run's [train]; an adapter given by model.adapter \
                 was trained elsewhere and cannot be retrained on subsets here"
                    .into(),
            ));
        }
        let manifest = run.manifest()?;
        let mut key = json!({"train": c.train, "batching": c.batching,
                             "alpha": c.eval.alpha, "seed": subset_seed(c)});
        for stage in ["fetch", "prepare"] {
            let r = manifest
                .stages
                .get(stage)
                .filter(|r| r.status == StageStatus::Complete)
                .ok_or_else(|| {
                    Error::Pipeline(format!(
                        "eval-lds needs the `{stage}` stage complete in {}; run the pipeline \
                         first",
                        run.path().display()
                    ))
                })?;
            key[stage] = json!(r.outputs_hash());
        }
        let fetched = Fetched::load(run)?;
        let queries = role_docs(run, "query")?;
        let mut roles: Vec<RoleDocs> = Vec::new();
        for stage in c.train.stage_list() {
            let role = stage.train.dataset;
            if roles.iter().any(|r| r.role == role) {
                continue;
            }
            let docs = role_docs(run, &role)?;
            if docs.len() < 2 {
                return Err(Error::Pipeline(format!(
                    "eval-lds needs at least 2 fine-tuning documents in every data role it \
                     draws subsets of; `{role}` has {}",
                    docs.len()
                )));
            }
            roles.push(RoleDocs { role, docs });
        }
        Ok(Inputs {
            base_dir: base_model_dir(&fetched)?,
            roles,
            queries,
            jobs_dir: run
                .path()
                .join("eval-work")
                .join(format!("lds-{}", &sha256_json(&key)[..16])),
        })
    }

    fn retrain<'a>(&'a self, c: &'a Config) -> Retrain<'a> {
        Retrain {
            base_dir: &self.base_dir,
            roles: &self.roles,
            queries: &self.queries,
            train: &c.train,
            batching: &c.batching,
            alpha: c.eval.alpha,
            subset_seed: subset_seed(c),
            jobs_dir: self.jobs_dir.clone(),
        }
    }
}

/// The seed of the subset draws: `[eval] subset_seed`, else `run.seed`.
fn subset_seed(c: &Config) -> u64 {
    c.eval.subset_seed.unwrap_or(c.run.seed)
}

/// How many worker processes retrain `todo` jobs: 1 (this process) without a worker
/// executable or with fewer than 2 jobs; else `--workers`, or [`auto_workers`] (one per core
/// for a small model).
fn worker_count(ctx: &StageContext, base_dir: &Path, todo: usize) -> Result<usize> {
    if ctx.workers.exe.is_none() || todo < 2 {
        return Ok(1);
    }
    Ok(match ctx.workers.count {
        Some(n) => n.clamp(1, todo),
        None => auto_workers(available_cores(), todo, model_weight_bytes(base_dir)?),
    })
}

/// Trains the `todo` jobs in `n` worker processes, `eval lds --shard i/n --no-merge` of the
/// run's config, each pinned to ⌊cores / n⌋ threads, with a progress bar fed by the jobs'
/// result files. A worker's log is kept in `eval-work/workers/` only if it fails.
fn retrain_in_workers(ctx: &StageContext, retrain: &Retrain, todo: &[Job], n: usize) -> Result<()> {
    let exe = ctx
        .workers
        .exe
        .as_ref()
        .ok_or_else(|| Error::Pipeline("eval-lds: no worker executable".into()))?;
    let threads = threads_each(available_cores(), n);
    tracing::info!(
        "eval-lds: {} retraining jobs in {n} worker processes of {threads} thread(s) each",
        todo.len()
    );
    let logs = ctx.run.path().join("eval-work").join("workers");
    let workers = (1..=n)
        .map(|i| {
            let mut cmd = Command::new(exe);
            cmd.args(["-q", "eval", "lds", "--config"])
                .arg(ctx.config_file)
                .arg("--run-dir")
                .arg(ctx.run.path())
                .args(["--shard", &format!("{i}/{n}"), "--no-merge"]);
            pin_threads(&mut cmd, threads);
            Worker {
                command: cmd,
                log: logs.join(format!("worker-{i}-of-{n}.log")),
            }
        })
        .collect();
    let pb = progress::bar(todo.len() as u64, "retrain");
    run_workers(workers, || {
        let done = todo.iter().filter(|&&j| retrain.path(j).is_file()).count();
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    let _ = std::fs::remove_dir(&logs);
    Ok(())
}

/// What a `--shard` run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOutcome {
    /// Ran `ran` of its jobs; `missing` jobs of other shards are not finished yet.
    Partial {
        /// Jobs this invocation trained.
        ran: usize,
        /// Jobs of the whole evaluation without a result.
        missing: usize,
    },
    /// Every job is done and this (last) shard merged them into `eval-lds/`.
    Merged {
        /// Jobs this invocation trained.
        ran: usize,
    },
}

/// `source-tda eval lds --shard i/n`: trains this shard's jobs (skipping finished ones)
/// without locking the run directory; with `merge`, the last shard then merges (runs the
/// `eval-lds` stage) if every job is done, with the `eval-lds` stage of `registry` (a worker
/// of a running `eval-lds` stage does not). `config` must be the run's config.
pub fn run_shard(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
    shard: Shard,
    merge: bool,
) -> Result<ShardOutcome> {
    if run.manifest()?.config_hash != sha256_json(&config.to_json()) {
        return Err(Error::Pipeline(format!(
            "{} was made with a different config than {}; a shard must use the run's config",
            run.path().display(),
            config_file.display()
        )));
    }
    let inputs = Inputs::load(config, run)?;
    let retrain = inputs.retrain(config);
    let jobs = all_jobs(config.eval.subsets, config.eval.seeds);
    let mine: Vec<Job> = jobs
        .iter()
        .enumerate()
        .filter(|(k, _)| shard.owns(*k))
        .map(|(_, j)| *j)
        .collect();
    tracing::info!(
        "eval-lds: shard {}/{}: {} of {} retraining jobs",
        shard.index,
        shard.count,
        mine.len(),
        jobs.len()
    );
    let ran = retrain.run_missing(&mine, &fit_options(config), &|_| Ok(()))?;
    let mut missing = 0;
    for &j in &jobs {
        if retrain.load(j)?.is_none() {
            missing += 1;
        }
    }
    if !merge || !shard.is_last() || missing > 0 {
        return Ok(ShardOutcome::Partial { ran, missing });
    }
    run_stages(
        registry,
        config,
        config_file,
        run,
        &["eval-lds".to_string()],
        &RunOptions::default(),
    )?;
    Ok(ShardOutcome::Merged { ran })
}

/// `source-tda merge eval-lds`: once every retraining job of every shard has its result,
/// runs the `eval-lds` stage (which then trains nothing); refuses, with the count missing and
/// what to rerun, while jobs are missing. Returns the jobs merged and whether the stage ran
/// (a complete, current stage is skipped by the runner: merging again changes nothing).
pub fn merge_lds(
    registry: &Registry,
    config: &Config,
    config_file: &Path,
    run: &RunDir,
) -> Result<(usize, bool)> {
    let inputs = Inputs::load(config, run)?;
    let retrain = inputs.retrain(config);
    let jobs = all_jobs(config.eval.subsets, config.eval.seeds);
    let mut missing = 0;
    for &j in &jobs {
        if retrain.load(j)?.is_none() {
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(Error::Pipeline(format!(
            "{missing} of the {} retraining jobs of eval-lds have no result in {}: rerun the \
             `source-tda eval lds --shard i/n --run-dir {}` processes that did not finish (each \
             skips its finished jobs), then merge again",
            jobs.len(),
            run.path().join("eval-work").display(),
            run.path().display()
        )));
    }
    let stages = ["eval-lds".to_string()];
    let opts = RunOptions::default();
    let out = run_stages(registry, config, config_file, run, &stages, &opts)?;
    let ran = out.iter().any(|(_, o)| *o == Outcome::Ran);
    Ok((jobs.len(), ran))
}

impl Stage for EvalLdsStage {
    fn name(&self) -> &'static str {
        "eval-lds"
    }

    fn describe(&self) -> &'static str {
        "linear datamodeling score: retrain on random subsets, correlate predicted and measured \
         query losses, per method"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "prepare", "finetune", "score"]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        let mut v = json!({"eval": {"methods": c.eval.methods, "subsets": c.eval.subsets,
                        "alpha": c.eval.alpha, "seeds": c.eval.seeds,
                        "bootstrap": c.eval.bootstrap},
               "train": c.train, "batching": c.batching, "attribution": c.attribution,
               "seed": c.run.seed});
        if let Some(s) = c.eval.subset_seed {
            v["eval"]["subset_seed"] = json!(s);
        }
        v
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let c = ctx.config;
        let inputs = Inputs::load(c, ctx.run)?;
        let retrain = inputs.retrain(c);
        let jobs = all_jobs(c.eval.subsets, c.eval.seeds);
        let todo = retrain.missing(&jobs)?;
        let workers = worker_count(ctx, &inputs.base_dir, todo.len())?;
        if workers > 1 {
            retrain_in_workers(ctx, &retrain, &todo, workers)?;
        } else {
            let hook =
                |j: Job| ctx.failpoint(&format!("after-job-{}", j.subset * c.eval.seeds + j.seed));
            retrain.run_all(&todo, &fit_options(c), &hook)?;
        }

        let (q, m, r) = (inputs.queries.len(), c.eval.subsets, c.eval.seeds);
        // measured[q][j]: f(q) averaged over seeds; raw[j][r][q] kept for the points table.
        let mut raw = vec![vec![Vec::new(); r]; m];
        let mut measured = vec![vec![0f64; m]; q];
        for &job in &jobs {
            let res = retrain.load(job)?.ok_or_else(|| {
                Error::Pipeline(format!(
                    "eval-lds: the result of subset {} seed {} is missing from {}",
                    job.subset,
                    job.seed,
                    inputs.jobs_dir.display()
                ))
            })?;
            let vals = res.measured();
            for (qi, &v) in vals.iter().enumerate() {
                measured[qi][job.subset] += v as f64 / r as f64;
            }
            raw[job.subset][job.seed] = vals;
        }
        // subsets[r][j]: the kept documents of role r in subset j.
        let drawn: Vec<Vec<Vec<usize>>> = (0..m).map(|j| retrain.subset(j)).collect();
        let n_roles = inputs.roles.len();
        let subsets: Vec<Vec<Vec<usize>>> = (0..n_roles)
            .map(|r| drawn.iter().map(|d| d[r].clone()).collect())
            .collect();
        let query_ids: Vec<String> = inputs.queries.iter().map(|d| d.doc_id.clone()).collect();
        let role_ids: Vec<Vec<String>> = inputs
            .roles
            .iter()
            .map(|r| r.docs.iter().map(|d| d.doc_id.clone()).collect())
            .collect();
        let role_args: Vec<(&str, &[String])> = inputs
            .roles
            .iter()
            .zip(&role_ids)
            .map(|(r, ids)| (r.role.as_str(), ids.as_slice()))
            .collect();

        let mut cols = PointColumns::default();
        let mut methods = Vec::new();
        // Every later method is compared with the first on the same subsets (paired), in
        // total and per role: (name, LDS) of the first method, and its predicted losses
        // (index 0: all roles; 1 + r: role r alone, None where it scores none of r).
        let mut first: Option<(String, Option<f64>)> = None;
        let mut first_predicted: Vec<Option<Vec<Vec<f64>>>> = Vec::new();
        for &method in &c.eval.methods {
            let name = method.name();
            let (_, taus) = role_scores(ctx, method, &query_ids, &role_args)?;
            let by_role: Vec<Option<Vec<Vec<f64>>>> = taus
                .iter()
                .zip(&subsets)
                .map(|(tau, s)| tau.as_ref().map(|t| predicted_losses(t, s)))
                .collect();
            let covered: Vec<&str> = inputs
                .roles
                .iter()
                .zip(&by_role)
                .filter(|(_, p)| p.is_some())
                .map(|(r, _)| r.role.as_str())
                .collect();
            if covered.is_empty() {
                return Err(Error::Pipeline(format!(
                    "eval-lds: method `{name}` scores no document of {}; rerun its score stage",
                    inputs
                        .roles
                        .iter()
                        .map(|r| format!("`{}`", r.role))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if covered.len() < n_roles {
                tracing::info!(
                    "eval-lds: `{name}` scores only {}: its predicted losses leave the other \
                     roles' kept documents out (they add nothing)",
                    covered.join(", ")
                );
            }
            // g_S(q) summed over the roles the method scores.
            let mut predicted = vec![vec![0f64; m]; q];
            for p in by_role.iter().flatten() {
                for (row, add) in predicted.iter_mut().zip(p) {
                    for (x, y) in row.iter_mut().zip(add) {
                        *x += y;
                    }
                }
            }
            let res = lds(&predicted, &measured, c.eval.bootstrap, c.run.seed);
            for qi in 0..q {
                for j in 0..m {
                    for (s, vals) in raw[j].iter().enumerate() {
                        cols.method.push(name.to_string());
                        cols.query_id.push(query_ids[qi].clone());
                        cols.subset.push(j as u32);
                        cols.seed.push(s as u32);
                        cols.predicted.push(predicted[qi][j]);
                        cols.measured.push(vals[qi] as f64);
                    }
                }
            }
            let per_query: serde_json::Map<String, serde_json::Value> = query_ids
                .iter()
                .zip(&res.per_query)
                .map(|(id, v)| (id.clone(), json!(v)))
                .collect();
            let mut entry = json!({"method": name, "lds": res.lds, "ci95": res.ci95,
                                   "per_query": per_query, "roles": covered});
            // Per role: the LDS of that role's documents alone, paired with the first
            // method's on the same role.
            if n_roles > 1 {
                let mut roles_json = serde_json::Map::new();
                for (r, p) in by_role.iter().enumerate() {
                    let Some(p) = p else { continue };
                    let l = lds(p, &measured, c.eval.bootstrap, c.run.seed);
                    let mut e = json!({"lds": l.lds, "ci95": l.ci95});
                    if let (Some((base, _)), Some(Some(fp))) = (&first, first_predicted.get(1 + r))
                    {
                        let base_lds = lds(fp, &measured, c.eval.bootstrap, c.run.seed).lds;
                        let ci = bootstrap_difference_ci95(
                            p,
                            fp,
                            &measured,
                            c.eval.bootstrap,
                            c.run.seed,
                        );
                        if let (Some(a), Some(b), Some(ci)) = (l.lds, base_lds, ci) {
                            e["vs"] = json!({"method": base, "difference": a - b, "ci95": ci});
                        }
                    }
                    roles_json.insert(inputs.roles[r].role.clone(), e);
                }
                entry["by_role"] = json!(roles_json);
            }
            match first {
                None => {
                    first = Some((name, res.lds));
                    first_predicted = std::iter::once(Some(predicted)).chain(by_role).collect();
                }
                Some((ref base, base_lds)) => {
                    let ci = bootstrap_difference_ci95(
                        &predicted,
                        first_predicted[0]
                            .as_ref()
                            .expect("the first method's total"),
                        &measured,
                        c.eval.bootstrap,
                        c.run.seed,
                    );
                    if let (Some(l), Some(b), Some(ci)) = (res.lds, base_lds, ci) {
                        entry["vs"] = json!({"method": base, "difference": l - b, "ci95": ci});
                    }
                }
            }
            methods.push(entry);
        }
        write_table(
            &ctx.out("points.parquet"),
            &[
                ("method", Column::Str(cols.method)),
                ("query_id", Column::Str(cols.query_id)),
                ("subset", Column::U32(cols.subset)),
                ("seed", Column::U32(cols.seed)),
                ("predicted", Column::F64(cols.predicted)),
                ("measured", Column::F64(cols.measured)),
            ],
            &[
                ("source_tda.version".into(), crate::VERSION.into()),
                ("source_tda.table".into(), "lds_points".into()),
                (
                    "source_tda.predicted".into(),
                    "-sum over the subset's documents of tau(q, m) (up to a constant)".into(),
                ),
                (
                    "source_tda.measured".into(),
                    "-log p(completion | prompt) after fine-tuning on the subset".into(),
                ),
            ],
        )?;
        let summary = json!({
            "subsets": m, "alpha": c.eval.alpha, "seeds": r, "methods": methods,
            "subset_size": subset_size(role_ids[0].len(), c.eval.alpha),
            "n_train": role_ids[0].len(), "bootstrap": c.eval.bootstrap,
            "roles": inputs.roles.iter().map(|r| json!({"role": r.role, "n": r.docs.len(),
                "subset_size": subset_size(r.docs.len(), c.eval.alpha)}))
                .collect::<Vec<_>>(),
            "jobs_dir": inputs.jobs_dir.strip_prefix(ctx.run.path()).unwrap_or(&inputs.jobs_dir),
        });
        write_json_atomic(&ctx.out("summary.json"), &summary)?;
        for line in lds_table(&summary).lines() {
            tracing::info!("eval-lds: {line}");
        }
        Ok(summary)
    }
}
