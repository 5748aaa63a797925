#!/usr/bin/env bash
# One shard of source-tda's `score` as a Slurm array task: task I of an array 1-N runs
# `source-tda score --shard I/N` on the run directory on shared storage (after `query`);
# submit-score.sh makes the merge depend on the array. Rerun a failed task alone with
#   sbatch --array=I --export=ALL,RUN_DIR=...,SHARDS=N scripts/slurm/score-shard.sh
# (it overwrites its own partial result; the others are kept). See docs/design.md §11.
#SBATCH --job-name=source-tda-score
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.log
set -euo pipefail
: "${RUN_DIR:?set RUN_DIR to the run directory (on storage every node mounts)}"
: "${SHARDS:?set SHARDS to N, the number of shards (the array is 1-N)}"
: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=1-N}"
if [ "$SLURM_ARRAY_TASK_ID" -lt 1 ] || [ "$SLURM_ARRAY_TASK_ID" -gt "$SHARDS" ]; then
  echo "array task $SLURM_ARRAY_TASK_ID is outside 1-$SHARDS: submit with --array=1-$SHARDS" >&2
  exit 2
fi
exec "${SOURCE_TDA:-source-tda}" score --shard "$SLURM_ARRAY_TASK_ID/$SHARDS" --run-dir "$RUN_DIR"
