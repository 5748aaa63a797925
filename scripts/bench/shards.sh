#!/usr/bin/env bash
# Wall time of the demo's `fit` in one process against N shards run side by side on this
# machine, as a scheduler's array job would run them on N machines: the demo pipeline
# (pipelines/demo.toml) up to `finetune` once, copied twice; then `fit` alone, and the sharded
# fit's four steps (N covariance shards at once, merge, N Λ shards at once, merge), each timed.
# Prints the seconds of each step and the totals, and checks that the sharded run's fit is
# complete (the factors' agreement is tests/it/shards.rs's job).
# Usage: scripts/bench/shards.sh [N]   (default 4)
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-4}"
cargo build --quiet --release --bin source-tda
target="${CARGO_TARGET_DIR:-target}"
[[ "$target" == /* ]] || target="$(pwd)/$target"
bin="$target/release/source-tda"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" -q run pipelines/demo.toml --run-dir "$work/one" --until finetune
cp -a "$work/one" "$work/sharded"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
t0=$(now); "$bin" -q fit --run-dir "$work/one"; t1=$(now)
single=$(secs "$t0" "$t1")
shards() {
  local pids=()
  for i in $(seq 1 "$n"); do
    "$bin" -q fit --shard "$i/$n" --run-dir "$work/sharded" 2>/dev/null & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
s0=$(now); shards; s1=$(now)
"$bin" -q merge fit --run-dir "$work/sharded" 2>/dev/null; s2=$(now)
shards; s3=$(now)
"$bin" -q merge fit --run-dir "$work/sharded" 2>/dev/null; s4=$(now)
"$bin" status --json --run-dir "$work/sharded" | python3 -c "import json, sys
fit = [s for s in json.load(sys.stdin)['stages'] if s['stage'] == 'fit'][0]
assert fit['status'] == 'complete', fit"
printf "%-28s %s\n" "cores" "$(nproc)" "fit, one process (s)" "$single" \
  "covariance shards x$n (s)" "$(secs "$s0" "$s1")" "merge: eigenbases (s)" "$(secs "$s1" "$s2")" \
  "Λ shards x$n (s)" "$(secs "$s2" "$s3")" "merge: factors (s)" "$(secs "$s3" "$s4")" \
  "fit, $n shards in all (s)" "$(secs "$s0" "$s4")"
