// The one registry of velodiff ops: every schema lives in this TORCH_LIBRARY block; implementations are
// registered per dispatch key in csrc/ops/. Also the pybind11 module velodiff._C (build information).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "velodiff/kernels.h"

#ifndef VELODIFF_CUDA_ARCHS
#define VELODIFF_CUDA_ARCHS ""
#endif
#ifndef VELODIFF_TORCH_VERSION
#define VELODIFF_TORCH_VERSION ""
#endif

TORCH_LIBRARY(velodiff, m) {
  // Fused sampler update; semantics and coefficient layout in csrc/include/velodiff/sampler_update.h.
  m.def(
      "sampler_update(Tensor x, Tensor cond, Tensor? uncond, Tensor? anchor, Tensor? noise, Tensor(a!)? history, "
      "Tensor coef, int write_slot, float guidance_rescale, bool want_y) -> (Tensor, Tensor)");
  // Quantized GEMM family (SVDQuant W4A4 + low-rank branch, W8A8); format in csrc/include/velodiff/qgemm.h.
  // quantize_act -> (qx packed, ascales [M, Kp/64] fp32, lora_act [M, R] fp32)
  m.def("quantize_act(Tensor x, Tensor? smooth, Tensor? lora_down, int bits) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qgemm(Tensor qx, Tensor ascales, Tensor qw, Tensor wscales, Tensor? bias, Tensor? lora_act, "
      "Tensor? lora_up, Tensor? lora_scales, int bits, int activation, Tensor? packed=None) -> Tensor");
  // CPU only: the weights of qgemm in the CPU kernel's panel layout for the current code path (uint8 [bytes];
  // empty on the portable path), passed back to qgemm as `packed` so that calls skip the repacking.
  m.def("qgemm_pack(Tensor qw, Tensor wscales, Tensor? bias, Tensor? lora_up, int bits) -> Tensor");
  // FP8 W8A8 GEMM family; format, rounding and the GEMM formula in csrc/include/velodiff/fp8.h.
  // quantize_fp8 -> (codes [M, K] float8_e4m3fn | float8_e5m2, scales float32 [M]): dynamic per-row scales.
  // fp8_gemm with w_table (float8_e4m3fn [16]): w is uint8 [N, ceil(K/2)], 4-bit indices into the table (W4A8).
  m.def("quantize_fp8(Tensor x, str format=\"e4m3\") -> (Tensor, Tensor)");
  m.def(
      "fp8_gemm(Tensor a, Tensor ascales, Tensor w, Tensor wscales, Tensor? bias, ScalarType out_dtype, "
      "int activation=0, Tensor? w_table=None) -> Tensor");
  // Cache gate: relative-L1 distance of a probe to the stored one, rescale, accumulation, decision; stored and
  // state are updated in place, the decision is returned as int32 [1]; format in csrc/include/velodiff/cache_gate.h.
  m.def(
      "cache_gate(Tensor probe, Tensor(a!) stored, Tensor(b!) state, float threshold, float[] coefficients, "
      "int flags) -> Tensor");
  // Exact softmax attention, flash-style (online softmax, fp32 accumulation): q [B, H, Lq, D], k [B, H, Lk, D],
  // v [B, H, Lk, Dv], any strides; key_padding_mask bool [B, Lk] (True = attend); scale default 1/sqrt(D);
  // returns [B, H, Lq, Dv] in q's dtype; format in csrc/include/velodiff/attention.h.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float? scale=None) -> Tensor");
  // FP8 attention: the arguments and output of attention; Q, K, P, V in e4m3 with fp32 accumulation, semantics in
  // csrc/include/velodiff/fp8.h.
  m.def("fp8_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float? scale=None) -> Tensor");
  // Non-causal linear attention, two passes over an fp32 state: q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv],
  // any strides; kind "linfusion" (phi = elu + 1, mean-normalised, eps default 1e-4) or "relu" (SANA's LiteLA:
  // phi = relu, sum-normalised, eps default 1e-8); returns [B, H, Nq, Dv] in q's dtype; format in
  // csrc/include/velodiff/linear_attention.h.
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, str kind=\"linfusion\", float? eps=None) -> Tensor");
  // Windowed self-attention (HiDiffusion's MSW-MSA): q, k [B, H, L, D], v [B, H, L, Dv] over an h x w token map
  // (size, L = h * w), windows of (Wh, Ww) tokens after a cyclic shift (sy, sx) >= 0, padding past the map's edge
  // dropped; returns [B, H, L, Dv] in q's dtype; format in csrc/include/velodiff/window_attention.h.
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[] size, int[] window, int[] shift=[0, 0], "
      "float? scale=None) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "velodiff native kernels; importing this module registers the torch.ops.velodiff ops";
  m.def("build_info", []() {
    py::dict d;
#ifdef VELODIFF_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cuda_archs"] = VELODIFF_CUDA_ARCHS;
    d["torch_version"] = VELODIFF_TORCH_VERSION;
    py::dict paths;  // the CPU kernels' code paths on this machine, now
    paths["attention"] = velodiff::attention_cpu_path();
    paths["qgemm"] = velodiff::qgemm_cpu_path();
    paths["linear_attention"] = velodiff::linear_attention_cpu_path();
    paths["fp8_gemm"] = velodiff::fp8_gemm_cpu_path();
    d["cpu_paths"] = paths;
    return d;
  });
}
