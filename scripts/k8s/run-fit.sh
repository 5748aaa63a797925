#!/usr/bin/env bash
# Runs a sharded source-tda `fit` on Kubernetes: the Indexed Job of fit-shards.yaml for the
# covariance pass, merge-job.yaml, the Indexed Job again for the Λ pass, merge-job.yaml again;
# each waits for the one before to complete. Usage: scripts/k8s/run-fit.sh [NAMESPACE]
# (kubectl configured for the cluster; edit the manifests first: image, claim, RUN_DIR, N).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns=(--namespace "${1:-default}")
step() { # step MANIFEST KIND PASS
  local name="source-tda-$2-$3"
  sed "s/-PASS\$/-$3/" "$here/$1" | kubectl apply "${ns[@]}" -f -
  kubectl wait "${ns[@]}" --for=condition=complete --timeout=24h "job/$name"
}
step fit-shards.yaml fit covariance
step merge-job.yaml merge bases
step fit-shards.yaml fit lambda
step merge-job.yaml merge factors
echo "fit merged; the later stages run as usual on the run directory"
