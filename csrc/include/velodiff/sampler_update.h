// velodiff fused sampler update: the one format shared by the reference (python/velodiff/ops/reference.py),
// the CPU kernel (csrc/kernels/cpu/sampler_update.cpp) and the CUDA kernel (csrc/kernels/cuda/sampler_update.cu).
//
// Every sampler velodiff ships is, per model evaluation, an affine map of a few per-element tensors with
// scalar coefficients that depend only on the schedule (see shared reference notes, section 1). One call of
// the op performs one such map, elementwise over N = B * S elements (B samples of S elements each):
//
//   inputs (all contiguous; B = batch, S = per-sample numel)
//     x        [B, S]      fp32   current state; also the point the model was evaluated at
//     cond     [B, S]      fp16 | bf16 | fp32   model output (the conditional half under CFG)
//     uncond   [B, S]      same dtype as cond, optional   unconditional output, or a residual stock (StreamDiffusion)
//     anchor   [B, S]      fp32, optional   a second state (step-start sample, previous state, last_sample)
//     noise    [B, S]      fp32, optional
//     history  [K, B, S]   fp32, optional, read then written in place: the ring buffer of past predictions
//     coef     [NCOEF(K)]  fp32, on the device of x: the step's coefficients, layout below
//
//   per element (all arithmetic in fp32):
//     g      = uncond ? delta*u + w*(c - delta*u) : c                   (CFG; delta = 1 standard, the residual
//                                                                        scale for StreamDiffusion's RCFG)
//     g      = g * r_b                     when guidance_rescale phi > 0, per sample b (Lin et al. 2305.08891 eq. 15-16):
//                                          r_b = (1 - phi) + phi * std(c_b) / std(g_b), unbiased std over S
//     D      = p_x*x + p_m*g + sum_k q_k*H_k                           (the new prediction: x0, eps, velocity...)
//     x_next = c_x*x + c_a*anchor + c_d*D + sum_k c_k*H_k + c_z*noise
//     y      = e_x*x + e_a*anchor + e_d*D + sum_k e_k*H_k                (second output, only when asked)
//     H[write_slot] = D                                                   (only when write_slot >= 0)
//   H_k are the values *before* this call's write. A missing optional tensor reads as zero.
//
//   coef layout (float32), K = number of history slots (0 when no history):
//     [0] w   [1] delta  [2] p_x  [3] p_m  [4] c_x  [5] c_a  [6] c_d  [7] c_z  [8] e_x  [9] e_a  [10] e_d
//     [11 .. 11+K)        q_k
//     [11+K .. 11+2K)     c_k
//     [11+2K .. 11+3K)    e_k
//
// Coefficients live on the device so a denoising loop does no host sync and can be captured in a CUDA graph;
// samplers precompute the whole [steps, NCOEF] table in float64 on the host and upload it once.
#pragma once

#include <cstdint>
#include <type_traits>

namespace velodiff {

enum SamplerCoef : int {
  kCoefW = 0,
  kCoefDelta = 1,
  kCoefPx = 2,
  kCoefPm = 3,
  kCoefCx = 4,
  kCoefCa = 5,
  kCoefCd = 6,
  kCoefCz = 7,
  kCoefEx = 8,
  kCoefEa = 9,
  kCoefEd = 10,
  kCoefHeader = 11,
};

constexpr int kMaxHistory = 8;  // ring buffer slots a kernel handles; enough for order-5 multistep + momentum

inline constexpr int sampler_coef_count(int K) { return kCoefHeader + 3 * K; }

// Calls f(std::integral_constant<int, K>{}) for a runtime K in [0, kMaxHistory], so kernels can unroll over the
// history slots; returns false for any other K. Shared by the CPU and CUDA launchers.
template <int N = 0, typename F>
inline bool dispatch_history(int K, F&& f) {
  if constexpr (N > kMaxHistory) {
    (void)K;
    (void)f;
    return false;
  } else {
    if (K == N) {
      f(std::integral_constant<int, N>{});
      return true;
    }
    return dispatch_history<N + 1>(K, f);
  }
}

// Model-output storage types the kernels accept.
enum class ModelDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raw pointers and sizes of one call. Optional inputs are nullptr. Torch-free on purpose.
struct SamplerUpdateArgs {
  const float* x = nullptr;
  const void* cond = nullptr;
  const void* uncond = nullptr;
  ModelDType model_dtype = ModelDType::kFloat32;
  const float* anchor = nullptr;
  const float* noise = nullptr;
  float* history = nullptr;  // [K, B, S]
  const float* coef = nullptr;
  float* x_next = nullptr;
  float* y = nullptr;        // nullptr: second output not requested
  int64_t batch = 0;         // B
  int64_t per_sample = 0;    // S
  int history_slots = 0;     // K
  int write_slot = -1;       // -1: do not write
  float guidance_rescale = 0.f;  // phi; > 0 needs uncond
};

}  // namespace velodiff
