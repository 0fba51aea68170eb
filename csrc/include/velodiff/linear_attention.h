// velodiff non-causal linear attention: the one format shared by the reference (python/velodiff/ops/reference.py
// linear_attention), the CPU kernel (csrc/kernels/cpu/linear_attention.cpp) and the CUDA kernel
// (csrc/kernels/cuda/linear_attention.cu).
//
//   inputs (any strides, given in elements; B batch, H heads, Nq queries, Nk keys, D = q/k head dim, Dv = v's)
//     q     [B, H, Nq, D]    fp32 | fp16 | bf16
//     k     [B, H, Nk, D]    q's dtype
//     v     [B, H, Nk, Dv]   q's dtype
//     kind                   kLinFusion | kRelu (the feature map phi and the normalisation, below)
//     eps                    finite float > 0 (the wrapper's defaults: 1e-4 for kLinFusion, 1e-8 for kRelu)
//   output
//     out   [B, H, Nq, Dv]   q's dtype, any strides (the glue allocates it as [B, Nq, H, Dv] memory, as for
//                            velodiff::attention, so that out.transpose(1, 2).reshape(B, Nq, H * Dv) is free)
//
//   semantics, per (b, h), with phi applied elementwise to every q_i and k_j (rows of length D):
//     kLinFusion (LinFusion, Liu et al. 2024, arXiv 2409.02097, GeneralizedLinearAttention):
//       phi(u) = elu(u) + 1 = (u > 0 ? u + 1 : exp(u))
//       S = sum_j phi(k_j) v_j^T / Nk          [D, Dv]      z = sum_j phi(k_j) / Nk   [D]  (the mean)
//       out_i = phi(q_i) S / (phi(q_i) . z + eps)
//     kRelu (SANA's LiteLA, Xie et al. 2024, arXiv 2410.10629; EfficientViT's ReLU linear attention):
//       phi(u) = max(u, 0)
//       S = sum_j phi(k_j) v_j^T                [D, Dv]      z = sum_j phi(k_j)        [D]  (the sum)
//       out_i = phi(q_i) S / (phi(q_i) . z + eps)
//   No 1/sqrt(D) scale, no mask, no causality. LinFusion adds eps to the MEAN-normalised denominator; both kernels
//   evaluate the identical form with sums: out_i = (phi(q_i) S') / (phi(q_i) z' + eps'), S' = sum_j phi(k_j) v_j^T,
//   z' = sum_j phi(k_j), eps' = Nk * eps (kLinFusion) or eps (kRelu), eps' rounded once to fp32. The denominator is
//   >= eps' > 0 (phi >= 0), so no division by zero can arise; a query with phi(q_i) = 0 gives zeros.
//
//   Arithmetic: inputs are read as fp32 (exact for fp16 / bf16), phi is evaluated in fp32 (exp by
//   linear_attention_exp below), the state S' and z' are accumulated in fp32 for every input dtype (an fp16 state
//   overflows at |v| ~ 1e3 and Nk ~ 16k: 1.6e7 > 65504), phi(q_i) S' and phi(q_i) z' are fp32 dot products, the
//   division is one IEEE fp32 division, and the output is rounded once to q's dtype (round to nearest even).
//   The state is the augmented matrix [S' | z'] = sum_j phi(k_j) [v_j, 1]^T of D x (Dv + 1), so the denominator is
//   one more output column of the same product. The kernels split the keys into chunks (linear_attention_chunks),
//   accumulate one partial state per (b, h, chunk) and add the partials in chunk order: the result depends on the
//   sizes only, never on the thread count or the scheduling.
//
//   Supported: 1 <= D <= 512 and 1 <= Dv <= 512, Nq >= 1 and Nk >= 1, any B, H >= 0.
#pragma once

#include <cstdint>

#include "velodiff/attention.h"  // AttnDType, attention_float_to_fp16 / _bf16 (the same output rounding)
#include "velodiff/float16.h"    // VELODIFF_HD, bits_to_float

