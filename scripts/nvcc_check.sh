#!/usr/bin/env bash
# Compile every CUDA kernel under csrc/kernels/cuda with nvcc for sm_80, sm_89 and sm_90a, without torch, link
# each architecture's objects into one shared library (as the build does: whole-program device code, -rdc=false),
# then syntax-check their torch glue (csrc/ops/*_cuda.cpp) against the installed torch's headers.
# Kernels include no torch header (blueprint rule 2), so this runs on a machine whose torch is CPU-only.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for cu in $(find "$here/csrc/kernels/cuda" -name '*.cu' | sort); do
  for arch in 80 89 90a; do
    "$nvcc" -std=c++17 -O2 -DVELODIFF_WITH_CUDA -I"$here/csrc/include" \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xcompiler -Wall -Xcompiler -fPIC -Werror all-warnings \
      -c "$cu" -o "$out/$(basename "$cu" .cu)_sm${arch}.o"
    n=$((n + 1))
  done
  echo "nvcc_check: $(basename "$cu") ok for sm_80 sm_89 sm_90a"
done
echo "nvcc_check: $n compilations passed"

# The kernel files share headers of templates and inline functions and export one launcher each (the quantized
# GEMM family is split by kernel: csrc/kernels/cuda/qgemm_device.cuh): linking one architecture's objects with
# --no-undefined fails on a symbol defined twice or declared and never defined.
for arch in 80 89 90a; do
  "$nvcc" -shared -gencode "arch=compute_${arch},code=sm_${arch}" "$out"/*_sm${arch}.o -Xlinker --no-undefined \
    -o "$out/kernels_sm${arch}.so"
done
echo "nvcc_check: the objects of each architecture link into one shared library"

# The torch glue of the CUDA kernels (csrc/ops/*_cuda.cpp) includes torch's CUDA headers, which a CPU torch
# ships too: a syntax-only compile against them catches glue errors without a CUDA torch. The one generated
# header a CPU wheel lacks (c10/cuda/impl/cuda_cmake_macros.h) is stubbed empty.
py=${PYTHON:-python}
if tinc=$("$py" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
  cuinc=""
  for d in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$(command -v "$nvcc")")")/../include" /usr/local/cuda/include /usr/local/cuda-*/include; do
    if [ -f "$d/cuda_runtime_api.h" ]; then cuinc=$d; break; fi
  done
  if [ -z "$cuinc" ]; then
    echo "nvcc_check: cuda_runtime_api.h not found (set CUDA_HOME); skipping the glue check"
    exit 0
  fi
  pyinc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  mkdir -p "$out/stub/c10/cuda/impl" && : >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for cpp in "$here"/csrc/ops/*_cuda.cpp; do
    "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Werror -DVELODIFF_WITH_CUDA -DUSE_CUDA -isystem "$out/stub" \
      -isystem "$tinc" -isystem "$tinc/torch/csrc/api/include" -isystem "$cuinc" -isystem "$pyinc" \
      -I"$here/csrc/include" -I"$here/csrc" "$cpp"
    echo "nvcc_check: $(basename "$cpp") (torch glue) compiles"
  done
else
  echo "nvcc_check: no importable torch; skipping the glue check"
fi
