// CPU implementation of velodiff::quantize_act and velodiff::qgemm (torch glue over csrc/kernels/cpu/qgemm.cpp).
#include "qgemm_args.h"
#include "velodiff/kernels.h"

#include <tuple>

namespace velodiff {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cpu_op(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& smooth,
                                                                   const std::optional<at::Tensor>& lora_down,
                                                                   int64_t bits) {
  at::Tensor qx, ascales, lora_act;
  const QuantizeActArgs a =
      prepare_quantize_act(x, smooth, lora_down, bits, /*zero_lora_act=*/false, qx, ascales, lora_act);
  char error[256] = {0};
  TORCH_CHECK(quantize_act_cpu(a, error), error);
  return {qx, ascales, lora_act};
}

at::Tensor qgemm_cpu_op(const at::Tensor& qx, const at::Tensor& ascales, const at::Tensor& qw,
                        const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& lora_act, const std::optional<at::Tensor>& lora_up,
                        const std::optional<at::Tensor>& lora_scales, int64_t bits, int64_t activation) {
  at::Tensor y;
  const QGemmArgs a =
      prepare_qgemm(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits, activation, y);
  char error[256] = {0};
  TORCH_CHECK(qgemm_cpu(a, error), error);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) {
  m.impl("quantize_act", &quantize_act_cpu_op);
  m.impl("qgemm", &qgemm_cpu_op);
}

}  // namespace velodiff
