#!/usr/bin/env bash
# Retrainings per minute of `eval lds` on the demo configs, side by side in one invocation:
# in one process on every core (--workers 1, how eval-lds retrained before worker processes)
# and in worker processes (the default: one single-threaded retraining per core for a small
# model). The two are run alternately ROUNDS times; each prints its wall time and rate, and
# the script checks that both produced bitwise the same retrained losses.
#
# Usage: scripts/bench/retrain.sh [JOBS=8] [ROUNDS=2] [CONFIGS="demo-short demo-mid"]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
jobs=${1:-8}
rounds=${2:-2}
configs=${3:-"demo-short demo-mid"}
cargo build --quiet --release --bin source-tda
bin="${CARGO_TARGET_DIR:-target}/release/source-tda"
[[ "$bin" = /* ]] || bin="$root/$bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for name in $configs; do
    # The config with M = JOBS subsets and the shipped hub cache as an absolute path.
    sed -e "s|^subsets = .*|subsets = $jobs|" \
        -e "s|\.\./assets/hf-cache|$root/assets/hf-cache|" "configs/$name.toml" >"$tmp/$name.toml"
    printf 'config = "%s.toml"\nstages = ["fetch", "prepare", "finetune", "fit", "query", "score"]\n' \
        "$name" >"$tmp/$name-pipe.toml"
    "$bin" -q run "$tmp/$name-pipe.toml" --run-dir "$tmp/$name-base"
    for round in $(seq "$rounds"); do
        for mode in "--workers 1" ""; do
            label=${mode:-default}
            run="$tmp/$name-$round-${label// /}"
            cp -a "$tmp/$name-base" "$run"
            start=$(date +%s.%N)
            # shellcheck disable=SC2086
            "$bin" -q eval lds --config "$tmp/$name.toml" --run-dir "$run" $mode >/dev/null
            secs=$(echo "$(date +%s.%N) - $start" | bc)
            printf '%-11s round %d  %-12s %2d retrainings in %6.1f s: %5.1f per minute\n' \
                "$name" "$round" "$label" "$jobs" "$secs" "$(echo "60 * $jobs / $secs" | bc -l)"
        done
    done
    # The retrained losses (f32 bits) of every mode and round, bitwise.
    sums=$(for d in "$tmp/$name"-[0-9]*; do
        python3 -c 'import json, sys; print([json.load(open(f))["measured_bits"] for f in sorted(sys.argv[1:])])' \
            "$d"/eval-work/lds-*/subset-*.json | sha256sum
    done | sort -u | wc -l)
    if [[ "$sums" != 1 ]]; then
        echo "$name: the retrained losses differ between modes or rounds" >&2
        exit 1
    fi
    echo "$name: retrained losses bitwise identical across modes and rounds"
done