namespace velodiff {

constexpr int64_t kLinearAttentionMaxHeadDim = 512;

enum class LinearAttentionKind : int { kLinFusion = 0, kRelu = 1 };

// Raw pointers, sizes and strides (in elements) of one call. Torch-free; passed by value to the CUDA kernels.
struct LinearAttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  AttnDType dtype = AttnDType::kFloat32;
  LinearAttentionKind kind = LinearAttentionKind::kLinFusion;
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  int64_t q_stride[4] = {};  // b, h, n, d
  int64_t k_stride[4] = {};
  int64_t v_stride[4] = {};
  int64_t out_stride[4] = {};
  float eps = 1e-4f;  // as given; the kernels add eps' = Nk * eps (kLinFusion) or eps (kRelu) to the denominator
};

// The denominator's constant eps' (header): one rounding of the exact product to fp32.
inline float linear_attention_eps_sum(const LinearAttentionArgs& a) {
  return a.kind == LinearAttentionKind::kLinFusion
             ? static_cast<float>(static_cast<double>(a.eps) * static_cast<double>(a.kv_len))
             : a.eps;
}

// exp(x) for x <= 0 in fp32 (phi of kLinFusion for u <= 0), Cephes expf's method: n = round(x log2 e),
// r = x - n ln 2 (ln 2 in two parts, fma), exp(r) = 1 + r + r^2 p(r) with Cephes' degree-5 p on |r| <= ln(2)/2,
// times 2^n. Relative error measured over every fp32 x in [-87, 0]: at most 1.41 u (u = 2^-24; 1.01 ulp). x < -87
// gives 0 (exp(x) < 1.7e-38 there, about the smallest normal float); NaN stays NaN. The CPU kernel's AVX2 path performs the same operations
// in the same order (csrc/kernels/cpu/linear_attention.cpp), so both give these bits; the CUDA kernel calls this
// function too.
constexpr float kLinAttnExpMin = -87.f;
constexpr float kLinAttnLog2e = 1.44269504088896341f;
constexpr float kLinAttnLn2Hi = 0.693359375f;      // 355 / 512: n * kLinAttnLn2Hi is exact for |n| < 2^15
constexpr float kLinAttnLn2Lo = -2.12194440e-4f;   // ln 2 - kLinAttnLn2Hi
constexpr float kLinAttnRoundMagic = 12582912.f;   // 1.5 * 2^23: (t + M) - M rounds t to an integer (nearest even)
constexpr float kLinAttnExpP0 = 1.9875691500e-4f, kLinAttnExpP1 = 1.3981999507e-3f, kLinAttnExpP2 = 8.3334519073e-3f,
                kLinAttnExpP3 = 4.1665795894e-2f, kLinAttnExpP4 = 1.6666665459e-1f, kLinAttnExpP5 = 5.0000001201e-1f;

#if defined(__CUDA_ARCH__)
#define VELODIFF_LA_FMA fmaf
#else
#define VELODIFF_LA_FMA __builtin_fmaf
#endif

