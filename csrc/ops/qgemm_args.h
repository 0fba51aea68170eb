// Torch glue shared by the CPU (csrc/ops/qgemm.cpp) and CUDA (csrc/ops/qgemm_cuda.cpp) implementations of
// velodiff::quantize_act and velodiff::qgemm: every argument is checked (the message names it), the outputs are
// allocated on the inputs' device and the torch-free argument structs of velodiff/qgemm.h are filled.
//
// Usage in a backend's op (after a device guard for CUDA):
//
//   at::Tensor qx, ascales, lora_act;
//   QuantizeActArgs a = prepare_quantize_act(x, smooth, lora_down, bits, /*zero_lora_act=*/true,
//                                            qx, ascales, lora_act);
//   ... launch quantize_act_cuda(a, stream) ...
//   return {qx, ascales, lora_act};
//
//   at::Tensor y;
//   QGemmArgs g = prepare_qgemm(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits,
//                               activation, y);
//   ... launch qgemm_cuda(g, stream) ...
//   return y;
//
// Errors: TORCH_CHECK_TYPE (Python TypeError) for a wrong dtype, TORCH_CHECK_VALUE (ValueError) for a wrong
// shape, layout, device or value.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

#include "velodiff/qgemm.h"

namespace velodiff {

// Python names of the dtypes used here (c10 prints uint8 / int8 as "Byte" / "Char").
inline const char* qdtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

// The model dtype of `t` (float32, float16 or bfloat16); `op` and `name` go into the error message.
inline QDtype qdtype_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return QDtype::kFloat32;
    case at::kHalf: return QDtype::kFloat16;
    case at::kBFloat16: return QDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                       qdtype_name(t.scalar_type()));
  }
  return QDtype::kFloat32;
}

// `t` is a contiguous tensor of dtype `dtype` and shape `shape` on `device`.
inline void check_qtensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                          at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", qdtype_name(dtype), ", got ",
                   qdtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but must be on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_qbits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
}

// The packed code dtype of `bits`: uint8 (two int4 codes a byte) or int8.
inline at::ScalarType qcode_dtype(int64_t bits) { return bits == 4 ? at::kByte : at::kChar; }

// velodiff::quantize_act. x [M, K] float32 | float16 | bfloat16 contiguous; smooth None or float32 [K];
// lora_down None or [K, R] of x's dtype; bits 4 or 8. Allocates on x's device:
//   qx       bits 4: uint8 [M, Kp/2]; bits 8: int8 [M, Kp]
//   ascales  float32 [M, Kp/64]
//   lora_act float32 [M, R] ([M, 0] without lora_down), zero-filled when `zero_lora_act` (the CUDA kernel adds
//            partial sums atomically; the CPU kernel writes every element and passes false)
// and returns the filled QuantizeActArgs.
inline QuantizeActArgs prepare_quantize_act(const at::Tensor& x, const std::optional<at::Tensor>& smooth,
                                            const std::optional<at::Tensor>& lora_down, int64_t bits,
                                            bool zero_lora_act, at::Tensor& qx, at::Tensor& ascales,
                                            at::Tensor& lora_act) {
  const char* op = "quantize_act";
  const QDtype dt = qdtype_of(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K] (flatten leading dimensions), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  check_qbits(op, bits);
  const int64_t M = x.size(0), K = x.size(1), Kp = qgemm_padded_k(K);
  if (smooth.has_value()) check_qtensor(op, "smooth", *smooth, at::kFloat, {K}, x.device());
  int64_t R = 0;
  if (lora_down.has_value()) {
    TORCH_CHECK_VALUE(lora_down->dim() == 2 && lora_down->size(0) == K, op, ": lora_down must have shape [", K,
                      ", R], got ", lora_down->sizes());
    R = lora_down->size(1);
    check_qtensor(op, "lora_down", *lora_down, x.scalar_type(), {K, R}, x.device());
  }
  qx = at::empty({M, bits == 4 ? Kp / 2 : Kp}, x.options().dtype(qcode_dtype(bits)));
  ascales = at::empty({M, Kp / kQGroup}, x.options().dtype(at::kFloat));
  lora_act = zero_lora_act ? at::zeros({M, R}, x.options().dtype(at::kFloat))
                           : at::empty({M, R}, x.options().dtype(at::kFloat));
  QuantizeActArgs a;
  a.x = x.data_ptr();
  a.dtype = dt;
  a.smooth = smooth.has_value() ? smooth->data_ptr<float>() : nullptr;
  a.lora_down = lora_down.has_value() ? lora_down->data_ptr() : nullptr;
  a.qx = qx.data_ptr();
  a.ascales = ascales.data_ptr<float>();
  a.lora_act = R > 0 ? lora_act.data_ptr<float>() : nullptr;
  a.M = M;
  a.K = K;
  a.R = R;
  a.bits = static_cast<int>(bits);
  return a;
}

