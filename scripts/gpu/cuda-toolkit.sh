#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from PyPI wheels (NVIDIA's own redistributables), with no
# system install: each wheel is fetched with `pip download --no-deps`, unpacked into one
# prefix, and the archive deleted. Idempotent (a marker file per component).
#
#   scripts/gpu/cuda-toolkit.sh nvrtc   # NVRTC only (~90 MB unpacked): enough to compile the
#                                       # project's kernels to PTX on a CPU-only machine (CI).
#   scripts/gpu/cuda-toolkit.sh full    # nvcc + headers + the libraries `--features cuda` links.
#
# Prefix: $SOURCE_TDA_CUDA_PREFIX, default .cache/cuda (git-ignored). Wheels found in
# $SOURCE_TDA_WHEEL_DIR are used instead of downloading them. Prints the prefix's library
# folder last, for LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-nvrtc}"
prefix="${SOURCE_TDA_CUDA_PREFIX:-.cache/cuda}"
mkdir -p "$prefix/.done" "$prefix/.wheels"
prefix="$(cd "$prefix" && pwd)"

# Versions of CUDA 13.0 (update 2), matching the GPU machine's CUDA 13.0 driver and runtime.
nvrtc=(nvidia-cuda-nvrtc==13.0.88)
full=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88
)
case "$mode" in
  nvrtc) wanted=("${nvrtc[@]}") ;;
  full) wanted=("${nvrtc[@]}" "${full[@]}") ;;
  *) echo "usage: $0 [nvrtc|full]" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
for spec in "${wanted[@]}"; do
  name="${spec%%==*}"
  if [ -e "$prefix/.done/$spec" ]; then continue; fi
  echo "cuda-toolkit: fetching $spec" >&2
  rm -rf "$prefix/.wheels"/*
  # A wheel already downloaded into $SOURCE_TDA_WHEEL_DIR (e.g. by an earlier `pip download`)
  # is used as is.
  local_whl="$(ls "${SOURCE_TDA_WHEEL_DIR:-/nonexistent}/${name//-/_}-${spec##*==}-"*.whl 2>/dev/null | head -1 || true)"
  if [ -n "$local_whl" ]; then
    cp "$local_whl" "$prefix/.wheels/"
  else
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$prefix/.wheels" "$spec"
  fi
  for whl in "$prefix/.wheels"/*.whl; do
    "$python" -m zipfile -e "$whl" "$prefix/.unpack"
  done
  rm -rf "$prefix/.wheels"/*
  # Wheels put the toolkit under nvidia/cu13/{bin,include,lib,nvvm}; merge into the prefix.
  src="$prefix/.unpack/nvidia/cu13"
  [ -d "$src" ] || src="$(dirname "$(find "$prefix/.unpack/nvidia" -maxdepth 2 -name lib -type d | head -1)")"
  mkdir -p "$prefix/bin" "$prefix/include" "$prefix/lib"
  cp -a "$src"/. "$prefix"/
  rm -rf "$prefix/.unpack"
  # NVRTC's ".alt" builds (another C++ ABI) are not used: keep the prefix small.
  rm -f "$prefix"/lib/*.alt.so*
  touch "$prefix/.done/$spec"
  echo "cuda-toolkit: $name ready" >&2
done
rmdir "$prefix/.wheels" 2>/dev/null || true
chmod +x "$prefix"/bin/* 2>/dev/null || true
chmod +x "$prefix"/nvvm/bin/* 2>/dev/null || true

# Unversioned names for the linker and for cudarc's dlopen candidates (libX.so first).
for lib in "$prefix"/lib/lib*.so.*; do
  [ -e "$lib" ] || continue
  base="$(basename "$lib")"; plain="${base%%.so.*}.so"
  [ -e "$prefix/lib/$plain" ] || ln -s "$base" "$prefix/lib/$plain"
done
# The lib64 name some build scripts look for.
[ -e "$prefix/lib64" ] || ln -s lib "$prefix/lib64"
echo "$prefix/lib"
