//! Owns the LDS retraining jobs: training on a subset, measuring queries, caching results.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution;
//! sibling `lds`.
//!
//! The expensive part of the LDS: fine-tuning once per (subset j, seed r) with the run's
//! `[train]` and measuring every query's loss f(q) = −log p(completion | prompt) on the
//! result. Each job's result is written atomically to its own file as it finishes
//! (`JOBS_DIR/subset-JJJJ-seed-RR.json`), so a rerun skips finished jobs and concurrent
//! shards (`--shard i/n`: job index ≡ i − 1 mod n) never write the same file.
//!
//! With `[[train.stages]]` a subset S_j keeps a fraction α of every data role the stages
//! train on (drawn per role, [`RoleDocs`]), and the job retrains every stage, in order, on
//! the kept documents of its role (docs/design.md §6).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::config::{BatchingConfig, TrainConfig};
use crate::data::PreparedDoc;
use crate::error::{Error, IoContext, Result};
use crate::model::Model;
use crate::passes::for_each_batch;
use crate::passes::PassOptions;
use crate::train::{train_stages_in_memory, StageRun};
use crate::util::fsx::write_json_atomic;
use crate::util::hash::sha256_bytes;
use crate::util::progress;

use super::lds::draw_subset;

/// One retraining job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// Subset index j (0-based).
    pub subset: usize,
    /// Seed index r (0-based); r = 0 trains with the run's own `train.seed`.
    pub seed: usize,
}

/// Every job of M subsets × R seeds, in (subset, seed) order; job index = j R + r.
pub fn all_jobs(subsets: usize, seeds: usize) -> Vec<Job> {
    (0..subsets)
        .flat_map(|j| (0..seeds).map(move |r| Job { subset: j, seed: r }))
        .collect()
}

pub use crate::util::shard::Shard;

/// The documents of one data role that fine-tuning stages train on.
pub struct RoleDocs {
    /// The data role (`train`, or an extra `[data.NAME]`).
    pub role: String,
    /// Its prepared documents (N_r).
    pub docs: Vec<PreparedDoc>,
}

/// What retraining needs.
pub struct Retrain<'a> {
    /// The base model folder (what `finetune` started from).
    pub base_dir: &'a Path,
    /// The data roles the stages train on, each once, in the order the stages first use
    /// them (the first is the first stage's; a single-stage run has one).
    pub roles: &'a [RoleDocs],
    /// The queries.
    pub queries: &'a [PreparedDoc],
    /// The run's `[train]` (its `[[train.stages]]`, if any, are retrained in order).
    pub train: &'a TrainConfig,
    /// The run's `[batching]`.
    pub batching: &'a BatchingConfig,
    /// α.
    pub alpha: f64,
    /// Seed of the subset draws (`[eval] subset_seed`, else `run.seed`).
    pub subset_seed: u64,
    /// Where job results are written.
    pub jobs_dir: PathBuf,
}

/// The documents a job kept of one data role other than the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleIds {
    /// The data role.
    pub role: String,
    /// The ids of its kept documents.
    pub doc_ids: Vec<String>,
}

/// One finished job, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// j.
    pub subset: u32,
    /// r.
    pub seed: u32,
    /// The `train.seed` it trained with.
    pub train_seed: u64,
    /// The documents it trained on (of the first data role).
    pub doc_ids: Vec<String>,
    /// The documents it trained on of every other data role (multi-stage runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_roles: Vec<RoleIds>,
    /// The queries measured, in order.
    pub query_ids: Vec<String>,
    /// f(q) per query (readable).
    pub measured: Vec<f32>,
    /// f(q) per query as IEEE-754 bits (what is read back: exact).
    pub measured_bits: Vec<u32>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The last step's training loss.
    pub final_loss: f64,
    /// Seconds the job took.
    pub wall_s: f64,
}

impl JobResult {
    /// f(q) per query, exactly as measured.
    pub fn measured(&self) -> Vec<f32> {
        self.measured_bits
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect()
    }
}

