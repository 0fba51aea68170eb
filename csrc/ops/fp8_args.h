// Torch glue shared by the CPU (csrc/ops/fp8.cpp) and CUDA (csrc/ops/fp8_cuda.cpp) implementations of
// velodiff::quantize_fp8 and velodiff::fp8_gemm: every argument is checked (the message names it), the outputs are
// allocated on the inputs' device and the torch-free argument structs of velodiff/fp8.h are filled.
// Errors: TORCH_CHECK_TYPE (Python TypeError) for a wrong dtype, TORCH_CHECK_VALUE (ValueError) for a wrong shape,
// layout, device or value.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <string>

#include "qgemm_args.h"  // qdtype_name, qdtype_of, check_qtensor
#include "velodiff/fp8.h"

namespace velodiff {

// The FP8 format of a code tensor's dtype (torch.float8_e4m3fn or torch.float8_e5m2).
inline Fp8Format fp8_format_of(const char* op, const char* name, const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat8_e4m3fn) return Fp8Format::kE4M3;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat8_e5m2, op, ": ", name,
                   " must be float8_e4m3fn or float8_e5m2 (FP8 codes), got ", qdtype_name(t.scalar_type()));
  return Fp8Format::kE5M2;
}

// velodiff::quantize_fp8. x [M, K] float32 | float16 | bfloat16 contiguous; format "e4m3" or "e5m2". Allocates on
// x's device codes [M, K] (float8_e4m3fn | float8_e5m2) and scales float32 [M]; returns the filled args.
inline QuantizeFp8Args prepare_quantize_fp8(const at::Tensor& x, const std::string& format, at::Tensor& codes,
                                            at::Tensor& scales) {
  const char* op = "quantize_fp8";
  const QDtype dt = qdtype_of(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K] (flatten leading dimensions), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK_VALUE(format == "e4m3" || format == "e5m2", op, ": format must be 'e4m3' or 'e5m2', got '", format,
                    "'");
  const bool e4 = format == "e4m3";
  codes = at::empty(x.sizes(), x.options().dtype(e4 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2));
  scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  QuantizeFp8Args a;
  a.x = x.data_ptr();
  a.dtype = dt;
  a.codes = static_cast<uint8_t*>(codes.data_ptr());
  a.scales = scales.data_ptr<float>();
  a.M = x.size(0);
  a.K = x.size(1);
  a.format = e4 ? Fp8Format::kE4M3 : Fp8Format::kE5M2;
  return a;
}

// velodiff::fp8_gemm. a [M, K] FP8 codes; w [N, K] FP8 codes (either format each), or with w_table (float8_e4m3fn
// [16]) uint8 [N, ceil(K / 2)] 4-bit indices into it; ascales float32 [M], wscales float32 [N]; bias None or
// out_dtype [N]; out_dtype float32 | float16 | bfloat16; activation 0 none, 1 gelu, 2 gelu_tanh, 3 silu; everything
// contiguous and on a's device. Allocates y out_dtype [M, N]; returns the filled args.
inline Fp8GemmArgs prepare_fp8_gemm(const at::Tensor& a, const at::Tensor& ascales, const at::Tensor& w,
                                    const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                                    at::ScalarType out_dtype, int64_t activation,
                                    const std::optional<at::Tensor>& w_table, at::Tensor& y) {
  const char* op = "fp8_gemm";
  const at::Device dev = a.device();
  const Fp8Format af = fp8_format_of(op, "a", a);
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": a must be 2-D [M, K], got shape ", a.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = w.dim() == 2 ? w.size(0) : -1;
  Fp8Format wf = Fp8Format::kE4M3;
  if (w_table.has_value()) {
    TORCH_CHECK_TYPE(w.scalar_type() == at::kByte, op, ": w must be uint8 (4-bit indices) when w_table is given, got ",
                     qdtype_name(w.scalar_type()));
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == (K + 1) / 2, op, ": w must have shape [N, ", (K + 1) / 2,
                      "] (two 4-bit indices per byte, K = a.shape[1]), got ", w.sizes());
    check_qtensor(op, "w_table", *w_table, at::kFloat8_e4m3fn, {16}, dev);
  } else {
    wf = fp8_format_of(op, "w", w);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == K, op, ": w must have shape [N, ", K, "] (K = a.shape[1]), got ",
                      w.sizes());
  }
  check_qtensor(op, "a", a, a.scalar_type(), {M, K}, dev);
  check_qtensor(op, "w", w, w.scalar_type(), {N, w.size(1)}, dev);
  check_qtensor(op, "ascales", ascales, at::kFloat, {M}, dev);
  check_qtensor(op, "wscales", wscales, at::kFloat, {N}, dev);
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
                   ": out_dtype must be float32, float16 or bfloat16, got ", qdtype_name(out_dtype));
  if (bias.has_value()) check_qtensor(op, "bias", *bias, out_dtype, {N}, dev);
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 3, op,
                    ": activation must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got ", activation);
  y = at::empty({M, N}, a.options().dtype(out_dtype));
  Fp8GemmArgs g;
  g.a = static_cast<const uint8_t*>(a.data_ptr());
  g.ascales = ascales.data_ptr<float>();
  g.w = static_cast<const uint8_t*>(w.data_ptr());
  g.wscales = wscales.data_ptr<float>();
  g.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  g.y = y.data_ptr();
  g.out_dtype = out_dtype == at::kFloat ? QDtype::kFloat32 : out_dtype == at::kHalf ? QDtype::kFloat16
                                                                                     : QDtype::kBFloat16;
  g.a_format = af;
  g.w_format = wf;
  g.activation = static_cast<QActivation>(activation);
  g.M = M;
  g.N = N;
  g.K = K;
  g.w_table = w_table.has_value() ? static_cast<const uint8_t*>(w_table->data_ptr()) : nullptr;
  return g;
}

}  // namespace velodiff
