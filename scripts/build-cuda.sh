#!/usr/bin/env bash
# Builds the CUDA binary (`--features cuda`: candle's CUDA backend + the project's kernels)
# on a machine with no GPU and no system CUDA, and packages what the GPU machine needs.
#
#   scripts/build-cuda.sh            # toolkit (PyPI wheels) + release build + dist/cuda/
#
# Steps: (1) scripts/cuda-toolkit.sh full assembles CUDA 13.0 into .cache/cuda (~1.6 GB
# unpacked: nvcc for candle's kernels, cuBLAS/cuSOLVER/cuRAND/NVRTC to link against);
# (2) a stub libcuda.so.1 is made from the driver API's symbol names (no wheel ships the
# driver; the real one is on the GPU machine); (3) `cargo build --release --features cuda`
# with CUDA_COMPUTE_CAP=90 (H100/H200), and the GPU check's test and benchmark binaries;
# (4) dist/cuda/ gets the binaries and scripts/gpu-check.sh.
# Target dirs: the CPU one ($CARGO_TARGET_DIR or target/) for the `cuda-kernels` test and
# benchmark binaries, and "<that>-cuda" for `--features cuda` (its own RUSTFLAGS would
# otherwise rebuild the CPU build's dependencies). ~8+ min on 2 cores (candle's CUDA kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
libdir="$(scripts/cuda-toolkit.sh full)"
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

# (3) build. nvcc on PATH for candle-kernels; cudarc's build script links from CUDA_ROOT.
# The GPU check's binaries (parity tests, benchmark) are built with `cuda-kernels` instead:
# the same kernel code, CUDA libraries loaded at run time, and without candle's embedded
# kernels they are small enough to carry to the GPU machine.
cpu_target="${CARGO_TARGET_DIR:-$root/target}"
kernels_json="$(cargo test --release --features cuda-kernels --no-run --lib \
  --test cuda_parity --test cuda_ptx --message-format=json)"
cargo build --release --features cuda-kernels --example cuda_bench
(
  export PATH="$prefix/bin:$PATH"
  export CUDA_ROOT="$prefix" CUDA_HOME="$prefix" CUDA_PATH="$prefix"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export CUDARC_CUDA_VERSION=13000
  export LIBRARY_PATH="$stub:$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stub -L native=$libdir"
  export CARGO_TARGET_DIR="$cpu_target-cuda"
  cargo build --release --features cuda --bin source-tda
)

# (4) package.
dist="$root/dist/cuda"
rm -rf "$dist"; mkdir -p "$dist/tests"
cp "$cpu_target-cuda/release/source-tda" "$dist/"
cp "$cpu_target/release/examples/cuda_bench" "$dist/"
echo "$kernels_json" | python3 -c '
import json,sys,shutil,os
dist=sys.argv[1]
for line in sys.stdin:
    try: m=json.loads(line)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        shutil.copy(m["executable"], os.path.join(dist,"tests",m["target"]["name"]))
' "$dist"
cp scripts/gpu-check.sh "$dist/"
strip --strip-debug "$dist/source-tda" "$dist/cuda_bench" "$dist"/tests/* 2>/dev/null || true
du -sh "$dist"; ls -la "$dist" "$dist/tests"
echo "the CUDA binary links:"
ldd "$dist/source-tda" | grep -E 'cuda|cublas|curand|cusolver|nvrtc|cusparse|nvJit' || true
