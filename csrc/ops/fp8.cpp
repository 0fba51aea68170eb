// CPU implementation of velodiff::quantize_fp8, velodiff::fp8_gemm and velodiff::fp8_attention (torch glue over
// csrc/kernels/cpu/fp8.cpp and fp8_attention.cpp).
#include "attention_args.h"
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

at::Tensor fp8_attention_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  at::Tensor out;
  const AttentionArgs a = prepare_attention(q, k, v, key_padding_mask, scale, out, "fp8_attention");
  if (out.numel() == 0) return out;
  char error[256] = {0};
  TORCH_CHECK(fp8_attention_cpu(a, error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) {
  m.impl("quantize_fp8", &quantize_fp8_cpu_op);
  m.impl("fp8_gemm", &fp8_gemm_cpu_op);
  m.impl("fp8_attention", &fp8_attention_cpu_op);
}

}  // namespace velodiff
