// Torch glue shared by the CPU and CUDA implementations of velodiff::cache_gate: checks every argument (naming it
// in the error: TypeError for a wrong dtype, ValueError otherwise) and fills the torch-free CacheGateArgs.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>

#include "velodiff/cache_gate.h"

namespace velodiff {

inline GateDType gate_dtype_of(const at::Tensor& probe) {
  switch (probe.scalar_type()) {
    case at::kFloat: return GateDType::kFloat32;
    case at::kHalf: return GateDType::kFloat16;
    case at::kBFloat16: return GateDType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "cache_gate: probe must be float32, float16 or bfloat16, got ",
                              probe.scalar_type());
  }
  return GateDType::kFloat32;
}

// Checks all arguments, allocates the decision (int32 [1] on probe's device) and returns the filled struct.
inline CacheGateArgs prepare_cache_gate(const at::Tensor& probe, const at::Tensor& stored, const at::Tensor& state,
                                        double threshold, at::ArrayRef<double> coefficients, int64_t flags,
                                        at::Tensor& decision) {
  const GateDType dtype = gate_dtype_of(probe);
  TORCH_CHECK_VALUE(probe.dim() >= 1 && probe.size(0) >= 1 && probe.numel() > 0,
                    "cache_gate: probe must be [B, ...] with B >= 1 and elements, got shape ", probe.sizes());
  TORCH_CHECK_VALUE(probe.is_contiguous(), "cache_gate: probe must be contiguous");
  TORCH_CHECK_TYPE(stored.scalar_type() == probe.scalar_type(), "cache_gate: stored must have probe's dtype ",
                   probe.scalar_type(), ", got ", stored.scalar_type());
  TORCH_CHECK_VALUE(stored.dim() == probe.dim() + 1 && stored.size(0) == 2 && stored.sizes().slice(1) == probe.sizes(),
                    "cache_gate: stored must have shape [2, *probe.shape] = [2, ", probe.sizes(), "], got ",
                    stored.sizes());
  TORCH_CHECK_VALUE(stored.device() == probe.device(), "cache_gate: stored is on ", stored.device(),
                    " but probe is on ", probe.device());
  TORCH_CHECK_VALUE(stored.is_contiguous(), "cache_gate: stored must be contiguous");
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat, "cache_gate: state must be float32, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.dim() == 1 && state.size(0) == kCacheGateStateSize, "cache_gate: state must have shape [",
                    kCacheGateStateSize, "], got ", state.sizes());
  TORCH_CHECK_VALUE(state.device() == probe.device(), "cache_gate: state is on ", state.device(),
                    " but probe is on ", probe.device());
  TORCH_CHECK_VALUE(state.is_contiguous(), "cache_gate: state must be contiguous");
  TORCH_CHECK_VALUE(at::get_overlap_status(stored, probe) == at::MemOverlapStatus::No,
                    "cache_gate: stored must not share memory with probe (stored is written)");
  TORCH_CHECK_VALUE(at::get_overlap_status(state, probe) == at::MemOverlapStatus::No &&
                        at::get_overlap_status(state, stored) == at::MemOverlapStatus::No,
                    "cache_gate: state must not share memory with probe or stored (state is written)");
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    "cache_gate: threshold must be a finite number >= 0, got ", threshold);
  TORCH_CHECK_VALUE(static_cast<int64_t>(coefficients.size()) <= kCacheGateMaxCoefficients,
                    "cache_gate: coefficients must be at most ", kCacheGateMaxCoefficients, " numbers, got ",
                    coefficients.size());
  for (double c : coefficients)
    TORCH_CHECK_VALUE(std::isfinite(c), "cache_gate: coefficients must be finite, got ", coefficients);
  TORCH_CHECK_VALUE(flags >= 0 && (flags & ~static_cast<int64_t>(kCacheGateAllFlags)) == 0,
                    "cache_gate: flags must be made of ACCUMULATE (1), STORE_ALWAYS (2), FORCE_COMPUTE (4), got ",
                    flags);

  decision = at::empty({1}, probe.options().dtype(at::kInt));
  CacheGateArgs a;
  a.probe = probe.data_ptr();
  a.stored = stored.data_ptr();
  a.state = state.data_ptr<float>();
  a.decision = decision.data_ptr<int32_t>();
  a.dtype = dtype;
  a.batch = probe.size(0);
  a.per_sample = probe.numel() / probe.size(0);
  a.threshold = threshold;
  a.num_coefficients = static_cast<int>(coefficients.size());
  for (size_t k = 0; k < coefficients.size(); ++k) a.coefficients[k] = coefficients[k];
  a.flags = static_cast<int>(flags);
  return a;
}

}  // namespace velodiff