/// The query measurements f(q) = −log p(completion | prompt) of `model`: the same batching
/// and loss as the `query` stage, without gradients.
pub fn measure_queries(
    model: &Model,
    queries: &[PreparedDoc],
    opts: &PassOptions,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; queries.len()];
    for_each_batch(model, queries, opts, "measure", |batch, idx| {
        let losses = model.doc_losses(batch)?;
        for (k, &i) in idx.iter().enumerate() {
            out[i] = losses[k];
        }
        Ok(())
    })?;
    Ok(out)
}

impl Retrain<'_> {
    /// The result file of `job`.
    pub fn path(&self, job: Job) -> PathBuf {
        self.jobs_dir.join(format!(
            "subset-{:04}-seed-{:02}.json",
            job.subset, job.seed
        ))
    }

    /// The document indices of subset j, per data role (in [`Retrain::roles`] order): for
    /// the first role, [`draw_subset`] with the subset seed (a single-stage run's subsets);
    /// for every other role, its own stream, seeded by the subset seed and the role's name.
    pub fn subset(&self, j: usize) -> Vec<Vec<usize>> {
        self.roles
            .iter()
            .enumerate()
            .map(|(r, role)| {
                let seed = match r {
                    0 => self.subset_seed,
                    _ => role_seed(self.subset_seed, &role.role),
                };
                draw_subset(role.docs.len(), self.alpha, seed, j)
            })
            .collect()
    }

    /// The ids of subset j's documents, per data role.
    fn subset_ids(&self, j: usize) -> Vec<Vec<&str>> {
        self.subset(j)
            .iter()
            .zip(self.roles)
            .map(|(idx, role)| idx.iter().map(|&i| role.docs[i].doc_id.as_str()).collect())
            .collect()
    }

    /// The stored result of `job`, if it finished and matches this retraining (its
    /// documents and queries); a result that does not match is an error naming the file.
    pub fn load(&self, job: Job) -> Result<Option<JobResult>> {
        let path = self.path(job);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).ctx("reading", &path)?;
        let r: JobResult = serde_json::from_str(&text).map_err(|e| {
            Error::Pipeline(format!(
                "{}: unreadable LDS job result ({e}); delete it to retrain that job",
                path.display()
            ))
        })?;
        let ids = self.subset_ids(job.subset);
        let others_match = r.other_roles.len() + 1 == ids.len()
            && r.other_roles
                .iter()
                .zip(&self.roles[1..])
                .zip(&ids[1..])
                .all(|((got, role), want)| got.role == role.role && got.doc_ids == *want);
        let qids: Vec<&str> = self.queries.iter().map(|q| q.doc_id.as_str()).collect();
        if r.doc_ids != ids[0]
            || !others_match
            || r.query_ids != qids
            || r.measured_bits.len() != qids.len()
        {
            return Err(Error::Pipeline(format!(
                "{}: this LDS job result was made for other documents or queries; delete it \
                 to retrain that job",
                path.display()
            )));
        }
        Ok(Some(r))
    }

    /// Trains and measures one job, writing its result atomically: every stage of the
    /// run's `[train]` in order, each on the kept documents of its data role, with its
    /// seed shifted by the job's seed index r.
    pub fn run(&self, job: Job, opts: &PassOptions) -> Result<JobResult> {
        let t0 = std::time::Instant::now();
        let kept: Vec<Vec<PreparedDoc>> = self
            .subset(job.subset)
            .iter()
            .zip(self.roles)
            .map(|(idx, role)| idx.iter().map(|&i| role.docs[i].clone()).collect())
            .collect();
        let mut stages = self.train.stage_list();
        for s in &mut stages {
            s.train.seed = Some(s.train.seed.unwrap_or(0).wrapping_add(job.seed as u64));
        }
        let runs = stages
            .iter()
            .map(|s| {
                let r = self
                    .roles
                    .iter()
                    .position(|role| role.role == s.train.dataset)
                    .ok_or_else(|| {
                        Error::Pipeline(format!(
                            "eval-lds: stage `{}` trains on data role `{}`, which the \
                             retraining was not given",
                            s.name, s.train.dataset
                        ))
                    })?;
                Ok(StageRun {
                    train: &s.train,
                    docs: &kept[r],
                    continue_optimizer: s.continue_optimizer,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let train_seed = stages[0].train.seed.unwrap_or(0);
        let (model, log) =
            train_stages_in_memory(self.base_dir, &runs, self.batching, &Device::Cpu)?;
        let measured = measure_queries(&model, self.queries, opts)?;
        let ids = |docs: &[PreparedDoc]| docs.iter().map(|d| d.doc_id.clone()).collect();
        let r = JobResult {
            subset: job.subset as u32,
            seed: job.seed as u32,
            train_seed,
            doc_ids: ids(&kept[0]),
            other_roles: self.roles[1..]
                .iter()
                .zip(&kept[1..])
                .map(|(role, docs)| RoleIds {
                    role: role.role.clone(),
                    doc_ids: ids(docs),
                })
                .collect(),
            query_ids: self.queries.iter().map(|q| q.doc_id.clone()).collect(),
            measured_bits: measured.iter().map(|m| m.to_bits()).collect(),
            measured,
            steps: log.len() as u64,
            final_loss: log.last().map_or(f64::NAN, |l| l.loss),
            wall_s: t0.elapsed().as_secs_f64(),
        };
        std::fs::create_dir_all(&self.jobs_dir).ctx("creating", &self.jobs_dir)?;
        write_json_atomic(&self.path(job), &r)?;
        Ok(r)
    }

    /// The jobs of `jobs` without a (matching) result yet; logs how many are finished.
    pub fn missing(&self, jobs: &[Job]) -> Result<Vec<Job>> {
        let mut todo = Vec::new();
        for &job in jobs {
            if self.load(job)?.is_none() {
                todo.push(job);
            }
        }
        if todo.len() < jobs.len() {
            tracing::info!(
                "eval-lds: {} of {} retraining jobs already finished; {} to run",
                jobs.len() - todo.len(),
                jobs.len(),
                todo.len()
            );
        }
        Ok(todo)
    }

    /// Runs every job of `jobs` that has no result yet (skipping finished ones), with a
    /// progress bar and ETA. `hook` is called after each job (tests use it to interrupt).
    /// Returns how many jobs ran.
    pub fn run_missing(
        &self,
        jobs: &[Job],
        opts: &PassOptions,
        hook: &dyn Fn(Job) -> Result<()>,
    ) -> Result<usize> {
        let todo = self.missing(jobs)?;
        self.run_all(&todo, opts, hook)?;
        Ok(todo.len())
    }

    /// Runs every job of `todo` in this process, with a progress bar and ETA. `hook` is
    /// called after each job (tests use it to interrupt).
    pub fn run_all(
        &self,
        todo: &[Job],
        opts: &PassOptions,
        hook: &dyn Fn(Job) -> Result<()>,
    ) -> Result<()> {
        let pb = progress::bar(todo.len() as u64, "retrain");
        for &job in todo {
            pb.set_message(format!("subset {} seed {}", job.subset, job.seed));
            let r = self.run(job, opts)?;
            tracing::debug!(
                "eval-lds: subset {} seed {}: {} steps, final loss {:.4}, {:.1} s",
                r.subset,
                r.seed,
                r.steps,
                r.final_loss,
                r.wall_s
            );
            pb.inc(1);
            hook(job)?;
        }
        pb.finish_and_clear();
        Ok(())
    }
}

/// The subset seed of a data role other than the first: the subset seed mixed with the
/// first 8 bytes of the SHA-256 of the role's name, so each role has its own stream.
fn role_seed(seed: u64, role: &str) -> u64 {
    let h = sha256_bytes(role.as_bytes());
    seed ^ u64::from_str_radix(&h[..16], 16).expect("hex digest")
}
