// CPU implementation of velodiff::attention (torch glue over csrc/kernels/cpu/attention.cpp).
#include "attention_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor attention_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  at::Tensor out;
  const AttentionArgs a = prepare_attention(q, k, v, key_padding_mask, scale, out);
  if (out.numel() == 0) return out;
  char error[256] = {0};
  TORCH_CHECK(attention_cpu(a, error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) { m.impl("attention", &attention_cpu_op); }

}  // namespace velodiff
