// Device loads and stores of the attention family's tensors (fp32 / fp16 / bf16, AttnDType; the GEMM families'
// QDtype has the same values) as fp32: one element at an offset, the dtype a template parameter. Stores round to
// nearest even as the CPU kernels do (attention_float_to_fp16 / _bf16 of csrc/include/velodiff/attention.h), so both
// devices write the same bits for the same fp32 value. Shared by attention_device.cuh (exact and windowed
// attention), linear_attention.cu and fp8.cu. Also the GEMM epilogues' activation (QActivation codes), shared by
// qgemm_device.cuh and fp8.cu.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "velodiff/attention.h"

namespace velodiff {

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

// act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 SiLU (velodiff/qgemm.h's QActivation).
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(u));
    }
    case 3: return v / (1.f + __expf(-v));
    default: return v;
  }
}

}  // namespace velodiff