VELODIFF_HD float linear_attention_exp(float x) {
  if (!(x >= kLinAttnExpMin)) return x != x ? x : 0.f;
  const float t = x * kLinAttnLog2e;
  const float n = (t + kLinAttnRoundMagic) - kLinAttnRoundMagic;  // in [-126, 0]
  float r = VELODIFF_LA_FMA(-n, kLinAttnLn2Hi, x);
  r = VELODIFF_LA_FMA(-n, kLinAttnLn2Lo, r);
  float p = kLinAttnExpP0;
  p = VELODIFF_LA_FMA(p, r, kLinAttnExpP1);
  p = VELODIFF_LA_FMA(p, r, kLinAttnExpP2);
  p = VELODIFF_LA_FMA(p, r, kLinAttnExpP3);
  p = VELODIFF_LA_FMA(p, r, kLinAttnExpP4);
  p = VELODIFF_LA_FMA(p, r, kLinAttnExpP5);
  const float r2 = r * r;
  p = VELODIFF_LA_FMA(p, r2, r);  // p r^2 + r
  p = p + 1.f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// phi of the header, fp32.
VELODIFF_HD float linear_attention_phi(LinearAttentionKind kind, float u) {
  if (kind == LinearAttentionKind::kRelu) return u < 0.f ? 0.f : u;  // NaN stays NaN
  return u > 0.f ? u + 1.f : linear_attention_exp(u);
}

// The key chunks of the state pass (header): P chunks of ceil(Nk / P) keys. With B * H below `target_tasks`, the keys
// are split so that B * H * P reaches it, keeping at least `min_chunk` keys a chunk and at most `max_state_floats`
// floats of partial states (B * H * P * D * width). A function of the sizes only, so the bits are too.
inline int64_t linear_attention_chunks(int64_t bh, int64_t kv_len, int64_t state_floats, int64_t target_tasks,
                                       int64_t min_chunk, int64_t max_state_floats) {
  if (bh <= 0 || kv_len <= 0 || bh >= target_tasks) return 1;
  int64_t p = (target_tasks + bh - 1) / bh;
  const int64_t by_length = kv_len / min_chunk;
  if (p > by_length) p = by_length;
  const int64_t by_memory = max_state_floats / (bh * (state_floats > 0 ? state_floats : 1));
  if (p > by_memory) p = by_memory;
  return p < 1 ? 1 : p;
}

// CPU: 64 state tasks (enough for the machines the kernel runs on; a constant, not the thread count, so the
// bits do not depend on it), chunks of >= 1024 keys, <= 64 MB of partial states.
constexpr int64_t kLinAttnCpuTasks = 64;
constexpr int64_t kLinAttnCpuMinChunk = 1024;
constexpr int64_t kLinAttnCpuMaxStateFloats = int64_t{1} << 24;
// The CPU state's row width: Dv + 1 columns (v, then the ones column of z') rounded up to 8 with zeros.
inline int64_t linear_attention_cpu_width(int64_t v_head_dim) { return (v_head_dim + 1 + 7) / 8 * 8; }
inline int64_t linear_attention_cpu_chunks(int64_t bh, int64_t kv_len, int64_t head_dim, int64_t v_head_dim) {
  return linear_attention_chunks(bh, kv_len, head_dim * linear_attention_cpu_width(v_head_dim), kLinAttnCpuTasks,
                                 kLinAttnCpuMinChunk, kLinAttnCpuMaxStateFloats);
}

// CUDA: the state kernel's blocks are (b * H + h, chunk, 32 x 32 tile of the D x (Dv + 1) state); chunks of
// >= 256 keys until there are about 1024 blocks; partial states <= 64 MB. The workspace holds the partial states
// [B * H, P, D, Dv + 1] and, when P > 1, the summed state [B * H, D, Dv + 1] after them (fp32).
constexpr int kLinAttnCudaTile = 32;
constexpr int64_t kLinAttnCudaBlocks = 1024;
constexpr int64_t kLinAttnCudaMinChunk = 256;
constexpr int64_t kLinAttnCudaMaxStateFloats = int64_t{1} << 24;
inline int64_t linear_attention_cuda_state_tiles(int64_t head_dim, int64_t v_head_dim) {
  return ((head_dim + kLinAttnCudaTile - 1) / kLinAttnCudaTile) *
         ((v_head_dim + 1 + kLinAttnCudaTile - 1) / kLinAttnCudaTile);
}
inline int64_t linear_attention_cuda_chunks(int64_t bh, int64_t kv_len, int64_t head_dim, int64_t v_head_dim) {
  const int64_t tiles = linear_attention_cuda_state_tiles(head_dim, v_head_dim);
  return linear_attention_chunks(bh, kv_len, head_dim * (v_head_dim + 1),
                                 (kLinAttnCudaBlocks + tiles - 1) / tiles, kLinAttnCudaMinChunk,
                                 kLinAttnCudaMaxStateFloats);
}
inline int64_t linear_attention_cuda_workspace_floats(int64_t bh, int64_t kv_len, int64_t head_dim,
                                                      int64_t v_head_dim) {
  const int64_t p = linear_attention_cuda_chunks(bh, kv_len, head_dim, v_head_dim);
  return bh * head_dim * (v_head_dim + 1) * (p > 1 ? p + 1 : 1);
}

}  // namespace velodiff
