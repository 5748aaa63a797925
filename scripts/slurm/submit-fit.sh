#!/usr/bin/env bash
# Submits a sharded `fit` to Slurm as four dependent jobs:
#   covariance shards (array 1-N) -> merge (eigenbases) -> Λ shards (array 1-N) -> merge.
# Usage: scripts/slurm/submit-fit.sh RUN_DIR [N]   (RUN_DIR on shared storage, after finetune)
# Extra sbatch options (partition, account) go in $SBATCH_OPTS. A failed task leaves the jobs
# after it pending (DependencyNeverSatisfied): rerun it with fit-shard.sh (see there), then
# submit the remaining steps again with this script; finished shards and merges are kept
# and a merge that is done is not redone.
set -euo pipefail
run_dir="${1:?usage: submit-fit.sh RUN_DIR [N]}"
shards="${2:-4}"
here="$(cd "$(dirname "$0")" && pwd)"
run_dir="$(cd "$run_dir" && pwd)"
env_="--export=ALL,RUN_DIR=$run_dir,SHARDS=$shards,STAGE=fit"
# shellcheck disable=SC2086 # SBATCH_OPTS holds several options
submit() { sbatch --parsable $env_ ${SBATCH_OPTS:-} "$@"; }
cov=$(submit --array="1-$shards" "$here/fit-shard.sh")
bases=$(submit --dependency="afterok:$cov" "$here/merge.sh")
lambda=$(submit --dependency="afterok:$bases" --array="1-$shards" "$here/fit-shard.sh")
done_=$(submit --dependency="afterok:$lambda" "$here/merge.sh")
echo "submitted: covariance shards $cov, merge $bases, Λ shards $lambda, merge $done_"
echo "then: source-tda run PIPELINE --run-dir $run_dir   (skips the merged fit)"
