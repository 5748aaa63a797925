#!/usr/bin/env bash
# Wall time of the demo's `fit` and `score` in one process against N shards run side by side
# on this machine, as a scheduler's array job would run them on N machines: the demo pipeline
# (pipelines/demo.toml) up to `finetune` once, copied twice; then `fit` alone, and the sharded
# fit's four steps (N covariance shards at once, merge, N Λ shards at once, merge), each timed;
# then `query` in both, `score` alone, and N score shards at once and their merge.
# Prints the seconds of each step and the totals, and checks that the sharded run's fit and
# score are complete (their agreement is tests/it/shards.rs's and score_shards.rs's job).
# Usage: scripts/bench/shards.sh [N]   (default 4; SOURCE_TDA_BIN=PATH times that binary
# instead of building one)
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-4}"
if [[ -n "${SOURCE_TDA_BIN:-}" ]]; then
  bin="$SOURCE_TDA_BIN"
else
  cargo build --quiet --release --bin source-tda
  target="${CARGO_TARGET_DIR:-target}"
  [[ "$target" == /* ]] || target="$(pwd)/$target"
  bin="$target/release/source-tda"
fi
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
for d in one sharded; do
  "$bin" -q run pipelines/demo.toml --run-dir "$work/$d" --until query
done
q0=$(now); "$bin" -q score --run-dir "$work/one"; q1=$(now)
score_single=$(secs "$q0" "$q1")
r0=$(now)
pids=()
for i in $(seq 1 "$n"); do
  "$bin" -q score --shard "$i/$n" --run-dir "$work/sharded" 2>/dev/null & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
r1=$(now)
"$bin" -q merge score --run-dir "$work/sharded" 2>/dev/null; r2=$(now)
"$bin" status --json --run-dir "$work/sharded" | python3 -c "import json, sys
st = {s['stage']: s for s in json.load(sys.stdin)['stages']}
for name in ('fit', 'score'):
    assert st[name]['status'] == 'complete', st[name]"
printf "%-28s %s\n" "cores" "$(nproc)" "fit, one process (s)" "$single" \
  "covariance shards x$n (s)" "$(secs "$s0" "$s1")" "merge: eigenbases (s)" "$(secs "$s1" "$s2")" \
  "Λ shards x$n (s)" "$(secs "$s2" "$s3")" "merge: factors (s)" "$(secs "$s3" "$s4")" \
  "fit, $n shards in all (s)" "$(secs "$s0" "$s4")" \
  "score, one process (s)" "$score_single" "score shards x$n (s)" "$(secs "$r0" "$r1")" \
  "merge: score (s)" "$(secs "$r1" "$r2")" "score, $n shards in all (s)" "$(secs "$r0" "$r2")"
