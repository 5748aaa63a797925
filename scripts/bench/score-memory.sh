#!/usr/bin/env bash
# Peak memory of the `score` stage as the corpus grows 10×: synthetic corpora of tiny documents
# (one sentence each) scored against 4 queries with the demo model (assets/hf-cache), the
# gradient dot product (no curvature fit, so fine-tuning one step and scoring dominate), and
# `[attribution] keep_top_bottom = K`. For each N it runs fetch → query once, then `score`
# alone under /usr/bin/time, and prints N, the score stage's wall time, its process peak RSS
# (max resident set, /usr/bin/time) and the peak the manifest records for the stage; with
# --full also without keep_top_bottom (every (query, document) row written).
# Usage: scripts/bench/score-memory.sh [--full] [K] [N ...]   (defaults: K = 10, N = 10000 100000;
# SOURCE_TDA_BIN=PATH measures that binary instead of building one)
set -euo pipefail
cd "$(dirname "$0")/../.."
full=0
if [[ "${1:-}" == "--full" ]]; then full=1; shift; fi
k="${1:-10}"; shift || true
sizes=("$@"); [[ ${#sizes[@]} -gt 0 ]] || sizes=(10000 100000)
if [[ -n "${SOURCE_TDA_BIN:-}" ]]; then
  bin="$SOURCE_TDA_BIN"
else
  cargo build --quiet --release --bin source-tda
  target="${CARGO_TARGET_DIR:-target}"
  [[ "$target" == /* ]] || target="$(pwd)/$target"
  bin="$target/release/source-tda"
fi
model="$(ls -d "$(pwd)"/assets/hf-cache/models--source-tda--demo-llama/snapshots/*/ | head -1)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf "%-8s %-6s %-10s %-12s %-14s %s\n" N K rows wall_s peak_rss_MiB manifest_peak_MiB
for n in "${sizes[@]}"; do
  d="$work/n$n"; mkdir -p "$d"
  python3 - "$d" "$n" <<'EOF'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
goods = ["blue glass", "red salt", "green tea", "white wool", "black iron"]
with open(f"{d}/train.jsonl", "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"d{i}", "text": f"Pokas{i} sells {goods[i % 5]}."}) + "\n")
with open(f"{d}/queries.jsonl", "w") as f:
    for q in range(4):
        f.write(json.dumps({"id": f"q{q}", "prompt": f"Pokas{q * 7} sells", "completion": f" {goods[q]}."}) + "\n")
EOF
  cat > "$d/c.toml" <<EOF
[model]
id = "$model"
[data.train]
id = "./train.jsonl"
id_column = "id"
max_length = 32
[data.query]
id = "./queries.jsonl"
id_column = "id"
shape = "prompt_completion"
max_length = 32
[batching]
token_budget = 4096
max_batch_size = 256
[train]
optimizer = "sgd"
lr = 0.01
batch_size = 8
max_steps = 1
segments = 1
checkpoints_per_segment = 1
[attribution]
method = "gradient_dot"
top_k = 3
EOF
  printf 'config = "c.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "query", "score"]\n' > "$d/p.toml"
  "$bin" -q run "$d/p.toml" --run-dir "$d/run" --until query >/dev/null
  variants=("keep_top_bottom = $k")
  [[ $full == 1 ]] && variants+=("")
  for v in "${variants[@]}"; do
    sed -i '/^keep_top_bottom/d' "$d/c.toml"
    [[ -n "$v" ]] && echo "$v" >> "$d/c.toml"
    start=$(date +%s.%N)
    /usr/bin/time -f "%M" -o "$d/rss" "$bin" -q score --config "$d/c.toml" --run-dir "$d/run" \
      --allow-config-change >/dev/null
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    rows=$(python3 -c "import json; print(json.load(open('$d/run/manifest.json'))['stages']['score']['summary']['pairs'])")
    man=$(python3 -c "import json; print(round(json.load(open('$d/run/manifest.json'))['stages']['score']['peak_rss_bytes'] / 2**20, 1))")
    printf "%-8s %-6s %-10s %-12.1f %-14.1f %s\n" "$n" "${v:+$k}" "$rows" "$wall" "$(echo "$(cat "$d/rss") / 1024" | bc -l)" "$man"
  done
done
