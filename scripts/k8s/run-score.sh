#!/usr/bin/env bash
# Runs a sharded source-tda `score` on Kubernetes: the Indexed Job of score-shards.yaml, then
# merge-job.yaml with STAGE=score once it completed. Usage: scripts/k8s/run-score.sh [NAMESPACE]
# (kubectl configured for the cluster; edit the manifests first: image, claim, RUN_DIR, N).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns=(--namespace "${1:-default}")
step() { # step MANIFEST KIND PASS
  local name="source-tda-$2-$3"
  sed -e "s/-PASS\$/-$3/" -e "/name: STAGE/{n;s/value: fit/value: score/}" "$here/$1" |
    kubectl apply "${ns[@]}" -f -
  kubectl wait "${ns[@]}" --for=condition=complete --timeout=24h "job/$name"
}
step score-shards.yaml score shards
step merge-job.yaml merge score
echo "score merged; the later stages run as usual on the run directory"
