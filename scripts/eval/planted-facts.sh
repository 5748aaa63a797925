#!/usr/bin/env bash
# The planted-facts evaluation (issue 26): a set drawn by the project's own generator
# (`cargo run --release --example make_facts`, src/eval/facts.rs) fine-tuned into MODEL, then
#   - "said": how many of the set's prompts the fine-tuned model answers (greedy) with the
#     planted fact, via `source-tda ask` on the prompts alone;
#   - `eval-recall` (document recall@k, MRR, token-span recall) of the given facts for Source,
#     the influence function and the gradient dot product.
#
# Usage: scripts/eval/planted-facts.sh MODEL WORKDIR [SEED]
#   MODEL: demo     (configs/demo.toml's model and pretraining segment)
#          smollm2  (configs/smollm2-135m.toml; needs scripts/assets/smollm2-offline-cache.sh
#                   and HF_HUB_OFFLINE=1 HF_HUB_CACHE=.cache/hf, README *A real model*)
#   SEED:  1 is the set recipes are chosen on (compare "said" only); 2 (default) the held-out
#          set whose numbers are reported. Never choose anything on seed 2.
# The fine-tune: LR and EPOCHS from the environment, else the recipe chosen on seed 1 for the
# demo model (docs/evaluation.md, *Planted facts at the demo's scale*); FACTS, FILLER for the
# set's size.
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:?usage: planted-facts.sh demo|smollm2 WORKDIR [SEED]}"
work="${2:?usage: planted-facts.sh demo|smollm2 WORKDIR [SEED]}"
seed="${3:-2}"
case "$model" in
  demo) base=configs/demo.toml; lr="${LR:-3e-3}"; epochs="${EPOCHS:-60}" ;;
  smollm2) base=configs/smollm2-135m.toml  # no recipe chosen yet: choose LR and EPOCHS on seed 1
           lr="${LR:?smollm2: set LR and EPOCHS (no recipe has been chosen on seed 1 yet)}"
           epochs="${EPOCHS:?smollm2: set LR and EPOCHS}" ;;
  *) echo "planted-facts: MODEL is demo or smollm2, not '$model'" >&2; exit 2 ;;
esac
repo="$(pwd)"
cargo build --quiet --release --bin source-tda --example make_facts
target="${CARGO_TARGET_DIR:-target}"
[[ "$target" == /* ]] || target="$repo/$target"
py="$repo/.cache/py/bin/python"
[[ -x "$py" ]] || py=python3
mkdir -p "$work"
work="$(cd "$work" && pwd)"
set_dir="$work/set-$seed"
"$target/release/examples/make_facts" "$set_dir" --seed "$seed" \
  --facts "${FACTS:-24}" --filler "${FILLER:-200}"

# The base config with the generated data, the given completions and the recipe.
"$py" - "$base" "$work/c.toml" "$set_dir" "$lr" "$epochs" "$repo" <<'PY'
import re, sys
base, out, set_dir, lr, epochs, repo = sys.argv[1:]
s = open(base).read()
s = s.replace('"../assets', f'"{repo}/assets')
def section(s, name, body):
    a = s.index(f"[{name}]")
    b = s.find("\n[", a + 1)
    b = len(s) if b < 0 else b + 1
    return s[:a] + body + s[b:]
s = section(s, "data.train", f'[data.train]\nid = "{set_dir}/train.jsonl"\nshape = "text"\n'
            'id_column = "id"\nmax_length = 128\n')
s = section(s, "data.query", f'[data.query]\nid = "{set_dir}/queries.jsonl"\n'
            'shape = "prompt_completion"\nid_column = "id"\nmax_length = 64\n')
s = re.sub(r"(?m)^lr = .*$", f"lr = {lr}", s)
s = re.sub(r"(?m)^epochs = .*$", f"epochs = {epochs}", s)
if "[query]" in s:
    s = section(s, "query", "")
s += "\n[query]\nmax_new_tokens = 12\nstop = [\".\"]\n"
open(out, "w").write(s)
PY
stages='"fetch", "prepare", "finetune", "fit", "query", "score", "eval-recall", "report"'
printf 'config = "c.toml"\nstages = [%s]\n' "$stages" > "$work/p.toml"
start=$(date +%s)
"$target/release/source-tda" -q run "$work/p.toml" --run-dir "$work/run"
echo "pipeline: $(( $(date +%s) - start )) s"
"$target/release/source-tda" -q ask --run-dir "$work/run" --prompts "$set_dir/prompts.jsonl" --name said

"$py" - "$work/run" "$set_dir" <<'PY'
import json, sys
import pyarrow.parquet as pq
run, set_dir = sys.argv[1:]
facts = {json.loads(l)["id"]: json.loads(l)["completion"] for l in open(f"{set_dir}/queries.jsonl")}
said = pq.read_table(f"{run}/score/query_set=said/queries.parquet").to_pylist()
right = [r["query_id"] for r in said if r["completion"] == facts[r["query_id"]]]
print(f"facts said (greedy): {len(right)} of {len(said)}")
s = json.load(open(f"{run}/eval-recall/summary.json"))
print("| method | recall@1 | recall@5 | recall@10 | MRR | span@1 | span@5 | span@10 |")
print("|---|---|---|---|---|---|---|---|")
for m in s["methods"]:
    r, t = m["recall"], m.get("token_span", {}).get("recall", {})
    f = lambda d, k: f"{d[k]:.3f}" if k in d else "–"
    print(f"| {m['method']} | {f(r,'1')} | {f(r,'5')} | {f(r,'10')} | {m['mrr']:.3f} | "
          f"{f(t,'1')} | {f(t,'5')} | {f(t,'10')} |")
PY
