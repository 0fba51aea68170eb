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
//   semantics (v = state[2]):
//     if v is 0 or 1, per sample b:   num_b = sum_i |probe[b,i] - stored[v,b,i]|,  den_b = sum_i |stored[v,b,i]|
//                                     d_b = num_b / den_b  if den_b > 0,  0 if num_b = den_b = 0,  +inf otherwise
//                                     (the guard: FBCache divides 0 by 0 when the probe is identically zero, gets
//                                     NaN and silently never caches)
//                                     d = max_b d_b   (a conservative decision for the whole batch: one changed
//                                                      sample recomputes; a batch-wide mean lets samples interfere)
//     else                            d = +inf (nothing to compare with)
//     r = P > 0 ? poly(d) : d         (Horner, in fp64 on the host side of the spec, fp32 in the kernels)
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
#pragma once

#include <cstdint>

namespace velodiff {

constexpr int kCacheGateAccumulate = 1;
constexpr int kCacheGateStoreAlways = 2;
constexpr int kCacheGateForceCompute = 4;
constexpr int kCacheGateMaxCoefficients = 8;
constexpr int kCacheGateStateSize = 4;

}  // namespace velodiff
