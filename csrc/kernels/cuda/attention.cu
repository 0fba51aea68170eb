// CUDA kernel of exact attention. Semantics: csrc/include/velodiff/attention.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// Simple first version, correct before fast (not yet run or timed on a GPU): grid (ceil(Lq / 8), B * H), a block
// of 8 warps, one warp per query. The block walks the keys in tiles of attention_cuda_key_tile(D, Dv) (32, or 16
// for D + Dv > 512): it stages the tile's K (rows padded to D + 1 floats: conflict-free column reads) and V as
// fp32 in dynamic shared memory, reading k and v through their strides; then in each warp lane j takes key j of
// the tile (its base-2 logit, an fp32 fma chain over D against the warp's pre-scaled query row in shared memory,
// -inf when masked), the warp reduces the tile's max and sum with shuffles (online softmax, header), and lane c
// accumulates output channels c, c + 32, ... (at most 16 per lane, Dv <= 512) in registers. One launch, no
// atomics, no host synchronisation: the op can be captured in a CUDA graph.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int kWarps = kAttentionCudaWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxChannelsPerLane = static_cast<int>(kAttentionMaxHeadDim / 32);

template <AttnDType DT>
__device__ __forceinline__ float load_f(const void* base, int64_t offset) {
  if constexpr (DT == AttnDType::kFloat16)
    return __half2float(__ushort_as_half(static_cast<const unsigned short*>(base)[offset]));
  else if constexpr (DT == AttnDType::kBFloat16)
    return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
  else
    return static_cast<const float*>(base)[offset];
}

template <AttnDType DT>
__device__ __forceinline__ void store_f(void* base, int64_t offset, float value) {
  if constexpr (DT == AttnDType::kFloat16)
    static_cast<uint16_t*>(base)[offset] = attention_float_to_fp16(value);
  else if constexpr (DT == AttnDType::kBFloat16)
    static_cast<uint16_t*>(base)[offset] = attention_float_to_bf16(value);
  else
    static_cast<float*>(base)[offset] = value;
}

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

template <AttnDType DT>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionArgs a, int tile) {
  extern __shared__ float smem[];
  const int64_t D = a.head_dim, Dv = a.v_head_dim, Lq = a.q_len, Lk = a.kv_len;
  const int64_t kpitch = D + 1;
  float* sk = smem;                          // [tile, D + 1]
  float* sv = sk + tile * kpitch;            // [tile, Dv]
  float* sq = sv + tile * Dv;                // [kWarps, D]
  float* sp = sq + kWarps * D;               // [kWarps, 32]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float neg_inf = -__int_as_float(0x7f800000);
  for (int64_t bh = blockIdx.y; bh < a.batch * a.heads; bh += gridDim.y) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    const bool active = i < Lq;
    const float qscale = a.scale * kAttentionLog2e;
    if (active) {
      const int64_t qrow = b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
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
        sk[j * kpitch + d] = load_f<DT>(a.k, kbase + (t0 + j) * a.k_stride[2] + d * a.k_stride[3]);
      }
      for (int64_t e = threadIdx.x; e < n * Dv; e += kThreads) {
        const int64_t j = e / Dv, c = e % Dv;
        sv[j * Dv + c] = load_f<DT>(a.v, vbase + (t0 + j) * a.v_stride[2] + c * a.v_stride[3]);
      }
      __syncthreads();
      if (!active) continue;
      float t = neg_inf;
      if (lane < n) {
        const bool keep = a.mask == nullptr || a.mask[b * a.mask_stride[0] + (t0 + lane) * a.mask_stride[1]] != 0;
        if (keep) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s = fmaf(sq[warp * D + d], sk[lane * kpitch + d], s);
          t = s;
        }
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
      const int64_t orow = b * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
#pragma unroll
      for (int u = 0; u < kMaxChannelsPerLane; ++u) {
        const int64_t c = lane + 32 * u;
        if (c < Dv) store_f<DT>(a.out, orow + c * a.out_stride[3], l > 0.f ? acc[u] / l : 0.f);
      }
    }
    __syncthreads();  // sq is rewritten for the next (b, h)
  }
}

template <AttnDType DT>
int launch(const AttentionArgs& a, cudaStream_t stream) {
  const int tile = attention_cuda_key_tile(a.head_dim, a.v_head_dim);
  const size_t smem = static_cast<size_t>(attention_cuda_smem_bytes(a.head_dim, a.v_head_dim));
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(attention_kernel<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t qtiles = (a.q_len + kWarps - 1) / kWarps;
  const int64_t bh = a.batch * a.heads;
  const dim3 grid(static_cast<unsigned>(qtiles), static_cast<unsigned>(bh < 65535 ? bh : 65535));
  attention_kernel<DT><<<grid, kThreads, smem, stream>>>(a, tile);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int attention_cuda(const AttentionArgs& a, void* stream) {
  if (a.batch * a.heads * a.q_len == 0) return 0;
  if (a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.v_head_dim < 1 ||
      a.v_head_dim > kAttentionMaxHeadDim || (a.q_len + kWarps - 1) / kWarps > 2147483647LL)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case AttnDType::kFloat16: return launch<AttnDType::kFloat16>(a, s);
    case AttnDType::kBFloat16: return launch<AttnDType::kBFloat16>(a, s);
    default: return launch<AttnDType::kFloat32>(a, s);
  }
}

}  // namespace velodiff
