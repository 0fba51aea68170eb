// velodiff cache gate: the one format shared by the reference (python/velodiff/ops/reference.py cache_gate), the
// CPU kernel (csrc/kernels/cpu/cache_gate.cpp) and the CUDA kernel (csrc/kernels/cuda/cache_gate.cu).
//
// A cache decides, once per denoising step, whether the expensive part of the denoiser runs ("compute") or its
// stored result is reused. DiT caches compare a cheap *probe* of the current step with the probe of an earlier
// step: FBCache the first block's residual, TeaCache the timestep-modulated input of block 0, DBCache the
// residual of the first Fn blocks. One call of the op makes that decision on the device, in one pass over the
// probe, so the host reads at most one flag per step and the loop never copies the probe to the host.
//
//   inputs (contiguous; B = batch, S = per-sample numel)
//     probe    [B, S]       fp32 | fp16 | bf16     the current step's probe
//     stored   [2, B, S]    probe's dtype, read and written: two probe buffers. The valid one (state[2]) is the
//                                                  reference; the other is overwritten with `probe` in the same
//                                                  pass (so no second pass is needed when the decision says the
//                                                  new probe becomes the reference)
//     state    [4]          fp32, on probe's device, read and written:
//                             [0] accumulator (TeaCache's accumulated rescaled distance)
//                             [1] the distance of this call (max over samples; +inf when there was no reference)
//                             [2] index of the valid buffer of `stored`: -1 none yet, 0 or 1
//                             [3] this call's decision: 1 compute, 0 reuse
//     threshold            float >= 0
//     coefficients [P]     float (host), polynomial rescale, highest degree first (numpy.poly1d order), P <= 8;
//                          P = 0 means no rescale (r = d)
//     flags                int: ACCUMULATE (1), STORE_ALWAYS (2), FORCE_COMPUTE (4)
//
//   semantics (v = state[2]; it counts as valid only when exactly 0 or 1: any other value, NaN included, means
//   "no reference yet", like -1):
//     if v is 0 or 1, per sample b:   num_b = sum_i |probe[b,i] - stored[v,b,i]|,  den_b = sum_i |stored[v,b,i]|
//                                     d_b = num_b / den_b  if den_b > 0,  0 if num_b = den_b = 0,  +inf otherwise
//                                     (the guard: FBCache divides 0 by 0 when the probe is identically zero, gets
//                                     NaN and silently never caches)
//                                     d = max_b d_b   (a conservative decision for the whole batch: one changed
//                                                      sample recomputes; a batch-wide mean lets samples interfere)
//     else                            d = +inf (nothing to compare with)
//     r = P > 0 ? poly(d) : d         (Horner from r = 0: r = r * d + c_k for every k, so a degree-0 polynomial
//                                      of d = inf gives NaN; in fp64 in the reference and in the kernels)
//     ACCUMULATE:   a = state[0] + r;  compute = !(a < threshold)
//     otherwise:    compute = !(r < threshold)        (a NaN distance computes)
//     compute |= FORCE_COMPUTE || v invalid
//     state[0] = ACCUMULATE && !compute ? a : 0
//     state[1] = d
//     w = (v is 0 or 1) ? 1 - v : 0;   stored[w] = probe      (always: the spare buffer)
//     state[2] = (compute || STORE_ALWAYS) ? w : v           (FBCache keeps the probe of the last computed step;
//                                                              TeaCache compares consecutive steps: STORE_ALWAYS)
//     state[3] = compute;  the op returns compute as int32 [1]
//
//   The sums are accumulated in fp32 or wider; the distance of the kernels matches the reference's float64 value
//   to a relative 1e-5 (fp32 inputs). A decision can differ only when the distance is that close to the threshold.
//   threshold 0 (without FORCE) computes every step whatever the distance, so a cache at threshold 0 is exact.
//   Both kernels accumulate |p - s| and |s| in fp64 (each value converted exactly) over a fixed split of each
//   sample into chunks, then add the chunks' sums in a fixed order: the result does not depend on the number of
//   threads, and d is as close to the reference as fp64 rounding allows (state[1] then rounds it to fp32).
//   d, the polynomial, the accumulation and the comparison are computed in fp64 by every implementation.
#pragma once

#include <cstdint>

#include "velodiff/float16.h"  // VELODIFF_HD

