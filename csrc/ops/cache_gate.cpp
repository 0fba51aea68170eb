// CPU implementation of velodiff::cache_gate (torch glue over csrc/kernels/cpu/cache_gate.cpp).
#include "cache_gate_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor cache_gate_cpu_op(const at::Tensor& probe, const at::Tensor& stored, const at::Tensor& state,
                             double threshold, at::ArrayRef<double> coefficients, int64_t flags) {
  at::Tensor decision;
  const CacheGateArgs a = prepare_cache_gate(probe, stored, state, threshold, coefficients, flags, decision);
  char error[256] = {0};
  TORCH_CHECK(cache_gate_cpu(a, error), error);
  return decision;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) { m.impl("cache_gate", &cache_gate_cpu_op); }

}  // namespace velodiff
