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
                        const std::optional<at::Tensor>& lora_scales, int64_t bits, int64_t activation,
                        const std::optional<at::Tensor>& packed) {
  at::Tensor y;
  QGemmArgs a = prepare_qgemm(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits, activation, y);
  if (packed.has_value()) {
    TORCH_CHECK_VALUE(packed->dim() == 1, "qgemm: packed must be 1-D (from velodiff.ops.qgemm_pack), got shape ",
                      packed->sizes());
    check_qtensor("qgemm", "packed", *packed, at::kByte, {packed->numel()}, qx.device());
    a.packed = packed->data_ptr();
    a.packed_bytes = packed->numel();
  }
  char error[256] = {0};
  TORCH_CHECK(qgemm_cpu(a, error), error);
  return y;
}

// The weights of a qgemm in the CPU kernel's panel layout (qgemm_pack_weights_cpu): qw, wscales, bias and lora_up
// as qgemm takes them (N from qw, R from lora_up).
at::Tensor qgemm_pack_cpu_op(const at::Tensor& qw, const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& lora_up, int64_t bits) {
  const char* op = "qgemm_pack";
  check_qbits(op, bits);
  const at::ScalarType code = qcode_dtype(bits);
  TORCH_CHECK_TYPE(qw.scalar_type() == code, op, ": qw must be ", qdtype_name(code), " for bits=", bits, ", got ",
                   qdtype_name(qw.scalar_type()));
  TORCH_CHECK_VALUE(qw.dim() == 2, op, ": qw must be 2-D [N, Kp", bits == 4 ? "/2" : "", "], got shape ",
                    qw.sizes());
  const int64_t N = qw.size(0), width = qw.size(1), Kp = bits == 4 ? 2 * width : width, ng = Kp / kQGroup;
  TORCH_CHECK_VALUE(Kp % kQGroup == 0, op, ": qw must have a whole number of groups of 64 codes per row, got ", width,
                    " columns");
  const at::Device dev = qw.device();
  check_qtensor(op, "qw", qw, code, {N, width}, dev);
  const QDtype dt = qdtype_of(op, "wscales", wscales);
  check_qtensor(op, "wscales", wscales, wscales.scalar_type(), {N, ng}, dev);
  if (bias.has_value()) check_qtensor(op, "bias", *bias, wscales.scalar_type(), {N}, dev);
  int64_t R = 0;
  if (lora_up.has_value()) {
    TORCH_CHECK_VALUE(lora_up->dim() == 2 && lora_up->size(0) == N, op, ": lora_up must have shape [", N,
                      ", R], got ", lora_up->sizes());
    R = lora_up->size(1);
    check_qtensor(op, "lora_up", *lora_up, wscales.scalar_type(), {N, R}, dev);
  }
  QGemmArgs a;
  a.qw = qw.data_ptr();
  a.wscales = wscales.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.lora_up = R > 0 ? lora_up->data_ptr() : nullptr;
  a.dtype = dt;
  a.N = N;
  a.K = Kp;
  a.R = R;
  a.bits = static_cast<int>(bits);
  char error[256] = {0};
  int64_t bytes = 0;
  TORCH_CHECK(qgemm_packed_bytes_cpu(a, bytes, error), error);
  at::Tensor out = at::empty({bytes}, qw.options().dtype(at::kByte));
  TORCH_CHECK(qgemm_pack_weights_cpu(a, out.data_ptr(), bytes, error), error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) {
  m.impl("quantize_act", &quantize_act_cpu_op);
  m.impl("qgemm", &qgemm_cpu_op);
  m.impl("qgemm_pack", &qgemm_pack_cpu_op);
}

}  // namespace velodiff
