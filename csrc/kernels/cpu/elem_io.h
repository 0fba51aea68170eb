// Element loads, stores and epilogue activations shared by the CPU GEMM kernels (qgemm.cpp, fp8.cpp): model dtypes
// (float32 / float16 / bfloat16) to and from float32 with round to nearest even, and the activation codes of
// velodiff/qgemm.h's QActivation. Torch-free, CPU only.
#pragma once

#include <cmath>
#include <cstdint>

#include "velodiff/float16.h"
#include "velodiff/qgemm.h"

namespace velodiff {
namespace elem_io {

inline float load_elem(QDtype dt, const void* p, int64_t i) {
  switch (dt) {
    case QDtype::kFloat16: return fp16_to_float_branchless(static_cast<const uint16_t*>(p)[i]);
    case QDtype::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// float32 -> binary16, round to nearest even (overflow to inf, subnormals rounded, NaN -> quiet NaN).
inline uint16_t float_to_fp16_rne(float f) {
  uint32_t x = float_to_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= 0x47800000u) {  // |f| >= 2^16 (always inf after rounding), inf or nan
    o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < 0x38800000u) {  // |f| < 2^-14: subnormal or zero; one fp32 add rounds the mantissa
    const uint32_t magic = 126u << 23;  // 0.5f
    o = float_to_bits(bits_to_float(x) + bits_to_float(magic)) - magic;
  } else {
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    o = x >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// float32 -> bfloat16, round to nearest even (NaN -> quiet NaN), as torch does.
inline uint16_t float_to_bf16_rne(float f) {
  const uint32_t u = float_to_bits(f);
  if (f != f) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void store_elem(QDtype dt, void* p, int64_t i, float v) {
  switch (dt) {
    case QDtype::kFloat16: static_cast<uint16_t*>(p)[i] = float_to_fp16_rne(v); break;
    case QDtype::kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16_rne(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Written without the cancellation of 1 + erf(.) / 1 + tanh(.) for negative v, so small outputs keep their
// relative accuracy: GELU = v/2 erfc(-v / sqrt 2); tanh GELU = v / (1 + exp(-2u)), u = sqrt(2/pi)(v + 0.044715 v^3).
inline float activate(float v, QActivation a) {
  switch (a) {
    case QActivation::kGelu: return 0.5f * v * std::erfc(v * -0.70710678118654752f);
    case QActivation::kGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return v / (1.f + std::exp(-2.f * u));
    }
    case QActivation::kSilu: return v / (1.f + std::exp(-v));
    default: return v;
  }
}

}  // namespace elem_io
}  // namespace velodiff
