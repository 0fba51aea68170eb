// CPU implementation of velodiff::window_attention (torch glue over csrc/kernels/cpu/window_attention.cpp).
#include "velodiff/kernels.h"
#include "window_attention_args.h"

namespace velodiff {
namespace {

at::Tensor window_attention_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   c10::IntArrayRef size, c10::IntArrayRef window, c10::IntArrayRef shift,
                                   std::optional<double> scale) {
  at::Tensor out;
  const WindowAttentionArgs a = prepare_window_attention(q, k, v, size, window, shift, scale, out);
  if (out.numel() == 0) return out;
  char error[256] = {0};
  TORCH_CHECK(window_attention_cpu(a, error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) { m.impl("window_attention", &window_attention_cpu_op); }

}  // namespace velodiff