// velodiff::qgemm. With Kp = 64 * ng:
//   qx [M, Kp/2] uint8 (bits 4) | [M, Kp] int8 (bits 8);  ascales float32 [M, ng];
//   qw [N, Kp/2] uint8 | [N, Kp] int8;                     wscales [N, ng] of the model dtype T;
//   bias None or T [N]; lora_act float32 [M, R] and lora_up T [N, R] both given or both None;
//   lora_scales None (ones) or float32 [R], only with lora_act; activation 0 none, 1 gelu, 2 gelu_tanh, 3 silu;
//   everything contiguous and on qx's device.
// Allocates y T [M, N] on qx's device and returns the filled QGemmArgs (K = Kp).
inline QGemmArgs prepare_qgemm(const at::Tensor& qx, const at::Tensor& ascales, const at::Tensor& qw,
                               const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& lora_act, const std::optional<at::Tensor>& lora_up,
                               const std::optional<at::Tensor>& lora_scales, int64_t bits, int64_t activation,
                               at::Tensor& y) {
  const char* op = "qgemm";
  check_qbits(op, bits);
  const at::ScalarType code = qcode_dtype(bits);
  const at::Device dev = qx.device();
  TORCH_CHECK_TYPE(qx.scalar_type() == code, op, ": qx must be ", qdtype_name(code), " for bits=", bits, ", got ",
                   qdtype_name(qx.scalar_type()));
  TORCH_CHECK_VALUE(qx.dim() == 2, op, ": qx must be 2-D [M, Kp", bits == 4 ? "/2" : "", "], got shape ",
                    qx.sizes());
  TORCH_CHECK_VALUE(qx.is_contiguous(), op, ": qx must be contiguous");
  const int64_t M = qx.size(0), width = qx.size(1), Kp = bits == 4 ? 2 * width : width;
  TORCH_CHECK_VALUE(Kp % kQGroup == 0, op, ": qx must have a whole number of groups of 64 codes per row (",
                    bits == 4 ? "32 bytes" : "64 bytes", " each), got ", width, " columns");
  const int64_t ng = Kp / kQGroup;
  check_qtensor(op, "ascales", ascales, at::kFloat, {M, ng}, dev);
  TORCH_CHECK_TYPE(qw.scalar_type() == code, op, ": qw must be ", qdtype_name(code), " for bits=", bits, ", got ",
                   qdtype_name(qw.scalar_type()));
  TORCH_CHECK_VALUE(qw.dim() == 2 && qw.size(1) == width, op, ": qw must have shape [N, ", width,
                    "] (the packed width of qx), got ", qw.sizes());
  const int64_t N = qw.size(0);
  check_qtensor(op, "qw", qw, code, {N, width}, dev);
  const QDtype dt = qdtype_of(op, "wscales", wscales);
  const at::ScalarType T = wscales.scalar_type();
  check_qtensor(op, "wscales", wscales, T, {N, ng}, dev);
  if (bias.has_value()) check_qtensor(op, "bias", *bias, T, {N}, dev);
  TORCH_CHECK_VALUE(lora_act.has_value() == lora_up.has_value(), op,
                    ": lora_act and lora_up must be given together (got lora_act ",
                    lora_act.has_value() ? "set" : "None", ", lora_up ", lora_up.has_value() ? "set" : "None", ")");
  int64_t R = 0;
  if (lora_act.has_value()) {
    TORCH_CHECK_VALUE(lora_act->dim() == 2 && lora_act->size(0) == M, op, ": lora_act must have shape [", M,
                      ", R], got ", lora_act->sizes());
    R = lora_act->size(1);
    check_qtensor(op, "lora_act", *lora_act, at::kFloat, {M, R}, dev);
    check_qtensor(op, "lora_up", *lora_up, T, {N, R}, dev);
  }
  if (lora_scales.has_value()) {
    TORCH_CHECK_VALUE(lora_act.has_value(), op, ": lora_scales needs lora_act and lora_up");
    check_qtensor(op, "lora_scales", *lora_scales, at::kFloat, {R}, dev);
  }
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 3, op,
                    ": activation must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got ", activation);
  y = at::empty({M, N}, wscales.options());
  QGemmArgs a;
  a.qx = qx.data_ptr();
  a.ascales = ascales.data_ptr<float>();
  a.qw = qw.data_ptr();
  a.wscales = wscales.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.lora_act = R > 0 ? lora_act->data_ptr<float>() : nullptr;
  a.lora_up = R > 0 ? lora_up->data_ptr() : nullptr;
  a.lora_scales = R > 0 && lora_scales.has_value() ? lora_scales->data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.dtype = dt;
  a.M = M;
  a.N = N;
  a.K = Kp;
  a.R = R;
  a.bits = static_cast<int>(bits);
  a.activation = static_cast<QActivation>(activation);
  return a;
}

}  // namespace velodiff
