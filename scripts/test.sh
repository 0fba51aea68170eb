#!/usr/bin/env bash
# The test command: a clean virtual environment, torch and the test dependencies, the nvcc compile check of
# every CUDA kernel, a build of velodiff against that torch, then pytest. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VELODIFF_TEST_VENV:-.venv-test}
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0 pybind11 scikit-build-core numpy
python -m pip install -q pytest hypothesis diffusers transformers scikit-learn scipy safetensors tqdm pillow peft \
  fastapi uvicorn httpx "ray[serve]"
if command -v nvcc >/dev/null 2>&1; then
  bash scripts/nvcc_check.sh
elif [ "${CI:-}" = "true" ]; then
  echo "test.sh: nvcc not found; CI must compile-check the CUDA kernels" >&2
  exit 1
else
  echo "test.sh: nvcc not found, skipping the CUDA compile check"
fi
python -m pip install -q --no-build-isolation .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing downloads, in tests either
python -m pytest -q -p no:cacheprovider "$@"
