#!/usr/bin/env bash
# The GPU check in one call (about ten minutes on a bare CUDA machine with torch, nvcc, pybind11 and
# scikit-build-core, no network): build for the local GPU only, run the `cuda` tests, run them again under
# compute-sanitizer (memcheck), run the microbenchmarks. Everything it finds goes to OUTDIR; commit the
# results under bench/results/ with the GPU's name.
#   usage: bash bench/gpu_suite.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0
step() {  # step NAME CMD...: run, log to OUTDIR/NAME.log, remember failures
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then echo "== $name: ok ($((SECONDS - t0)) s)"; else
    echo "== $name: FAILED ($((SECONDS - t0)) s)"; status=1; fi
  tail -n 15 "$out/$name.log"
}
# Pure-Python baselines missing on the machine (diffusers) can travel as wheels in .whl/ (see the device notes).
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --target /tmp/velodiff-site .whl/*.whl && export PYTHONPATH=/tmp/velodiff-site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.txt"
arch=$($py -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M >= 9 else ''))")
export VELODIFF_CUDA_ARCHS=${VELODIFF_CUDA_ARCHS:-$arch}
echo "building for sm_$VELODIFF_CUDA_ARCHS"
step build $py -m pip install --no-build-isolation --no-deps -v .
$py -m velodiff.cli info --json | tee "$out/info.json"
step cuda_tests $py -m pytest -q -p no:cacheprovider -m cuda tests/ops tests/quant
step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 \
  $py -m pytest -q -p no:cacheprovider -m cuda tests/ops \
  -k "matches_reference or guidance_rescale or optional or (qgemm_shapes and float16) or zero_group or (tensor_paths and float16) or cta_tiles"
step bench_sampler_update $py bench/bench_sampler_update.py --device cuda --out "$out"
step bench_sampling_loop $py bench/bench_sampling_loop.py --device cuda --out "$out"
step bench_qgemm_cuda $py bench/bench_qgemm_cuda.py --out "$out"
echo "gpu_suite: $([ $status -eq 0 ] && echo all steps passed || echo some steps FAILED)"
exit $status
