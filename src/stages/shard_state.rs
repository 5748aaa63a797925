//! Owns what a shard and a merge check before they run: `ShardState`, `shard_state`.
//! Layer: stages — may import every library layer (ground up to pipeline and report); no
//! sibling.
//!
//! `fit --shard`, `score --shard` and their merges run one stage outside the pipeline runner,
//! so they check what the runner would: the run was made with the given config, the stage's
//! inputs are complete, and whether the stage is already complete and current (its resume
//! key).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pipeline::{stage_key, staleness, Registry, RunDir, StageStatus};
use crate::util::hash::sha256_json;

/// Stage `name`'s resume key, and whether it is complete and current.
pub(super) struct ShardState {
    pub(super) key: String,
    pub(super) complete: bool,
}

/// Refuses a config other than the run's, or an input stage of `name` not complete; then
/// stage `name`'s [`ShardState`].
pub(super) fn shard_state(
    registry: &Registry,
    config: &Config,
    run: &RunDir,
    name: &str,
) -> Result<ShardState> {
    let manifest = run.manifest()?;
    if manifest.config_hash != sha256_json(&config.to_json()) {
        return Err(Error::Pipeline(format!(
            "{} was made with a different config than the one given; a shard and a merge \
             must use the run's config (leave out --config to read the run directory's \
             config.toml)",
            run.path().display()
        )));
    }
    let stage = registry.find(name)?;
    for up in stage.inputs() {
        if manifest
            .stages
            .get(*up)
            .is_none_or(|r| r.status != StageStatus::Complete)
        {
            return Err(Error::Pipeline(format!(
                "{name} --shard needs the `{up}` stage complete first: run the pipeline up to \
                 it (`source-tda run PIPELINE --until {up}`, or its stages one by one)"
            )));
        }
    }
    let key = stage_key(stage, config, &manifest)?;
    let complete = match manifest.stages.get(name) {
        Some(r) if r.status == StageStatus::Complete => staleness(stage, run, r, &key)?.is_none(),
        _ => false,
    };
    Ok(ShardState {
        key: key.resume_key(),
        complete,
    })
}
