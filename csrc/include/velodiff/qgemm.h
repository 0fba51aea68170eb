// Quantized GEMM family (SVDQuant W4A4 with a fused low-rank branch; naive W4A4 and W8A8 as baselines).
// One packed format, shared by the pure-PyTorch reference (python/velodiff/ops/reference.py), the CPU kernels
// (csrc/kernels/cpu/qgemm.cpp) and the CUDA kernels (csrc/kernels/cuda/, one file per kernel: qgemm_device.cuh).
//
// ---------------------------------------------------------------------------------------------------------
// Notation: x [M, K] activations (M tokens), W [N, K] weights (torch's nn.Linear layout), y = x W^T [M, N].
// G = 64 is the quantization group along K; Kp = ceil(K / 64) * 64; ng = Kp / 64 groups.
//
// Packed integers (weights and activations alike, "rows" = N or M), `bits` in {4, 8}:
//   bits = 4: uint8 [rows, Kp / 2]. Byte j of a row holds element 2j in bits 0..3 (low nibble) and element
//             2j + 1 in bits 4..7, each a two's-complement signed 4-bit code in [-8, 7]. So a 32-bit word holds
//             8 consecutive K elements, lowest K in the lowest bits: the operand order of PTX
//             mma.m16n8k64.s4 fragments, loadable without a shuffle.
//   bits = 8: int8 [rows, Kp], one signed code in [-128, 127] per element.
//   Elements k >= K (padding) are code 0.
// Scales: one per (row, group).
//   activation scales `ascales`: float32 [M, ng];   weight scales `wscales`: [N, ng] in the model dtype T.
//
// Activation quantization (velodiff::quantize_act), bit-exact in every implementation:
//   v[m,k]   = float(x[m,k]) / smooth[k]         (IEEE fp32 division; v = float(x) without smoothing)
//   amax     = max_{k in group g} |v[m,k]|        (padding counts as 0)
//   s[m,g]   = amax / Q                           (fp32 division; Q = 7 for 4 bits, 127 for 8 bits)
//   q[m,k]   = s == 0 ? 0 : clamp(rint(v / s), -Q-1, Q)   (fp32 division, round half to even)
//   lora_act[m,r] = sum_k float(x[m,k]) * float(lora_down[k,r])   (fp32; the *unsmoothed* x: lora_down is
//                   stored as L1 / smooth, SVDQuant's "unsmoothed down projection", so LoRA A matrices can be
//                   appended unchanged)
// Weight quantization (offline, python/velodiff/quant) uses the same rule per (n, g) with the residual
// weight R = W * smooth - L2 L1^T, and stores wscales in the model dtype.
//
// GEMM (velodiff::qgemm), fp32 accumulation:
//   acc[m,n] = sum_g ascales[m,g] * float(wscales[n,g]) * float(sum_{k in g} qx[m,k] * qw[n,k])   (int32 inner)
//            + float(bias[n])
//            + sum_r lora_act[m,r] * lora_scales[r] * float(lora_up[n,r])
//   y[m,n]   = T(act(acc[m,n]))   act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 SiLU
// SVDQuant (Li et al. 2025, eq. 5): X W^T = (X / lambda)(W * lambda)^T ~= X (L1/lambda) L2^T + Q(X/lambda) Q(R)^T.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

namespace velodiff {

constexpr int kQGroup = 64;

enum class QDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class QActivation : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// Which tensor-core instruction computes the 4-bit group dot products on CUDA (the results are bit-identical:
// every path gets the exact integer group dots, scaled by powers of two that are undone exactly, and rounds
// acc += dot * (ascale * wscale) in the same order; only the speed differs; 8-bit GEMMs always use s8). Chosen
// per call by the glue from VELODIFF_QGEMM_TC.
//   kAuto: kS4 below sm_90, kS8 on sm_90 and later (Hopper has no int4 tensor cores).
//   kS4:   mma.sync m16n8k64 .s4 (sm_80..sm_89 only).
//   kS8:   4-bit storage, codes unpacked in registers to s8 (x16), mma.sync m16n8k32 .s8, int32 dot.
//   kE4M3: 4-bit storage, codes unpacked in registers to e4m3 (value code * 2^-9, exact: see qgemm_device.cuh),
//          mma.sync m16n8k32 .e4m3 with fp32 accumulation (sm_89 and later).
//   kWgmmaS8, kWgmmaE4M3: the same two unpackings into shared memory for Hopper's warpgroup MMA
//          (wgmma.mma_async m64n128k32; sm_90 only, and only in a build that has sm_90a code).
enum class QTensorPath : int { kAuto = 0, kS4 = 1, kS8 = 2, kE4M3 = 3, kWgmmaS8 = 4, kWgmmaE4M3 = 5 };

inline int64_t qgemm_padded_k(int64_t k) { return (k + kQGroup - 1) / kQGroup * kQGroup; }

// velodiff::quantize_act. Pointers are contiguous row-major; optional ones may be null.
struct QuantizeActArgs {
  const void* x = nullptr;          // [M, K] of dtype
  QDtype dtype = QDtype::kFloat32;  // dtype of x and lora_down
  const float* smooth = nullptr;    // [K] or null
  const void* lora_down = nullptr;  // [K, R] of dtype, or null (R = 0)
  void* qx = nullptr;               // bits 4: uint8 [M, Kp/2]; bits 8: int8 [M, Kp]
  float* ascales = nullptr;         // [M, Kp/64]
  float* lora_act = nullptr;        // [M, R] (unused when R = 0)
  int64_t M = 0, K = 0, R = 0;
  int bits = 4;
};

// velodiff::qgemm.
struct QGemmArgs {
  const void* qx = nullptr;           // packed activations, as QuantizeActArgs::qx
  const float* ascales = nullptr;     // [M, ng]
  const void* qw = nullptr;           // packed weights: bits 4: uint8 [N, Kp/2]; bits 8: int8 [N, Kp]
  const void* wscales = nullptr;      // [N, ng] of dtype
  const void* bias = nullptr;         // [N] of dtype, or null
  const float* lora_act = nullptr;    // [M, R] or null (R = 0)
  const void* lora_up = nullptr;      // [N, R] of dtype, or null
  const float* lora_scales = nullptr; // [R] or null (all ones)
  void* y = nullptr;                  // [M, N] of dtype
  QDtype dtype = QDtype::kFloat32;    // model dtype: wscales, bias, lora_up, y
  int64_t M = 0, N = 0, K = 0, R = 0; // K = Kp, the padded width (a multiple of 64)
  int bits = 4;
  QActivation activation = QActivation::kNone;
  QTensorPath tensor_path = QTensorPath::kAuto;  // CUDA only; the CPU kernel ignores it
  int wgmma_rows = 0;  // CUDA wgmma paths only: CTA rows, 64 (one warpgroup, two CTAs per SM; 0 = this) or 128
  // CPU only: the weights (qw, wscales, bias, lora_up) already in the kernel's internal panel layout
  // (qgemm_pack_weights_cpu), or null. A pack made on another code path is ignored (the call packs its own).
  const void* packed = nullptr;
  int64_t packed_bytes = 0;
};

}  // namespace velodiff
