// velodiff exact attention: the one format shared by the reference (python/velodiff/ops/reference.py attention),
// the CPU kernel (csrc/kernels/cpu/attention.cpp) and the CUDA kernel (csrc/kernels/cuda/attention.cu).
//
//   inputs (any strides, given in elements; B batch, H heads, Lq queries, Lk keys, D = q/k head dim, Dv = v's)
//     q     [B, H, Lq, D]    fp32 | fp16 | bf16
//     k     [B, H, Lk, D]    q's dtype
//     v     [B, H, Lk, Dv]   q's dtype
//     mask  [B, Lk]          bool (one byte, 0 / 1), optional: key-padding mask, 1 = the key is attended
//     scale                  finite float > 0 (the wrapper's default is 1 / sqrt(D))
//   output
//     out   [B, H, Lq, Dv]   q's dtype, any strides (the glue allocates it as [B, Lq, H, Dv] memory, so that the
//                            models' out.transpose(1, 2).reshape(B, Lq, H * Dv) is free)
//
//   semantics, per (b, h, i):   A = { j : mask[b, j] }  (all j without a mask)
//     s_j = scale * (q_i . k_j)                                    j in A
//     out_i = sum_{j in A} exp(s_j - max_A s) v_j / sum_{j in A} exp(s_j - max_A s)   when A is not empty
//     out_i = 0                                                    when A is empty (a fully masked row; torch's
//                                                                  SDPA gives NaN there, we give defined zeros)
//
//   Both kernels compute it flash-style (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
//   FlashAttention, Dao et al. 2022, Algorithm 1): keys in tiles, per query a running max m, a running sum l and
//   an fp32 accumulator o; for each tile T
//       m' = max(m, max_{j in T} t_j)       t_j = (scale * log2 e) * (q_i . k_j), base-2 logits
//       alpha = 2^(m - m'),  p_j = 2^(t_j - m')
//       l = alpha * l + sum_j p_j,  o = alpha * o + sum_j p_j v_j,  m = m'
//   and finally out_i = o / l. Inputs are read as fp32 (exact for fp16 / bf16), every product and sum is fp32,
//   the output is rounded once to q's dtype (round to nearest even). Masked keys are skipped, never given -inf,
//   so no inf - inf can arise; logits of any finite size (scale * q.k ~ 1e4) neither overflow nor give NaN.
//
//   Supported: 1 <= D <= 512 and 1 <= Dv <= 512 (every head dim of SD 1.x/2.x/SDXL, DiT, PixArt, FLUX, the
//   VAE mid-block's 512), any B, H, Lq, Lk >= 1.
#pragma once

#include <cstdint>

#include "velodiff/float16.h"  // VELODIFF_HD, bits_to_float, float_to_bits

namespace velodiff {

constexpr int64_t kAttentionMaxHeadDim = 512;
constexpr float kAttentionLog2e = 1.4426950408889634f;

enum class AttnDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raw pointers, sizes and strides (in elements) of one call. Torch-free; passed by value to the CUDA kernel.
struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const uint8_t* mask = nullptr;  // [B, Lk] bytes (torch.bool), or nullptr
  void* out = nullptr;
  AttnDType dtype = AttnDType::kFloat32;
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, v_head_dim = 0;
  int64_t q_stride[4] = {};    // b, h, l, d
  int64_t k_stride[4] = {};
  int64_t v_stride[4] = {};
  int64_t out_stride[4] = {};
  int64_t mask_stride[2] = {};  // b, l
  float scale = 1.f;
};

// fp32 -> fp16 bits, round to nearest even (normals, subnormals, overflow to inf, NaN kept quiet). Host and
// device: the output of both kernels is rounded by the same function, once per element.
VELODIFF_HD uint16_t attention_float_to_fp16(float value) {
  uint32_t f = float_to_bits(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= (127u + 16u) << 23) {  // >= 65536 (or inf / nan); [65520, 65536) overflows in the normal path
    o = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {  // below 2^-14: a half subnormal or zero; the float add rounds (RNE)
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = float_to_bits(bits_to_float(f) + bits_to_float(denorm_magic)) - denorm_magic;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = f >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// fp32 -> bf16 bits, round to nearest even (NaN kept quiet).
VELODIFF_HD uint16_t attention_float_to_bf16(float value) {
  uint32_t x = float_to_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// CUDA layout: one thread block of kAttentionCudaWarps warps per (b * H + h, kAttentionCudaWarps queries), one
// warp per query; K / V tiles of attention_cuda_key_tile(D, Dv) keys in dynamic shared memory (fp32).
constexpr int kAttentionCudaWarps = 8;
inline int attention_cuda_key_tile(int64_t head_dim, int64_t v_head_dim) {
  return head_dim + v_head_dim > 512 ? 16 : 32;
}
inline int64_t attention_cuda_smem_bytes(int64_t head_dim, int64_t v_head_dim) {
  const int64_t tile = attention_cuda_key_tile(head_dim, v_head_dim);
  return 4 * (tile * (head_dim + 1) + tile * v_head_dim + kAttentionCudaWarps * (head_dim + 32));
}

}  // namespace velodiff
