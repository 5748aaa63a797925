//! Owns the `Stage` contract, the `Registry` of stages and the `StageContext`.
//! Layer: pipeline — may import ground (error, util, config, output) only; siblings:
//! `manifest`, `rundir`.
//!
//! The contract between the runner and a stage.
//!
//! A stage declares which upstream stages it reads ([`Stage::inputs`]) and which part of the
//! config it depends on ([`Stage::config_view`]). The runner hashes both; a completed stage is
//! reused only while both hashes are unchanged. A stage writes only into
//! [`StageContext::out_dir`], a temporary folder the runner renames to `RUN_DIR/STAGE/` once
//! the stage returns successfully.

use std::path::{Path, PathBuf};

use crate::config::{Config, STAGE_ORDER};
use crate::error::{Error, Result};

use super::manifest::StageRecord;
use super::query_set::{set_dir, QuerySet};
use super::rundir::RunDir;

/// One stage of the pipeline.
pub trait Stage {
    /// The stage's name (one of [`STAGE_ORDER`]); also its folder in the run directory.
    fn name(&self) -> &'static str;

    /// One line for `--help` and `status`.
    fn describe(&self) -> &'static str;

    /// Upstream stages whose outputs this stage reads. They must be complete first.
    fn inputs(&self) -> &'static [&'static str];

    /// Stages whose outputs this stage reads when they exist (e.g. evaluation results shown
    /// in the report). Not required; but when one has completed, its outputs hash is part of
    /// this stage's inputs, so the stage reruns when it appears, changes or goes away.
    fn optional_inputs(&self) -> &'static [&'static str] {
        &[]
    }

    /// Files of upstream stages this stage never reads, as (stage, path inside its folder;
    /// a path ending in `/` names a folder): they are left out of the upstream outputs hash
    /// this stage's key records, so a change to them alone does not rerun it. Each data set
    /// has its own files upstream (`fetch/data/ROLE.json`, `prepare/ROLE.parquet`), so a stage
    /// that does not read the queries names theirs here and survives new queries.
    fn unread_inputs(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// The part of the config this stage's result depends on. A change to it reruns the
    /// stage (and, through the output hashes, every stage that reads its outputs).
    fn config_view(&self, config: &Config) -> serde_json::Value;

    /// Whether a completed record is still valid with respect to things outside the run
    /// directory (e.g. the files `fetch` resolved still exist unchanged). Default: yes.
    fn still_valid(&self, _run: &RunDir, _record: &StageRecord) -> Result<bool> {
        Ok(true)
    }

    /// Does the work, writing every artifact under `ctx.out_dir`. Returns a summary that the
    /// manifest keeps (counts, resolved revisions, warnings).
    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value>;
}

/// Every stage of [`STAGE_ORDER`], once each, in that order.
pub struct Registry {
    stages: Vec<Box<dyn Stage>>,
}

impl Registry {
    /// Arranges `stages` in [`STAGE_ORDER`] (the order is written there only).
    ///
    /// # Panics
    /// When `stages` is not exactly the stages [`STAGE_ORDER`] names, each once: the set of
    /// implemented stages and the order disagree, a mistake in the program.
    pub fn new(mut stages: Vec<Box<dyn Stage>>) -> Registry {
        let position = |s: &dyn Stage| {
            STAGE_ORDER
                .iter()
                .position(|o| *o == s.name())
                .unwrap_or_else(|| panic!("stage `{}` is not in STAGE_ORDER", s.name()))
        };
        stages.sort_by_key(|s| position(s.as_ref()));
        let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
        assert_eq!(
            names, STAGE_ORDER,
            "the registry must hold every stage of STAGE_ORDER exactly once"
        );
        Registry { stages }
    }

    /// The stage called `name`, or an error listing the names that exist.
    pub fn find(&self, name: &str) -> Result<&dyn Stage> {
        self.stages
            .iter()
            .find(|s| s.name() == name)
            .map(|s| s.as_ref())
            .ok_or_else(|| {
                Error::Pipeline(format!(
                    "unknown stage `{name}`; stages are {}",
                    STAGE_ORDER.join(", ")
                ))
            })
    }

    /// The stages, in pipeline order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }

    /// The stages' names, in pipeline order.
    pub fn names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name()).collect()
    }
}

