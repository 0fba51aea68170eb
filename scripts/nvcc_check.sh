#!/usr/bin/env bash
# Compile every CUDA kernel under csrc/kernels/cuda with nvcc for sm_80, sm_89 and sm_90a, without torch.
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
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xcompiler -Wall -Werror all-warnings \
      -c "$cu" -o "$out/$(basename "$cu" .cu)_sm${arch}.o"
    n=$((n + 1))
  done
  echo "nvcc_check: $(basename "$cu") ok for sm_80 sm_89 sm_90a"
done
echo "nvcc_check: $n compilations passed"
