// CUDA kernel of velodiff::fp8_attention (semantics in velodiff/fp8.h). Torch-free: compiles with nvcc alone.
//
// Written simple and correct first (no GPU has run it yet; the tensor-core version, e4m3 mma for Q K^T and P V
// as FlashAttention-3 / SageAttention do, comes with a GPU to measure it):
//  * quantize_lines: one 128-thread block per line (a row of Q or K, a channel of V), a NaN-propagating max of |x|,
//    then every element encoded after an IEEE division (__fdiv_rn: the build uses --use_fast_math) and decoded,
//    exactly: the codes equal the CPU kernel's and the reference's. Decoded codes and scales go to the workspace.
//  * fp8_attention_kernel: one 128-thread block per (query, b * H + h), two passes over the keys: the row max of
//    the logits (a thread per key), then per chunk of 128 keys each thread's p = exp(t - m) and P code into shared
//    memory, and the P V accumulation with a thread per output channel (up to 4 channels each, Dv <= 512).
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_io.cuh"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxChannelsPerThread = (kAttentionMaxHeadDim + kThreads - 1) / kThreads;
constexpr float kP = 448.f;

__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

// The block-wide reduction of one value per thread (max or sum); every thread gets the result.
template <bool Max>
__device__ float block_reduce(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? nan_max(v, other) : v + other;
  }
  __syncthreads();  // scratch may still be read by a previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) v = Max ? nan_max(v, scratch[w]) : v + scratch[w];
  return v;
}

struct Lines {
  const void* x;
  int64_t stride_b, stride_h, stride_line, stride_elem;  // elements of x
  int64_t heads, lines, n;                               // lines per (b, h), n elements per line
  float* out;                                            // [BH, lines * n] decoded codes
  int64_t out_line, out_elem;
  float* scales;  // [BH, lines]
};

template <AttnDType DT>
__global__ void __launch_bounds__(kThreads) quantize_lines(Lines p, int64_t bh_count) {
  __shared__ float scratch[kThreads / 32];
  const int64_t line = blockIdx.x;
  for (int64_t bh = blockIdx.y; bh < bh_count; bh += gridDim.y) {
    const int64_t base = (bh / p.heads) * p.stride_b + (bh % p.heads) * p.stride_h + line * p.stride_line;
    float amax = 0.f;
    for (int64_t e = threadIdx.x; e < p.n; e += kThreads)
      amax = nan_max(amax, fabsf(load_f<DT>(p.x, base + e * p.stride_elem)));
    amax = block_reduce<true>(amax, scratch);
    const float s = __fdiv_rn(amax, fp8_max(Fp8Format::kE4M3));
    if (threadIdx.x == 0) p.scales[bh * p.lines + line] = s;
    float* out = p.out + bh * p.lines * p.n + line * p.out_line;
    for (int64_t e = threadIdx.x; e < p.n; e += kThreads) {
      const float v = load_f<DT>(p.x, base + e * p.stride_elem);
      out[e * p.out_elem] =
          s == 0.f ? 0.f : decode_fp8(encode_fp8(__fdiv_rn(v, s), Fp8Format::kE4M3), Fp8Format::kE4M3);
    }
  }
}

struct Decoded {
  const float *q, *qs, *k, *ks, *v, *vs;  // workspace parts (fp8_attention_cuda_workspace_floats)
};