namespace velodiff {

constexpr int kCacheGateAccumulate = 1;
constexpr int kCacheGateStoreAlways = 2;
constexpr int kCacheGateForceCompute = 4;
constexpr int kCacheGateAllFlags = kCacheGateAccumulate | kCacheGateStoreAlways | kCacheGateForceCompute;
constexpr int kCacheGateMaxCoefficients = 8;
constexpr int kCacheGateStateSize = 4;
enum CacheGateState : int { kGateAccumulator = 0, kGateDistance = 1, kGateValid = 2, kGateDecision = 3 };

// Probe storage types the kernels accept.
enum class GateDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raw pointers and sizes of one call. Torch-free on purpose; passed by value to the CUDA finalize kernel.
struct CacheGateArgs {
  const void* probe = nullptr;  // [B, S]
  void* stored = nullptr;       // [2, B, S], probe's dtype
  float* state = nullptr;       // [4], on probe's device
  int32_t* decision = nullptr;  // [1], on probe's device: the op's output
  GateDType dtype = GateDType::kFloat32;
  int64_t batch = 0;       // B
  int64_t per_sample = 0;  // S
  double threshold = 0.0;
  double coefficients[kCacheGateMaxCoefficients] = {};  // highest degree first
  int num_coefficients = 0;                             // P
  int flags = 0;
};

// fp32 <-> fp64 conversions that keep subnormals also in device code built with --use_fast_math (-ftz), where a
// plain cast may compile to cvt.ftz and read or write a subnormal as zero.
VELODIFF_HD double cache_gate_f64(float x) {
#if defined(__CUDA_ARCH__)
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
#else
  return static_cast<double>(x);
#endif
}
VELODIFF_HD float cache_gate_f32(double x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
  return r;
#else
  return static_cast<float>(x);
#endif
}

// The valid buffer index encoded in state[2]: 0 or 1, else -1 (none).
VELODIFF_HD int cache_gate_valid_index(float v) { return v == 0.f ? 0 : (v == 1.f ? 1 : -1); }

// d_b from one sample's sums, with the 0/0 guard (same selects as the reference's torch.where).
VELODIFF_HD double cache_gate_sample_distance(double num, double den) {
  return den > 0.0 ? num / den : (num == 0.0 ? 0.0 : __builtin_huge_val());
}

// max over samples as torch.max does it: a NaN anywhere gives NaN.
VELODIFF_HD double cache_gate_max(double d, double d_b) {
  if (d != d) return d;
  return (d_b != d_b || d_b > d) ? d_b : d;
}

// Everything after the distance: the rescale, the accumulation, the decision; writes state[0..3] and returns
// the decision (1 compute, 0 reuse). `v` is the valid index read before the call (cache_gate_valid_index).
VELODIFF_HD int cache_gate_finish(const CacheGateArgs& a, int v, double d) {
  double r = d;
  if (a.num_coefficients > 0) {
    r = 0.0;
    for (int k = 0; k < a.num_coefficients; ++k) {
#if defined(__CUDA_ARCH__)
      r = __dadd_rn(__dmul_rn(r, d), a.coefficients[k]);  // two roundings, as the reference: no fma contraction
#else
      r = r * d + a.coefficients[k];
#endif
    }
  }
  const bool accumulate = (a.flags & kCacheGateAccumulate) != 0;
  const double acc = accumulate ? cache_gate_f64(a.state[kGateAccumulator]) + r : r;
  const bool compute = !(acc < a.threshold) || (a.flags & kCacheGateForceCompute) != 0 || v < 0;
  const int w = v >= 0 ? 1 - v : 0;
  a.state[kGateAccumulator] = accumulate && !compute ? cache_gate_f32(acc) : 0.f;
  a.state[kGateDistance] = cache_gate_f32(d);
  a.state[kGateValid] = static_cast<float>((compute || (a.flags & kCacheGateStoreAlways) != 0) ? w : v);
  a.state[kGateDecision] = compute ? 1.f : 0.f;
  *a.decision = compute ? 1 : 0;
  return compute ? 1 : 0;
}

// CUDA partial-sum layout: each sample is split into cache_gate_cuda_blocks(S) blocks whose (num, den) sums land
// in a workspace of 2 * B * blocks doubles (allocated by the caller, e.g. with torch's allocator, so that the op
// can be captured in a CUDA graph); the finalize kernel adds them in block order.
constexpr int kCacheGateCudaThreads = 256;
constexpr int kCacheGateCudaUnroll = 4;
constexpr int64_t kCacheGateCudaTile = kCacheGateCudaThreads * kCacheGateCudaUnroll;
constexpr int64_t kCacheGateCudaMaxBlocks = 1024;  // per sample
inline int64_t cache_gate_cuda_blocks(int64_t per_sample) {
  const int64_t tiles = (per_sample + kCacheGateCudaTile - 1) / kCacheGateCudaTile;
  return tiles < 1 ? 1 : (tiles < kCacheGateCudaMaxBlocks ? tiles : kCacheGateCudaMaxBlocks);
}
inline int64_t cache_gate_cuda_workspace_doubles(int64_t batch, int64_t per_sample) {
  return 2 * batch * cache_gate_cuda_blocks(per_sample);
}

}  // namespace velodiff
