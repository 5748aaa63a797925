#!/usr/bin/env bash
# GPU check, run on the GPU machine (no Rust, no network needed): the kernel parity tests
# and the kernel benchmark, from the package scripts/build-cuda.sh made (dist/cuda/): the
# `--features cuda` CLI, and the tests and benchmark built with `cuda-kernels` (same kernel
# code, CUDA libraries loaded at run time from LD_LIBRARY_PATH).
#
#   dist/cuda/gpu-check.sh            # or scripts/gpu-check.sh from the repository root
#
# Needs: an NVIDIA driver for CUDA 13.0 (R580+), and the CUDA 13 libraries the binaries link
# (libcublas/libcublasLt.so.13, libcurand.so.10, libcusolver.so.12, libcusparse.so.12,
# libnvJitLink.so.13, libnvrtc.so.13, libcudart.so.13): found in /usr/local/cuda*/lib64, in a
# PyTorch install's nvidia/cu13/lib, or in $SOURCE_TDA_CUDA_LIBS. Finishes in under 8 min on
# one H200 (each step has its own timeout). Exit status: non-zero if any step failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$here/cuda_bench" ]; then dist="$here"; else dist="$here/../dist/cuda"; fi
dist="$(cd "$dist" && pwd)" || { echo "gpu-check: no dist/cuda (run scripts/build-cuda.sh)"; exit 2; }

libs="${SOURCE_TDA_CUDA_LIBS:-}"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

status=0
missing="$(ldd "$dist/source-tda" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  echo "gpu-check: libraries not found (set SOURCE_TDA_CUDA_LIBS):"; echo "$missing"; exit 3
fi

export SOURCE_TDA_REQUIRE_GPU=1 RUST_BACKTRACE=1
step() {
  local name="$1" limit="$2"; shift 2
  echo "== $name"
  local t0=$SECONDS
  if timeout "$limit" "$@"; then echo "== $name: ok ($((SECONDS - t0)) s)"
  else echo "== $name: FAILED ($((SECONDS - t0)) s)"; status=1; fi
}
step "the --features cuda binary loads" 30 "$dist/source-tda" --version
step "PTX compilation (NVRTC)" 60 "$dist/tests/cuda_ptx" --test-threads 1
step "parity: kernels vs CPU references" 180 "$dist/tests/cuda_parity" --test-threads 1 --nocapture
step "library tests of src/cuda" 60 "$dist/tests/source_tda" cuda:: --test-threads 1
step "benchmark" 240 "$dist/cuda_bench"
echo "== gpu-check: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
