#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the pure-Python wheels that bench/gpu_suite.sh needs and the device image lacks
# (diffusers and its one missing dependency, for the sampler tests and benchmarks' diffusers baselines), into
# .whl/ (git-ignored). Carry .whl with the device call; gpu_suite.sh installs them. Costs no device time.
#   usage: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dv=$($py -c "import importlib.metadata as m; print(m.version('diffusers'))" 2>/dev/null || echo 0.42.1)
mkdir -p .whl
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==$dv" importlib_metadata
ls -la .whl
