// FP8 W8A8 GEMM family: velodiff::quantize_fp8 (dynamic per-row scales + codes in one pass) and
// velodiff::fp8_gemm (fp32 accumulation, scales, bias and an activation in the epilogue). One format, shared by the
// pure-PyTorch reference (python/velodiff/ops/reference.py), the CPU kernels (csrc/kernels/cpu/fp8.cpp) and the
// CUDA kernels (csrc/kernels/cuda/fp8.cu).
//
// ---------------------------------------------------------------------------------------------------------
// Codes: one byte per element, stored as torch.float8_e4m3fn or torch.float8_e5m2 (the OCP FP8 formats):
//   e4m3 (Fp8Format::kE4M3): sign, 4 exponent bits (bias 7), 3 mantissa bits; largest finite 448 (S.1111.110),
//        smallest subnormal 2^-9; no infinity; NaN = S.1111.111.
//   e5m2 (Fp8Format::kE5M2): sign, 5 exponent bits (bias 15), 2 mantissa bits; largest finite 57344 (S.11110.11),
//        smallest subnormal 2^-16; infinity S.11111.00; NaN S.11111.{01,10,11} (we write S.11111.10).
// Encoding a float32 (encode_fp8), the same in every implementation:
//   round to nearest, ties to even, subnormals included (values below half the smallest subnormal become a
//   signed zero); a finite value at or beyond the largest finite code saturates to it (torch's .to(float8) makes
//   e4m3 NaN there instead); NaN -> NaN; +-inf -> +-inf in e5m2 and NaN in e4m3 (which has no infinity:
//   saturating an infinity would hide it).
// Decoding (decode_fp8) is exact: every code is a float32.
//
// Layout: x W^T with x [M, K] activations, W [N, K] weights (nn.Linear's layout), both K-contiguous:
//   codes a [M, K] and w [N, K]; scales ascales float32 [M] (one per token), wscales float32 [N] (one per output
//   channel). The two operands may have different formats (e4m3 x e5m2 is allowed).
//
// Activation quantization (velodiff::quantize_fp8), x [M, K] float32 | float16 | bfloat16:
//   amax[m]  = max_k |float(x[m,k])|       (NaN if the row holds a NaN)
//   s[m]     = amax[m] / F                 (fp32 division; F = 448 for e4m3, 57344 for e5m2)
//   a[m,k]   = s[m] == 0 ? +0 : encode_fp8(float(x[m,k]) / s[m])      (IEEE fp32 division)
// So a row with an infinity gets s = inf: its finite elements become 0 and the infinity NaN (inf / inf), and its
// outputs NaN, as the unquantized product would be. Weights use the same rule per output channel (offline).
//
// GEMM (velodiff::fp8_gemm), fp32 accumulation:
//   dot[m,n] = sum_k decode(a[m,k]) * decode(w[n,k])    (every product exact in fp32; the order of the fp32 sum
//                                                         is the kernel's: paths differ in the last bits)
//   acc[m,n] = dot[m,n] * (ascales[m] * wscales[n]) + float(bias[n])
//   y[m,n]   = T(act(acc[m,n]))   T = out_dtype (float32 | float16 | bfloat16, round to nearest even);
//                                 act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 SiLU (qgemm's codes)
//
// 4-bit weights (W4A8, velodiff.quant.lowbit_fp): with a decode table w_table (16 e4m3 codes), w is uint8
// [N, ceil(K / 2)], two 4-bit indices per byte (element 2j in the low nibble of byte j, as qgemm's 4-bit storage;
// the last high nibble of an odd K is unused), and weight element (n, k) is the e4m3 code w_table[index]. A 4-bit
// float format of any exponent / mantissa split (e1m2, e2m1, e3m0) or int4 maps its 16 codes to values that are all
// exact in e4m3, so the table holds them exactly and the GEMM above is unchanged (w_format = e4m3).
//
// FP8 attention (velodiff::fp8_attention; the 8-bit attention line of work: SageAttention, FlashAttention-3's FP8
// path): q, k, v, key_padding_mask, scale and out exactly as velodiff::attention (velodiff/attention.h: any strides,
// fp32 | fp16 | bf16, out in q's dtype); per (b, h):
//   Q codes per row (query i: sq[i] = max_d |q[i,d]| / 448, the quantize_fp8 rule in e4m3), K per row (sk[j]),
//   V per channel over all Lk keys (sv[c] = max_j |v[j,c]| / 448; the mask does not change it);
//   A = the attended keys (all without a mask);
//   t[i,j] = (sum_d dq[i,d] dk[j,d]) * (sq[i] * sk[j]) * scale        (dq, dk, dv: decoded codes, exact)
//   m[i]   = max_{j in A} t[i,j],   p[i,j] = exp(t[i,j] - m[i]) in (0, 1],   l[i] = sum_{j in A} p[i,j]
//   pc     = e4m3 code of 448 p[i,j]                                   (P with the fixed scale 1 / 448)
//   out[i,c] = (sum_{j in A} decode(pc) dv[j,c]) * (sv[c] / (448 l[i])); a query with A empty gets 0.
// P is quantized before normalisation (its largest value is exactly 1, so it never saturates and the small ones
// keep e4m3's relative precision longer than the normalised probabilities would). Sums in fp32, in the kernel's
// order; the CPU and CUDA kernels compute the whole row max first (two passes over the keys), so every p is the
// reference's up to exp's last bit.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cmath>
#include <cstdint>

