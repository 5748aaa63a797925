#!/usr/bin/env bash
# Candidate recall of the exact top-k (issue 28 item 3): runs one exact and several
# candidate-scored variants of two workloads and prints scripts/eval/candidate-recall.py's table
# for each. The candidate runs reuse the exact run's fine-tune, fit and queries (copied), so
# only `index` and `score` differ.
#   demo:  configs/demo-eval.toml as is (Source, 304 fact documents + 500 pretraining documents,
#          8 queries), per_query 5 10 40 at dims 4096;
#   text:  the demo model fine-tuned one epoch on the demo's 3000 pretraining documents
#          (generic text), influence function, per_query 15 at dims 4096 and 32768;
#   smollm2 (only when named): configs/smollm2-135m.toml as is (Source, 128 fact documents,
#          8 queries), per_query 5 at dims 4096 and 32768; needs the offline SmolLM2 cache
#          (scripts/assets/smollm2-offline-cache.sh, then HF_HUB_OFFLINE=1 HF_HUB_CACHE=.cache/hf)
#          and about an hour on 2 cores.
# Usage: scripts/eval/candidate-recall.sh [WORKDIR [WORKLOAD ...]]
#   WORKDIR default: a temporary folder; WORKLOADs default: demo text
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
cargo build --quiet --release --bin source-tda
target="${CARGO_TARGET_DIR:-target}"
[[ "$target" == /* ]] || target="$repo/$target"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cp "$target/release/source-tda" "$work/st"
py="$repo/.cache/py/bin/python"
[[ -x "$py" ]] || py=python3

variant() { # NAME BASE_CONFIG EXTRA
  local dir="$work/$1"
  printf '%s\n[attribution.candidates]\n%s\n' "$(cat "$2")" "$3" > "$dir.toml"
  printf 'config = "%s.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "index", "query", "score"]\n' \
    "$(basename "$dir")" > "$dir.p.toml"
  rm -rf "$dir"; cp -r "$(dirname "$dir")/exact-$(basename "$dir" | cut -d- -f1)" "$dir"
  "$work/st" -q run "$dir.p.toml" --run-dir "$dir" --allow-config-change 2>/dev/null
  echo "== $1: $3"
  "$py" scripts/eval/candidate-recall.py "$(dirname "$dir")/exact-$(basename "$dir" | cut -d- -f1)" "$dir" 1 5 10
}

workloads="${*:2}"
workloads="${workloads:-demo text}"
has() { [[ " $workloads " == *" $1 "* ]]; }

# demo: the evaluation config (T = 57, given completions) with absolute asset paths.
sed "s|\.\./assets|$repo/assets|" configs/demo-eval.toml > "$work/demo.toml"
if has demo; then
printf 'config = "demo.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "query", "score"]\n' > "$work/demo.p.toml"
"$work/st" -q run "$work/demo.p.toml" --run-dir "$work/exact-demo"
for c in 5 10 40; do variant "demo-$c" "$work/demo.toml" "per_query = $c"; done
fi

# text: train on the pretraining split, one epoch, influence function, no pretraining segment.
if has text; then
"$py" - "$work/demo.toml" "$work/text.toml" <<'PY'
import sys
s = open(sys.argv[1]).read()
s = s.replace('split = "train"                    # data/train-00000-of-00001.parquet',
              'split = "pretrain"')
a, b = s.index("[data.pretrain]"), s.index("[batching]")
s = s[:a] + s[b:]
a, b = s.index("[pretrain]"), s.index("[attribution]")
s = s[:a] + s[b:]
s = s.replace("epochs = 3 ", "epochs = 1 ").replace('method = "source"', 'method = "influence"')
open(sys.argv[2], "w").write(s)
PY
printf 'config = "text.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "query", "score"]\n' > "$work/text.p.toml"
"$work/st" -q run "$work/text.p.toml" --run-dir "$work/exact-text"
variant "text-4096" "$work/text.toml" "per_query = 15"
variant "text-32768" "$work/text.toml" "$(printf 'per_query = 15\ndims = 32768')"
fi

# smollm2: the shipped SmolLM2-135M-Instruct config with absolute asset paths.
if has smollm2; then
sed "s|\.\./assets|$repo/assets|" configs/smollm2-135m.toml > "$work/smol.toml"
printf 'config = "smol.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "query", "score"]\n' > "$work/smol.p.toml"
"$work/st" -q run "$work/smol.p.toml" --run-dir "$work/exact-smol"
variant "smol-4096" "$work/smol.toml" "per_query = 5"
variant "smol-32768" "$work/smol.toml" "$(printf 'per_query = 5\ndims = 32768')"
fi
