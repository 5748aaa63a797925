#!/usr/bin/env bash
# Merges the shards of a source-tda stage (`fit`, `score` or `eval-lds`: $STAGE) in the run
# directory on shared storage: a one-task Slurm job that submit-fit.sh (submit-score.sh) makes
# depend on the array job before it (afterok: it starts only when every task succeeded).
# Idempotent.
#SBATCH --job-name=source-tda-merge
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail
: "${RUN_DIR:?set RUN_DIR to the run directory (on storage every node mounts)}"
exec "${SOURCE_TDA:-source-tda}" merge "${STAGE:-fit}" --run-dir "$RUN_DIR"
