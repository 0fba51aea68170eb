// CPU implementation of velodiff::linear_attention (torch glue over csrc/kernels/cpu/linear_attention.cpp).
#include "linear_attention_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor linear_attention_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   c10::string_view kind, std::optional<double> eps) {
  at::Tensor out;
  const LinearAttentionArgs a = prepare_linear_attention(q, k, v, std::string(kind), eps, out);
  if (out.numel() == 0) return out;
  char error[256] = {0};
  TORCH_CHECK(linear_attention_cpu(a, error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) { m.impl("linear_attention", &linear_attention_cpu_op); }

}  // namespace velodiff
