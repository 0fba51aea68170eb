// CPU implementation of velodiff::quantize_fp8 and velodiff::fp8_gemm (torch glue over csrc/kernels/cpu/fp8.cpp).
#include "fp8_args.h"
#include "velodiff/kernels.h"

#include <tuple>

namespace velodiff {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu_op(const at::Tensor& x, c10::string_view format) {
  at::Tensor codes, scales;
  const QuantizeFp8Args a = prepare_quantize_fp8(x, std::string(format), codes, scales);
  char error[256] = {0};
  TORCH_CHECK(quantize_fp8_cpu(a, error), error);
  return {codes, scales};
}

at::Tensor fp8_gemm_cpu_op(const at::Tensor& a, const at::Tensor& ascales, const at::Tensor& w,
                           const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype, int64_t activation,
                           const std::optional<at::Tensor>& w_table) {
  at::Tensor y;
  const Fp8GemmArgs g = prepare_fp8_gemm(a, ascales, w, wscales, bias, out_dtype, activation, w_table, y);
  char error[256] = {0};
  TORCH_CHECK(fp8_gemm_cpu(g, error), error);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) {
  m.impl("quantize_fp8", &quantize_fp8_cpu_op);
  m.impl("fp8_gemm", &fp8_gemm_cpu_op);
}

}  // namespace velodiff