#include "velodiff/float16.h"  // VELODIFF_HD, bits_to_float, float_to_bits
#include "velodiff/qgemm.h"    // QDtype, QActivation

namespace velodiff {

enum class Fp8Format : int { kE4M3 = 0, kE5M2 = 1 };

// Largest finite value: 448 (e4m3) or 57344 (e5m2).
VELODIFF_HD float fp8_max(Fp8Format f) { return f == Fp8Format::kE4M3 ? 448.f : 57344.f; }

// float32 -> FP8 code by the rule above.
VELODIFF_HD uint8_t encode_fp8(float v, Fp8Format f) {
  const bool e4 = f == Fp8Format::kE4M3;
  const int man = e4 ? 3 : 2, bias = e4 ? 7 : 15;
  const uint32_t max_code = e4 ? 0x7eu : 0x7bu, nan_code = e4 ? 0x7fu : 0x7eu;
  const uint32_t bits = float_to_bits(v);
  const uint32_t sign = (bits >> 24) & 0x80u, mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint8_t>(sign | nan_code);
  if (mag == 0x7f800000u) return static_cast<uint8_t>(sign | (e4 ? nan_code : 0x7cu));
  const float a = bits_to_float(mag);
  if (a >= fp8_max(f)) return static_cast<uint8_t>(sign | max_code);
  // Below the smallest normal 2^(1 - bias) the codes are the multiples of the smallest subnormal
  // 2^(1 - bias - man): round(a / that) (a power-of-two multiply, exact) is the code itself, and its largest
  // value 2^man is exactly the code of the smallest normal.
  if (a < bits_to_float(static_cast<uint32_t>(128 - bias) << 23)) {
    const float q = rintf(a * bits_to_float(static_cast<uint32_t>(126 + bias + man) << 23));
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(q));
  }
  // Normal: round the 23-bit mantissa to `man` bits (ties to even), then rebias the exponent (a carry out of the
  // mantissa moves into the exponent, as it should; a >= max was handled above, so no code passes max_code).
  const int shift = 23 - man;
  const uint32_t odd = (mag >> shift) & 1u;
  const uint32_t rounded = (mag + ((1u << (shift - 1)) - 1u) + odd) >> shift;
  return static_cast<uint8_t>(sign | (rounded - (static_cast<uint32_t>(127 - bias) << man)));
}

// FP8 code -> float32, exact.
VELODIFF_HD float decode_fp8(uint8_t c, Fp8Format f) {
  const bool e4 = f == Fp8Format::kE4M3;
  const int man = e4 ? 3 : 2, bias = e4 ? 7 : 15;
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t e = (c & 0x7fu) >> man, m = c & ((1u << man) - 1u), emax = e4 ? 15u : 31u;
  if (e4 && e == emax && m == ((1u << man) - 1u)) return bits_to_float(sign | 0x7fc00000u);
  if (!e4 && e == emax) return bits_to_float(sign | (m == 0 ? 0x7f800000u : 0x7fc00000u));
  if (e == 0) {  // subnormal: m * 2^(1 - bias - man)
    const float v = static_cast<float>(m) * bits_to_float(static_cast<uint32_t>(128 - bias - man) << 23);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((e + 127u - bias) << 23) | (m << (23 - man)));
}

// velodiff::quantize_fp8: x [M, K] (dtype, row-major contiguous) -> codes [M, K] and scales float32 [M].
struct QuantizeFp8Args {
  const void* x = nullptr;
  QDtype dtype = QDtype::kFloat32;
  uint8_t* codes = nullptr;
  float* scales = nullptr;
  int64_t M = 0, K = 0;
  Fp8Format format = Fp8Format::kE4M3;
};

// velodiff::fp8_gemm: y [M, N] (out_dtype) = act(dot * (ascales[m] * wscales[n]) + bias[n]).
struct Fp8GemmArgs {
  const uint8_t* a = nullptr;        // [M, K] codes
  const float* ascales = nullptr;    // [M]
  const uint8_t* w = nullptr;        // [N, K] codes
  const float* wscales = nullptr;    // [N]
  const void* bias = nullptr;        // [N] out_dtype, or null
  void* y = nullptr;                 // [M, N] out_dtype
  QDtype out_dtype = QDtype::kFloat32;
  Fp8Format a_format = Fp8Format::kE4M3, w_format = Fp8Format::kE4M3;
  QActivation activation = QActivation::kNone;
  int64_t M = 0, N = 0, K = 0;
  const uint8_t* w_table = nullptr;  // 16 e4m3 codes: w holds 4-bit indices into it, or null (w holds codes)
};

// The FP8 code (in w_format) of weight element (n, k), with or without a 4-bit decode table.
VELODIFF_HD uint8_t fp8_weight_code(const Fp8GemmArgs& a, int64_t n, int64_t k) {
  if (a.w_table == nullptr) return a.w[n * a.K + k];
  const uint8_t byte = a.w[n * ((a.K + 1) / 2) + k / 2];
  return a.w_table[(k & 1) ? byte >> 4 : byte & 15];
}

// The CUDA fp8_attention workspace, in floats: decoded Q [B*H, Lq, D] and K [B*H, Lk, D] codes with their row scales,
// decoded V codes [B*H, Lk, Dv] with their channel scales [B*H, Dv].
inline int64_t fp8_attention_cuda_workspace_floats(int64_t bh, int64_t lq, int64_t lk, int64_t d, int64_t dv) {
  return bh * (lq * (d + 1) + lk * (d + 1) + lk * dv + dv);
}

}  // namespace velodiff
