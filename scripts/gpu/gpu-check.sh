#!/usr/bin/env bash
# GPU check, run once on the GPU machine (no Rust, no network needed), from the package
# scripts/gpu/build-cuda.sh made (dist/cuda/): the `--features cuda` CLI and end-to-end
# benchmark, and the parity tests and kernel benchmark built with `cuda-kernels` (same kernel
# code, CUDA libraries loaded at run time from LD_LIBRARY_PATH).
#
#   scripts/gpu/gpu-check.sh    # from the repository root (the demo step needs assets/);
#                               # unpacks dist/cuda.tar.xz (what build-cuda.sh makes for the
#                               # transfer)
#
# Steps, each with its own time limit, all inside a total budget (default 470 s, under the
# 8 minutes the issue allows; SOURCE_TDA_GPU_CHECK_BUDGET overrides):
#   1. the CUDA binary loads (libraries found);                                   ~1 s
#   2. every kernel compiles with NVRTC for this GPU;                             ~5 s
#   3. parity: kernels vs CPU references, and fit + score of a tiny model through the
#      wired-in backend vs the CPU path (tests/it/cuda_parity.rs);               ~30 s
#   4. library tests of src/backend (the CUDA references included);              ~10 s
#   5. end-to-end: GPU-vs-CPU parity of the `--features cuda` model path, then fit and
#      score tokens/s for SmolLM2-135M and a Llama-3.2-1B shape, and the TF32/bf16 error
#      against f32 (examples/cuda_e2e.rs);                                      ~2-3 min
#   6. the demo pipeline with `[run] device = "cuda"` through the CLI, top-1 per query
#      compared with a `device = "cpu"` run of the same binary;                   ~1 min
#   7. kernel benchmark: measured cuBLAS GEMM rate and each kernel's fraction of it,
#      kernels-only fit/score tokens/s (examples/cuda_bench.rs).                  ~1 min
# Everything is written under $OUT (default ./gpu-check-out): gpu-check.log and one log per
# step. Needs: an NVIDIA driver for CUDA 13.0 (R580+), and the CUDA 13 libraries the
# binaries link (libcublas/libcublasLt.so.13, libcurand.so.10, libcusolver.so.12,
# libcusparse.so.12, libnvJitLink.so.13, libnvrtc.so.13, libcudart.so.13): found in
# /usr/local/cuda*/lib64, in a PyTorch install's nvidia/cu13/lib, or in $SOURCE_TDA_CUDA_LIBS.
# Exit status: non-zero if any step failed or was skipped for lack of time.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Run from the repository (scripts/gpu/) or from the package (dist/cuda/, beside cuda_bench).
# The transfer carries dist/cuda.tar.xz (the binaries are ~2× over 64 MiB unpacked).
if [ ! -x "$here/cuda_bench" ] && [ ! -x "$here/../../dist/cuda/cuda_bench" ] \
  && [ -f "$here/../../dist/cuda.tar.xz" ]; then
  tar xJf "$here/../../dist/cuda.tar.xz" -C "$here/../../dist"
fi
if [ -x "$here/cuda_bench" ]; then dist="$here"; else dist="$here/../../dist/cuda"; fi
dist="$(cd "$dist" && pwd)" || { echo "gpu-check: no dist/cuda (run scripts/gpu/build-cuda.sh)"; exit 2; }
root="$(cd "$dist/../.." && pwd)"
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1
budget="${SOURCE_TDA_GPU_CHECK_BUDGET:-470}"
start=$SECONDS

libs="${SOURCE_TDA_CUDA_LIBS:-}"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/*/lib \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true

missing="$(ldd "$dist/source-tda" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  echo "gpu-check: libraries not found (set SOURCE_TDA_CUDA_LIBS):"; echo "$missing"; exit 3
fi

export SOURCE_TDA_REQUIRE_GPU=1 RUST_BACKTRACE=1
status=0
step() {
  local name="$1" log="$2" limit="$3"; shift 3
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 10 ]; then
    echo "== $name: SKIPPED (total budget of $budget s spent)"; status=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit $limit s)"
  local t0=$SECONDS
  if timeout "$limit" "$@" > >(tee "$out/$log.log") 2>&1; then
    echo "== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "== $name: FAILED ($((SECONDS - t0)) s; log $out/$log.log)"; status=1
  fi
}

demo() {
  # The demo pipeline through the CLI on the CPU and on the GPU (same binary), then the
  # top-1 document and τ of each query compared (from each run's manifest).
  local cfg="$root/configs/.gpu-check-demo"
  for dev in cpu cuda; do
    sed "s/^seed = 0$/seed = 0\ndevice = \"$dev\"/" "$root/configs/demo.toml" > "$cfg-$dev.toml"
    sed "s#../configs/demo.toml#../configs/.gpu-check-demo-$dev.toml#" "$root/pipelines/demo.toml" \
      > "$root/pipelines/.gpu-check-demo-$dev.toml"
    local t0=$SECONDS
    "$dist/source-tda" run "$root/pipelines/.gpu-check-demo-$dev.toml" --run-dir "$out/demo-$dev" \
      || return 1
    echo "demo on $dev: $((SECONDS - t0)) s"
  done
  python3 - "$out/demo-cpu/manifest.json" "$out/demo-cuda/manifest.json" <<'PY'
import json, sys
def top1(path):
    def find(v):
        if isinstance(v, dict):
            if "top1" in v: return v["top1"]
            for x in v.values():
                r = find(x)
                if r is not None: return r
        if isinstance(v, list):
            for x in v:
                r = find(x)
                if r is not None: return r
    return {t["query"]: (t["top"], t["tau"]) for t in find(json.load(open(path)))}
cpu, gpu = top1(sys.argv[1]), top1(sys.argv[2])
bad = 0
for q in cpu:
    (dc, tc), (dg, tg) = cpu[q], gpu[q]
    rel = abs(tg - tc) / max(abs(tc), 1e-30)
    ok = dc == dg and rel <= 2e-3
    bad += not ok
    print(f"{q}: cpu {dc} tau {tc:.6e} | cuda {dg} tau {tg:.6e} | rel {rel:.1e} {'ok' if ok else 'DIFFERS'}")
sys.exit(1 if bad else 0)
PY
}

step "the --features cuda binary loads" version 20 "$dist/source-tda" --version
step "PTX compilation (NVRTC)" ptx 40 "$dist/tests/it" cuda_ptx:: --test-threads 1
step "parity: kernels and the wired-in fit + score vs the CPU" parity 150 \
  "$dist/tests/it" cuda_parity:: --test-threads 1 --nocapture
step "library tests of src/backend (incl. the CUDA references)" lib 40 \
  "$dist/tests/source_tda" backend:: --test-threads 1
step "end-to-end fit + score on the GPU (SmolLM2-135M, Llama-1B shape)" e2e 180 "$dist/cuda_e2e"
export -f demo
export root dist out
step "demo pipeline with device = cuda vs cpu (CLI)" demo 120 bash -c demo
step "kernel benchmark" bench 100 "$dist/cuda_bench"
echo "== gpu-check: $([ $status = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - start)) s; logs in $out"
exit $status
