#!/usr/bin/env bash
# The GPU check in one call, sized for a short lease: build for the local GPU only, count the tensor-core
# instructions per kernel in the SASS (bench/sass_summary.sh), run the `cuda` tests, the CUDA GEMM benchmarks
# (qgemm, then fp8_gemm against cuBLASLt FP8), the `cuda` tests again under compute-sanitizer (memcheck), then the
# sampler benchmarks and the cache-gate benchmark (the cache_gate `cuda` tests run with tests/ops).
# Steps run in that order (most valuable first), each under its own time cap, and the whole suite stops
# starting steps once BUDGET seconds (default 500) have passed, so that it returns inside a 10-minute command
# limit with whatever it finished. Everything it finds goes to OUTDIR; with ARCHIVE given, OUTDIR is packed
# into that one .tar.gz after every step (a device machine returns only a few files, and nothing if the
# command is killed before it packs). Commit the results under bench/results/ with the GPU's name.
#   usage: bash bench/gpu_suite.sh OUTDIR [ARCHIVE.tar.gz]     (env BUDGET=seconds, PYTHON=python3)
# Pure-Python packages missing on the machine (diffusers) travel as wheels in .whl/: bash bench/gpu_wheels.sh
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUTDIR [ARCHIVE.tar.gz]}
archive=${2:-}
budget=${BUDGET:-500}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0
summary="$out/summary.txt"
: >"$summary"
pack() {
  [ -n "$archive" ] && tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")" 2>/dev/null
  return 0
}
step() {  # step NAME CAP_SECONDS CMD...: run under min(CAP, what is left of BUDGET), log to OUTDIR/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: SKIPPED (budget of $budget s spent)" | tee -a "$summary"; status=1; return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap $cap s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$cap" "$@" >"$out/$name.log" 2>&1 || rc=$?
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; status=1
  elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; status=1; fi
  echo "== $name: $verdict ($((SECONDS - t0)) s)" | tee -a "$summary"
  tail -n 12 "$out/$name.log"
  pack
}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/velodiff-site .whl/*.whl \
    && export PYTHONPATH=/tmp/velodiff-site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm --format=csv \
  | tee "$out/gpu.txt"
if [ -z "${VELODIFF_CUDA_ARCHS:-}" ]; then
  VELODIFF_CUDA_ARCHS=$($py -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M >= 9 else ''))")
fi
export VELODIFF_CUDA_ARCHS
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "building for sm_$VELODIFF_CUDA_ARCHS with $CMAKE_BUILD_PARALLEL_LEVEL jobs; budget $budget s"
step build 240 $py -m pip install --no-build-isolation --no-deps -v .
$py -m velodiff.cli info --json >"$out/info.json" 2>&1
cat "$out/info.json"
step sass 30 bash bench/sass_summary.sh
step cuda_tests 150 $py -m pytest -q -p no:cacheprovider -m cuda tests/ops tests/quant tests/sampling
step bench_qgemm_cuda 150 $py bench/bench_qgemm_cuda.py --out "$out"
step bench_fp8_cuda 60 $py bench/bench_fp8_cuda.py --quick --out "$out"
step sanitizer 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
  $py -m pytest -q -p no:cacheprovider -m cuda tests/ops \
  -k "matches_reference or guidance_rescale or optional or (qgemm_shapes and float16) or zero_group or (tensor_paths and float16) or cta_tiles or (bit_identical and float16) or (every_element_counts and bf16) or large_grids or cuda_graph_capture or (awkward_head_dims and fp16) or w4_gemm_matches or masks_and_fully_masked"
step bench_sampler_update 60 $py bench/bench_sampler_update.py --device cuda --out "$out"
step bench_sampling_loop 60 $py bench/bench_sampling_loop.py --device cuda --out "$out"
step bench_cache_gate 40 $py bench/bench_cache_gate.py --device cuda --rounds 5 --out "$out"
step bench_attention 60 $py bench/bench_attention.py --device cuda --rounds 5 --out "$out"
step bench_stream 90 $py bench/bench_stream.py --part speed --device cuda --rounds 3 --out "$out"
echo "gpu_suite: $([ $status -eq 0 ] && echo all steps passed || echo some steps FAILED or were skipped) in $SECONDS s" \
  | tee -a "$summary"
pack
exit $status
