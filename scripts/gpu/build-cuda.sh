#!/usr/bin/env bash
# Builds the CUDA binaries on a machine with no GPU and no system CUDA, and packages what the
# GPU machine needs into dist/cuda/ (scripts/gpu/gpu-check.sh runs them there).
#
#   scripts/gpu/build-cuda.sh            # everything: toolkit, both builds, dist/cuda/
#   scripts/gpu/build-cuda.sh cuda       # only the `--features cuda` build (CLI + cuda_e2e)
#   scripts/gpu/build-cuda.sh kernels    # only the `cuda-kernels` tests and kernel benchmark
#   scripts/gpu/build-cuda.sh package    # only dist/cuda/ from what was built
#
# Steps: (1) scripts/gpu/cuda-toolkit.sh full assembles CUDA 13.0 from PyPI wheels into
# .cache/cuda (~1.6 GB unpacked: nvcc for candle's kernels, cuBLAS/cuSOLVER/cuRAND/NVRTC to
# link against); (2) a stub libcuda.so.1 is made from the driver API's symbol names (no wheel
# ships the driver; the real one is on the GPU machine); (3) `--features cuda` (candle's CUDA
# backend + the project's kernels, CUDA_COMPUTE_CAP=90 for H100/H200): the CLI and the
# end-to-end benchmark examples/cuda_e2e.rs; (4) `--features cuda-kernels` (the same kernel
# code, CUDA libraries loaded at run time, no candle kernels: small): the parity tests, the
# library tests and the kernel benchmark; (5) dist/cuda/ gets the binaries (debug info
# stripped) and scripts/gpu/gpu-check.sh.
# Target dirs: $CARGO_TARGET_DIR (or target/) for `cuda-kernels`, and
# $SOURCE_TDA_CUDA_TARGET_DIR (default "<that>-cuda") for `--features cuda` (its own RUSTFLAGS
# and candle's CUDA features would otherwise rebuild the CPU build's dependencies).
# Timing on 2 cores: see README (GPU section).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
mode="${1:-all}"
case "$mode" in all | cuda | kernels | package) ;; *)
  echo "usage: $0 [all|cuda|kernels|package]" >&2; exit 2 ;;
esac
cpu_target="${CARGO_TARGET_DIR:-$root/target}"
cuda_target="${SOURCE_TDA_CUDA_TARGET_DIR:-$cpu_target-cuda}"
kernels_tests="$cpu_target/release/cuda-kernels-tests.json"

if [ "$mode" = all ] || [ "$mode" = cuda ]; then
  libdir="$(scripts/gpu/cuda-toolkit.sh full)"
  prefix="$(dirname "$libdir")"
  # (2) stub driver library, for linking only: every `cu*` entry point cudarc declares.
  stub="$prefix/stub"
  if [ ! -e "$stub/libcuda.so" ]; then
    mkdir -p "$stub"
    cargo fetch --quiet
    sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)"
    sys="$sys/src/driver/sys/mod.rs"
    grep -o 'fn cu[A-Za-z0-9_]*(' "$sys" | sed 's/^fn \(.*\)($/\1/' | sort -u \
      | awk '{print "void " $1 "(void) {}"}' > "$stub/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/cuda_stub.c"
    ln -sf libcuda.so.1 "$stub/libcuda.so"
  fi
  # (3) nvcc on PATH for candle-kernels; cudarc's build script links from CUDA_ROOT.
  (
    export PATH="$prefix/bin:$PATH"
    export CUDA_ROOT="$prefix" CUDA_HOME="$prefix" CUDA_PATH="$prefix"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export CUDARC_CUDA_VERSION=13000
    export LIBRARY_PATH="$stub:$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stub -L native=$libdir"
    export CARGO_TARGET_DIR="$cuda_target"
    cargo build --release --features cuda --bin source-tda --example cuda_e2e
  )
fi

if [ "$mode" = all ] || [ "$mode" = kernels ]; then
  # (4) the GPU check's tests and kernel benchmark.
  cargo test --release --features cuda-kernels --no-run --lib --test it \
    --message-format=json > "$kernels_tests.tmp"
  mv "$kernels_tests.tmp" "$kernels_tests"
  cargo build --release --features cuda-kernels --example cuda_bench
fi

if [ "$mode" = all ] || [ "$mode" = package ]; then
  # (5) package.
  dist="$root/dist/cuda"
  rm -rf "$dist"; mkdir -p "$dist/tests"
  cp "$cuda_target/release/source-tda" "$cuda_target/release/examples/cuda_e2e" "$dist/"
  cp "$cpu_target/release/examples/cuda_bench" "$dist/"
  python3 - "$dist" "$kernels_tests" <<'PY'
import json, os, shutil, sys
dist, listing = sys.argv[1], sys.argv[2]
for line in open(listing):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        shutil.copy(m["executable"], os.path.join(dist, "tests", m["target"]["name"]))
PY
  cp scripts/gpu/gpu-check.sh "$dist/"
  strip --strip-debug "$dist/source-tda" "$dist/cuda_e2e" "$dist/cuda_bench" "$dist"/tests/*
  du -sh "$dist"; ls -la "$dist" "$dist/tests"
  # The transfer to the GPU machine is limited to 64 MiB: carry the compressed package
  # (scripts/gpu/gpu-check.sh unpacks it).
  tar cJf "$root/dist/cuda.tar.xz" -C "$root/dist" cuda
  ls -la "$root/dist/cuda.tar.xz"
  echo "the CUDA binary links:"
  ldd "$dist/source-tda" | grep -E 'cuda|cublas|curand|cusolver|nvrtc|cusparse|nvJit' || true
fi
