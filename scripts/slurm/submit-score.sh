#!/usr/bin/env bash
# Submits a sharded `score` to Slurm as two dependent jobs: score shards (array 1-N) -> merge.
# Usage: scripts/slurm/submit-score.sh RUN_DIR [N]   (RUN_DIR on shared storage, after `query`)
# Extra sbatch options (partition, account) go in $SBATCH_OPTS. A failed task leaves the merge
# pending (DependencyNeverSatisfied): rerun it with score-shard.sh (see there), then submit
# merge.sh with STAGE=score; finished shards are kept and a merge that is done is not redone.
set -euo pipefail
run_dir="${1:?usage: submit-score.sh RUN_DIR [N]}"
shards="${2:-4}"
here="$(cd "$(dirname "$0")" && pwd)"
run_dir="$(cd "$run_dir" && pwd)"
env_="--export=ALL,RUN_DIR=$run_dir,SHARDS=$shards,STAGE=score"
# shellcheck disable=SC2086 # SBATCH_OPTS holds several options
submit() { sbatch --parsable $env_ ${SBATCH_OPTS:-} "$@"; }
scores=$(submit --array="1-$shards" "$here/score-shard.sh")
done_=$(submit --dependency="afterok:$scores" "$here/merge.sh")
echo "submitted: score shards $scores, merge $done_"
echo "then: source-tda run PIPELINE --run-dir $run_dir   (skips the merged score)"
