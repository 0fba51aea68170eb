// Torch-free conversions of IEEE half and bfloat16 storage to float, usable on host and device.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VELODIFF_HD __host__ __device__ __forceinline__
#else
#define VELODIFF_HD inline
#endif

namespace velodiff {

VELODIFF_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// bfloat16 is the high half of a float32.
VELODIFF_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE 754 binary16 -> binary32, exact (normals, subnormals, inf, nan).
VELODIFF_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);  // +-0
    // subnormal: normalise
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return bits_to_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// The same conversion without branches (selects only), so loops over it vectorise on the host.
// Giesen's method: shift the 15-bit magnitude into place, rebias the exponent, then fix up inf/nan and
// zero/subnormal inputs; subnormals are renormalised by one float subtraction.
VELODIFF_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

VELODIFF_HD float fp16_to_float_branchless(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = magnitude & shifted_exp;
  const uint32_t normal = magnitude + ((127u - 15u) << 23);
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  const uint32_t subnormal = float_to_bits(bits_to_float(normal + (1u << 23)) - bits_to_float(113u << 23));
  const uint32_t o = exp == shifted_exp ? inf_nan : (exp == 0 ? subnormal : normal);
  return bits_to_float(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

}  // namespace velodiff
