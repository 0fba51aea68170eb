// Device building blocks shared by the CUDA attention kernels:
//   attention.cu          velodiff::attention: a block per (b, h, 8 queries), every key of (b, h) (key-padding mask)
//   window_attention.cu   velodiff::window_attention: a block per (b, h, window, 8 queries), the window's keys
// Both run flash_block below, which differs between them only in the key list: a `Keys` type giving the count,
// the token of the j-th key and whether it is attended. Semantics: csrc/include/velodiff/attention.h (online
// softmax) and csrc/include/velodiff/window_attention.h. Torch-free; everything here is a template, inline or
// constexpr, so the objects link without duplicate symbols.
//
// flash_block (simple first version, correct before fast; not yet run or timed on a GPU): a block of 8 warps, one
// warp per query. The block walks the keys in tiles of attention_cuda_key_tile(D, Dv) (32, or 16 for D + Dv >
// 512): it stages the tile's K (rows padded to D + 1 floats: conflict-free column reads) and V as fp32 in dynamic
// shared memory, reading k and v through their strides at the keys' tokens; then in each warp lane j takes key j
// of the tile (its base-2 logit, an fp32 fma chain over D against the warp's pre-scaled query row in shared
// memory, -inf when not attended), the warp reduces the tile's max and sum with shuffles (online softmax), and
// lane c accumulates output channels c, c + 32, ... (at most 16 per lane, Dv <= 512) in registers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_io.cuh"
#include "velodiff/attention.h"

namespace velodiff {
namespace attention_device {

constexpr int kWarps = kAttentionCudaWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxChannelsPerLane = static_cast<int>(kAttentionMaxHeadDim / 32);

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One (b, h) of a block: warp w computes the query at token `query` of q / out (-1: this warp has none; it still
// joins the block's barriers) against keys.count keys, key j at token keys.token(j) of k / v, attended when
// keys.kept(j). `smem`: attention_cuda_smem_bytes(D, Dv) bytes of dynamic shared memory. Every thread of the block
// must call it with the same (b, h) and keys. The caller puts a __syncthreads() between two calls.
template <AttnDType DT, class Keys>
__device__ __forceinline__ void flash_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t query,
                                            const Keys& keys, int tile, float* smem) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, Lk = keys.count;
  const int64_t kpitch = D + 1;
  float* sk = smem;                          // [tile, D + 1]
  float* sv = sk + tile * kpitch;            // [tile, Dv]
  float* sq = sv + tile * Dv;                // [kWarps, D]
  float* sp = sq + kWarps * D;               // [kWarps, 32]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float neg_inf = -__int_as_float(0x7f800000);
  const bool active = query >= 0;
  const float qscale = a.scale * kAttentionLog2e;
  if (active) {
    const int64_t qrow = b * a.q_stride[0] + h * a.q_stride[1] + query * a.q_stride[2];
    for (int64_t d = lane; d < D; d += 32) sq[warp * D + d] = load_f<DT>(a.q, qrow + d * a.q_stride[3]) * qscale;
  }
  float acc[kMaxChannelsPerLane];
#pragma unroll
  for (int t = 0; t < kMaxChannelsPerLane; ++t) acc[t] = 0.f;
  float m = neg_inf, l = 0.f;
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  for (int64_t t0 = 0; t0 < Lk; t0 += tile) {
    const int n = static_cast<int>(Lk - t0 < tile ? Lk - t0 : tile);
    __syncthreads();  // the previous tile (and, on the first, the query rows) are no longer being read
    for (int64_t e = threadIdx.x; e < n * D; e += kThreads) {
      const int64_t j = e / D, d = e % D;
      sk[j * kpitch + d] = load_f<DT>(a.k, kbase + keys.token(t0 + j) * a.k_stride[2] + d * a.k_stride[3]);
    }
    for (int64_t e = threadIdx.x; e < n * Dv; e += kThreads) {
      const int64_t j = e / Dv, c = e % Dv;
      sv[j * Dv + c] = load_f<DT>(a.v, vbase + keys.token(t0 + j) * a.v_stride[2] + c * a.v_stride[3]);
    }
    __syncthreads();
    if (!active) continue;
    float t = neg_inf;
    if (lane < n && keys.kept(t0 + lane)) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s = fmaf(sq[warp * D + d], sk[lane * kpitch + d], s);
      t = s;
    }
    const float m_new = fmaxf(m, warp_max(t));
    if (m_new == neg_inf) continue;  // every key so far masked (warp-uniform)
    const float alpha = m == neg_inf ? 0.f : exp2f(m - m_new);
    const float p = t == neg_inf ? 0.f : exp2f(t - m_new);
    l = l * alpha + warp_sum(p);
    m = m_new;
    sp[warp * 32 + lane] = p;
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kMaxChannelsPerLane; ++u) {
      const int64_t c = lane + 32 * u;
      if (c < Dv) {
        float o = acc[u] * alpha;
        for (int j = 0; j < n; ++j) o = fmaf(sp[warp * 32 + j], sv[j * Dv + c], o);
        acc[u] = o;
      }
    }
    __syncwarp();
  }
  if (active) {
    const int64_t orow = b * a.out_stride[0] + h * a.out_stride[1] + query * a.out_stride[2];
#pragma unroll
    for (int u = 0; u < kMaxChannelsPerLane; ++u) {
      const int64_t c = lane + 32 * u;
      if (c < Dv) store_f<DT>(a.out, orow + c * a.out_stride[3], l > 0.f ? acc[u] / l : 0.f);
    }
  }
}

// Sets the dynamic shared memory limit of `kernel` when the layout needs more than the default 48 KiB.
template <class Kernel>
inline cudaError_t allow_attention_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace attention_device
}  // namespace velodiff
