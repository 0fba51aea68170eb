// Device loads and stores of the attention family's tensors (fp32 / fp16 / bf16, AttnDType) as fp32: one element
// at an offset, the dtype a template parameter. Stores round to nearest even as the CPU kernels do
// (attention_float_to_fp16 / _bf16 of csrc/include/velodiff/attention.h), so both devices write the same bits for
// the same fp32 value. Shared by attention_device.cuh (exact and windowed attention) and linear_attention.cu.
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

}  // namespace velodiff