template <AttnDType DT>
__global__ void __launch_bounds__(kThreads) fp8_attention_kernel(const AttentionArgs a, Decoded w) {
  extern __shared__ float smem[];  // q row [D], P codes [kThreads], scratch [kThreads / 32]
  float* qrow = smem;
  float* pc = smem + a.head_dim;
  float* scratch = pc + kThreads;
  const int64_t i = blockIdx.x, BH = a.batch * a.heads, D = a.head_dim, Dv = a.v_head_dim, Lk = a.kv_len;
  for (int64_t bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const uint8_t* mask = a.mask != nullptr ? a.mask + b * a.mask_stride[0] : nullptr;
    __syncthreads();  // qrow of the previous (b, h) is no longer read
    for (int64_t d = threadIdx.x; d < D; d += kThreads) qrow[d] = w.q[(bh * a.q_len + i) * D + d];
    __syncthreads();
    const float sq = w.qs[bh * a.q_len + i];
    const float* kd = w.k + bh * Lk * D;
    const float* ks = w.ks + bh * Lk;
    auto logit = [&](int64_t j) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot = fmaf(qrow[d], kd[j * D + d], dot);
      return dot * (sq * ks[j]) * a.scale;
    };
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < Lk; j += kThreads)
      if (mask == nullptr || mask[j * a.mask_stride[1]] != 0) m = fmaxf(m, logit(j));
    m = block_reduce<true>(m, scratch);
    const int64_t ob = b * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
    if (m == -INFINITY) {  // no attended key: zeros
      for (int64_t c = threadIdx.x; c < Dv; c += kThreads) store_f<DT>(a.out, ob + c * a.out_stride[3], 0.f);
      continue;
    }
    float acc[kMaxChannelsPerThread] = {};
    float l = 0.f;
    const float* vd = w.v + bh * Lk * Dv;
    for (int64_t j0 = 0; j0 < Lk; j0 += kThreads) {
      const int64_t j = j0 + threadIdx.x;
      float code = 0.f;
      if (j < Lk && (mask == nullptr || mask[j * a.mask_stride[1]] != 0)) {
        const float p = expf(logit(j) - m);
        l += p;
        code = decode_fp8(encode_fp8(kP * p, Fp8Format::kE4M3), Fp8Format::kE4M3);
      }
      __syncthreads();  // the previous chunk's codes are read
      pc[threadIdx.x] = code;
      __syncthreads();
      const int64_t n = Lk - j0 < kThreads ? Lk - j0 : kThreads;
      for (int r = 0; r < kMaxChannelsPerThread; ++r) {
        const int64_t c = threadIdx.x + r * kThreads;
        if (c >= Dv) break;
        for (int64_t jj = 0; jj < n; ++jj) acc[r] = fmaf(pc[jj], vd[(j0 + jj) * Dv + c], acc[r]);
      }
    }
    l = block_reduce<false>(l, scratch);
    for (int r = 0; r < kMaxChannelsPerThread; ++r) {
      const int64_t c = threadIdx.x + r * kThreads;
      if (c >= Dv) break;
      store_f<DT>(a.out, ob + c * a.out_stride[3], acc[r] * __fdiv_rn(w.vs[bh * Dv + c], kP * l));
    }
  }
}

template <AttnDType DT>
int launch(const AttentionArgs& a, float* workspace, cudaStream_t s) {
  const int64_t BH = a.batch * a.heads, Lq = a.q_len, Lk = a.kv_len, D = a.head_dim, Dv = a.v_head_dim;
  float* qd = workspace;
  float* qs = qd + BH * Lq * D;
  float* kd = qs + BH * Lq;
  float* ks = kd + BH * Lk * D;
  float* vd = ks + BH * Lk;
  float* vs = vd + BH * Lk * Dv;
  const unsigned gy = static_cast<unsigned>(BH < 65535 ? BH : 65535);
  const Lines lines[3] = {
      {a.q, a.q_stride[0], a.q_stride[1], a.q_stride[2], a.q_stride[3], a.heads, Lq, D, qd, D, 1, qs},
      {a.k, a.k_stride[0], a.k_stride[1], a.k_stride[2], a.k_stride[3], a.heads, Lk, D, kd, D, 1, ks},
      {a.v, a.v_stride[0], a.v_stride[1], a.v_stride[3], a.v_stride[2], a.heads, Dv, Lk, vd, 1, Dv, vs}};
  for (const Lines& p : lines) {
    quantize_lines<DT><<<dim3(static_cast<unsigned>(p.lines), gy), kThreads, 0, s>>>(p, BH);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const size_t smem = sizeof(float) * static_cast<size_t>(D + kThreads + kThreads / 32);
  fp8_attention_kernel<DT><<<dim3(static_cast<unsigned>(Lq), gy), kThreads, smem, s>>>(
      a, Decoded{qd, qs, kd, ks, vd, vs});
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int fp8_attention_cuda(const AttentionArgs& a, float* workspace, void* stream) {
  if (a.batch == 0 || a.heads == 0 || a.q_len == 0) return 0;
  if (a.q_len > 2147483647 || a.v_head_dim > kAttentionMaxHeadDim) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case AttnDType::kFloat16: return launch<AttnDType::kFloat16>(a, workspace, s);
    case AttnDType::kBFloat16: return launch<AttnDType::kBFloat16>(a, workspace, s);
    default: return launch<AttnDType::kFloat32>(a, workspace, s);
  }
}

}  // namespace velodiff