/// What a running stage may use.
pub struct StageContext<'a> {
    /// The resolved config.
    pub config: &'a Config,
    /// The run directory (read upstream outputs with [`RunDir::stage_dir`]).
    pub run: &'a RunDir,
    /// The stages the runner was given: a stage that runs others (e.g. in a sub-run) runs
    /// them from here.
    pub registry: &'a Registry,
    /// The temporary folder to write into; becomes `RUN_DIR/STAGE/` on success.
    pub out_dir: PathBuf,
    /// The stage's name.
    pub stage: &'static str,
    /// The first 16 hex digits of SHA-256(inputs hash, config hash): names the stage's
    /// resume folder, so state saved under another config or other inputs is never reused.
    pub resume_key: String,
    /// The config file the run was started with (a worker process is given the same one).
    pub config_file: &'a Path,
    /// The worker processes the stage may start.
    pub workers: &'a Workers,
    /// The named query set this instance of a per-set stage (`query`, `score`) runs for;
    /// `None`: the default set of `[data.query]`.
    pub query_set: Option<&'a QuerySet>,
}

/// Worker processes a stage may start for work that splits into independent jobs (the
/// `eval-lds` retrainings): each is this program run again on a share of the jobs.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    /// The executable to start (the CLI passes itself); `None`: everything runs in this
    /// process (a library caller, the tests).
    pub exe: Option<PathBuf>,
    /// How many; `None`: the stage decides (see `eval-lds`).
    pub count: Option<usize>,
}

impl StageContext<'_> {
    /// A path inside the stage's output folder.
    pub fn out(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.out_dir.join(rel)
    }

    /// The folder of upstream stage `up` as this instance reads it: a per-set stage's own
    /// set's folder (`RUN_DIR/query/query_set=NAME/`), else `RUN_DIR/UP/`.
    pub fn input_dir(&self, up: &str) -> PathBuf {
        set_dir(self.run, up, self.query_set.map(|s| s.name.as_str()))
    }

    /// `RUN_DIR/.resume/STAGE-KEY/`: a scratch folder (created on first use) that survives an
    /// interrupted run, unlike `out_dir`. A long stage keeps its resume state (e.g. training
    /// checkpoints) here and picks it up when rerun with the same inputs and config. The
    /// runner deletes the stage's resume folders once the stage completes, and those of other
    /// keys when it starts.
    pub fn resume_dir(&self) -> Result<PathBuf> {
        let dir = self.run.resume_dir(self.stage, &self.resume_key);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        Ok(dir)
    }

    /// A test hook: when `SOURCE_TDA_FAIL_IN_STAGE` names this stage (and `point`, if given
    /// as `STAGE:POINT`), returns an injected error; when `SOURCE_TDA_PAUSE_IN_STAGE` does,
    /// writes `RUN_DIR/.paused` and sleeps so that a test can kill the process mid-write.
    /// Stages call it between writes. Costs one environment lookup.
    pub fn failpoint(&self, point: &str) -> Result<()> {
        let hits = |var: &str| {
            std::env::var(var)
                .ok()
                .is_some_and(|v| v == self.stage || v == format!("{}:{point}", self.stage))
        };
        if hits("SOURCE_TDA_FAIL_IN_STAGE") {
            return Err(Error::Injected(format!("{}:{point}", self.stage)));
        }
        if hits("SOURCE_TDA_PAUSE_IN_STAGE") {
            let _ = std::fs::write(self.run.path().join(".paused"), point);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    struct Named(&'static str);
    impl Stage for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn describe(&self) -> &'static str {
            "test"
        }
        fn inputs(&self) -> &'static [&'static str] {
            &[]
        }
        fn config_view(&self, _: &Config) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn run(&self, _: &StageContext) -> Result<serde_json::Value> {
            Ok(serde_json::Value::Null)
        }
    }

    fn named(names: &[&'static str]) -> Vec<Box<dyn Stage>> {
        names
            .iter()
            .map(|n| Box::new(Named(n)) as Box<dyn Stage>)
            .collect()
    }

    #[test]
    fn a_registry_arranges_its_stages_in_stage_order() {
        let mut reversed = STAGE_ORDER;
        reversed.reverse();
        let r = Registry::new(named(&reversed));
        assert_eq!(r.names(), STAGE_ORDER.to_vec());
        assert_eq!(r.find("score").unwrap().name(), "score");
        let e = r.find("reprot").err().expect("no such stage").to_string();
        assert!(e.contains("unknown stage `reprot`"), "{e}");
    }

    #[test]
    #[should_panic(expected = "exactly once")]
    fn a_registry_missing_a_stage_is_refused() {
        Registry::new(named(&STAGE_ORDER[1..]));
    }

    #[test]
    #[should_panic(expected = "not in STAGE_ORDER")]
    fn a_registry_with_an_unknown_stage_is_refused() {
        let mut stages = named(&STAGE_ORDER);
        stages.push(Box::new(Named("extra")));
        Registry::new(stages);
    }
}
