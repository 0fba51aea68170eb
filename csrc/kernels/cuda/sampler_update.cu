// CUDA kernel of the fused sampler update. Semantics: csrc/include/velodiff/sampler_update.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// One thread per element, grid-stride; the step's coefficients are staged in shared memory. The history
// length K and the model dtype are template parameters so the slot loop unrolls. Guidance rescale adds a
// first pass that reduces per-sample sums (in double) into `workspace` [B, 4].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "velodiff/kernels.h"

namespace velodiff {
namespace {

template <typename T>
__device__ __forceinline__ float load_model(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_model<float>(const float* p, int64_t i) { return __ldg(p + i); }
template <>
__device__ __forceinline__ float load_model<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <>
__device__ __forceinline__ float load_model<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T>
__device__ __forceinline__ float guided(const T* c, const T* u, float w, float delta, int64_t i) {
  const float ci = load_model(c, i);
  if (u == nullptr) return ci;
  const float ui = delta * load_model(u, i);
  return ui + w * (ci - ui);
}

// Per-sample sums of c, c^2, g, g^2 into stats[b*4 + 0..3]. grid = (blocks_per_sample, B).
template <typename T>
__global__ void rescale_stats_kernel(const T* __restrict__ cond, const T* __restrict__ uncond,
                                     const float* __restrict__ coef, int64_t S, double* __restrict__ stats) {
  const int b = blockIdx.y;
  const float w = coef[kCoefW], delta = coef[kCoefDelta];
  double acc[4] = {0, 0, 0, 0};
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < S; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = b * S + j;
    const double c = load_model(cond, i);
    const double g = guided(cond, uncond, w, delta, i);
    acc[0] += c;
    acc[1] += c * c;
    acc[2] += g;
    acc[3] += g * g;
  }
  __shared__ double red[4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int k = 0; k < 4; ++k) {
    double v = acc[k];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) red[k][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    for (int k = 0; k < 4; ++k) {
      double v = lane < nwarps ? red[k][lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) atomicAdd(stats + b * 4 + k, v);
    }
  }
}

__device__ __forceinline__ float rescale_factor(const double* stats, int64_t b, int64_t S, float phi) {
  const double* s = stats + b * 4;
  const double var_c = (s[1] - s[0] * s[0] / S) / (S - 1);
  const double var_g = (s[3] - s[2] * s[2] / S) / (S - 1);
  const double ratio = sqrt(fmax(var_c, 0.0)) / sqrt(fmax(var_g, 0.0));
  return static_cast<float>((1.0 - phi) + phi * ratio);
}

template <typename T, int K>
__global__ void sampler_update_kernel(SamplerUpdateArgs a, const double* __restrict__ stats) {
  constexpr int kN = kCoefHeader + 3 * K;
  __shared__ float cf[kN > 0 ? kN : 1];
  for (int j = threadIdx.x; j < kN; j += blockDim.x) cf[j] = a.coef[j];
  __syncthreads();
  const T* cond = static_cast<const T*>(a.cond);
  const T* uncond = static_cast<const T*>(a.uncond);
  const int64_t S = a.per_sample;
  const int64_t N = a.batch * S;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
    float g = guided(cond, uncond, cf[kCoefW], cf[kCoefDelta], i);
    if (stats != nullptr) g *= rescale_factor(stats, i / S, S, a.guidance_rescale);
    const float xi = a.x[i];
    const float an = a.anchor ? a.anchor[i] : 0.f;
    float d = cf[kCoefPx] * xi + cf[kCoefPm] * g;
    float xn = cf[kCoefCx] * xi + cf[kCoefCz] * (a.noise ? a.noise[i] : 0.f) + cf[kCoefCa] * an;
    float yv = cf[kCoefEx] * xi + cf[kCoefEa] * an;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float h = a.history[k * N + i];
      d += cf[kCoefHeader + k] * h;
      xn += cf[kCoefHeader + K + k] * h;
      yv += cf[kCoefHeader + 2 * K + k] * h;
    }
    a.x_next[i] = xn + cf[kCoefCd] * d;
    if (a.y) a.y[i] = yv + cf[kCoefEd] * d;
    if (a.write_slot >= 0) a.history[a.write_slot * N + i] = d;
  }
}

template <typename T>
cudaError_t launch_typed(const SamplerUpdateArgs& a, double* workspace, cudaStream_t stream) {
  const int threads = 256;
  const int64_t n = a.batch * a.per_sample;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(want < (int64_t)sms * 16 ? (want > 0 ? want : 1) : (int64_t)sms * 16);
  const double* stats = nullptr;
  if (a.guidance_rescale > 0.f) {
    cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(double) * 4 * a.batch, stream);
    if (err != cudaSuccess) return err;
    const int64_t per = (a.per_sample + threads - 1) / threads;
    dim3 grid(static_cast<unsigned>(per < 64 ? per : 64), static_cast<unsigned>(a.batch));
    rescale_stats_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(a.cond),
                                                        static_cast<const T*>(a.uncond), a.coef, a.per_sample,
                                                        workspace);
    stats = workspace;
  }
  const bool launched = dispatch_history(a.history_slots, [&](auto k) {
    sampler_update_kernel<T, decltype(k)::value><<<blocks, threads, 0, stream>>>(a, stats);
  });
  if (!launched) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace

int sampler_update_cuda(const SamplerUpdateArgs& a, double* workspace, void* stream) {
  if (a.write_slot >= a.history_slots || a.write_slot < -1) return cudaErrorInvalidValue;
  if (a.guidance_rescale > 0.f && (a.uncond == nullptr || workspace == nullptr || a.per_sample < 2))
    return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.model_dtype) {
    case ModelDType::kFloat16: return launch_typed<__half>(a, workspace, s);
    case ModelDType::kBFloat16: return launch_typed<__nv_bfloat16>(a, workspace, s);
    default: return launch_typed<float>(a, workspace, s);
  }
}

}  // namespace velodiff
