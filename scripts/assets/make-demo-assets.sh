#!/usr/bin/env bash
# Regenerates the embedded demo's assets (tokenizer, model, data) in the Hugging Face hub cache
# layout under assets/hf-cache/. Deterministic: the same bytes on every run, so the committed
# assets can be checked by rerunning this and `git diff --exit-code assets/`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --quiet --release --example make_demo_assets -- assets/hf-cache
