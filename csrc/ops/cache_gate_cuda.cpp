// CUDA implementation of velodiff::cache_gate (torch glue over csrc/kernels/cuda/cache_gate.cu). No host sync:
// the state is read on the device and the workspace comes from torch's caching allocator, so the op can be
// captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cache_gate_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor cache_gate_cuda_op(const at::Tensor& probe, const at::Tensor& stored, const at::Tensor& state,
                              double threshold, at::ArrayRef<double> coefficients, int64_t flags) {
  const c10::cuda::CUDAGuard guard(probe.device());
  at::Tensor decision;
  const CacheGateArgs a = prepare_cache_gate(probe, stored, state, threshold, coefficients, flags, decision);
  at::Tensor workspace = at::empty({cache_gate_cuda_workspace_doubles(a.batch, a.per_sample)},
                                   probe.options().dtype(at::kDouble));
  const int err = cache_gate_cuda(a, workspace.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "cache_gate: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return decision;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) { m.impl("cache_gate", &cache_gate_cuda_op); }

}  // namespace velodiff
