#!/usr/bin/env bash
# Fine-tuning throughput for a SmolLM2-135M-shaped model (random weights), AdamW, batch 8 ×
# 128 tokens: truncated to 4 layers and at full depth (30 layers); then the demo's wall time.
# Usage: scripts/bench/finetune.sh [STEPS_4L] [STEPS_30L]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet --release --example bench_finetune --bin source-tda
bin="${CARGO_TARGET_DIR:-target}/release"
"$bin/examples/bench_finetune" 4 "${1:-5}" 8 128 | tail -1
"$bin/examples/bench_finetune" 30 "${2:-3}" 8 128 | tail -1
run=$(mktemp -d)
start=$(date +%s.%N)
"$bin/source-tda" -q run pipelines/demo.toml --run-dir "$run/demo"
echo "demo pipeline (every stage of pipelines/demo.toml): $(echo "$(date +%s.%N) - $start" | bc) s"
rm -rf "$run"
