// CUDA kernels of velodiff::quantize_fp8 and velodiff::fp8_gemm (format and formulas in velodiff/fp8.h).
//
// Written simple and correct first (no GPU has measured them yet; tensor-core versions, mma.sync e4m3 on sm_89 and
// wgmma on sm_90a as qgemm's paths do, come with one):
//  * quantize_fp8: one 256-thread block per row: a NaN-propagating max-reduction of |x|, then every element
//    encoded with encode_fp8 after an IEEE division (__fdiv_rn: the build uses --use_fast_math), the arithmetic of
//    the CPU kernel and the reference, so all three give the same codes and scales.
//  * fp8_gemm: 64 x 64 output tiles, 256 threads of 4 x 4 outputs; K in steps of 32, the codes of both operands
//    decoded (exactly, decode_fp8; 4-bit weights through their table) into fp32 shared-memory tiles; fp32 FMAs;
//    the epilogue as on the CPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_io.cuh"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int kQThreads = 256;

__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

template <QDtype DT>
__global__ void quantize_fp8_kernel(QuantizeFp8Args p) {
  const int64_t m = blockIdx.x;
  const int64_t row = m * p.K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < p.K; k += kQThreads)
    amax = nan_max(amax, fabsf(load_f<static_cast<AttnDType>(DT)>(p.x, row + k)));
  for (int o = 16; o > 0; o >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  __shared__ float warp_max[kQThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int i = 1; i < kQThreads / 32; ++i) amax = nan_max(amax, warp_max[i]);
  const float s = __fdiv_rn(amax, fp8_max(p.format));
  if (threadIdx.x == 0) p.scales[m] = s;
  for (int64_t k = threadIdx.x; k < p.K; k += kQThreads) {
    const float v = load_f<static_cast<AttnDType>(DT)>(p.x, row + k);
    p.codes[row + k] = s == 0.f ? 0 : encode_fp8(__fdiv_rn(v, s), p.format);
  }
}

constexpr int kBM = 64, kBN = 64, kBK = 32, kGThreads = 256;

template <QDtype DT>
__global__ void __launch_bounds__(kGThreads) fp8_gemm_kernel(Fp8GemmArgs p) {
  __shared__ float as[kBK][kBM + 1];
  __shared__ float ws[kBK][kBN + 1];
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;  // this thread: rows tr + 16 i, cols tc + 16 j
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
    for (int i = tid; i < kBM * kBK; i += kGThreads) {
      const int r = i / kBK, k = i % kBK;
      const int64_t gm = m0 + r, gn = n0 + r, gk = k0 + k;
      as[k][r] = gm < p.M && gk < p.K ? decode_fp8(p.a[gm * p.K + gk], p.a_format) : 0.f;
      ws[k][r] = gn < p.N && gk < p.K ? decode_fp8(fp8_weight_code(p, gn, gk), p.w_format) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      float av[4], wv[4];
      for (int i = 0; i < 4; ++i) av[i] = as[k][tr + 16 * i];
      for (int j = 0; j < 4; ++j) wv[j] = ws[k][tc + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tr + 16 * i;
    if (m >= p.M) continue;
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tc + 16 * j;
      if (n >= p.N) continue;
      float v = acc[i][j] * (p.ascales[m] * p.wscales[n]);
      if (p.bias != nullptr) v += load_f<static_cast<AttnDType>(DT)>(p.bias, n);
      store_f<static_cast<AttnDType>(DT)>(p.y, m * p.N + n, activate(v, static_cast<int>(p.activation)));
    }
  }
}

}  // namespace

int quantize_fp8_cuda(const QuantizeFp8Args& a, void* stream) {
  if (a.M == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case QDtype::kFloat16: quantize_fp8_kernel<QDtype::kFloat16><<<a.M, kQThreads, 0, s>>>(a); break;
    case QDtype::kBFloat16: quantize_fp8_kernel<QDtype::kBFloat16><<<a.M, kQThreads, 0, s>>>(a); break;
    default: quantize_fp8_kernel<QDtype::kFloat32><<<a.M, kQThreads, 0, s>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

int fp8_gemm_cuda(const Fp8GemmArgs& a, void* stream) {
  if (a.M == 0 || a.N == 0) return 0;
  if ((a.M + kBM - 1) / kBM > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>((a.N + kBN - 1) / kBN), static_cast<unsigned>((a.M + kBM - 1) / kBM));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.out_dtype) {
    case QDtype::kFloat16: fp8_gemm_kernel<QDtype::kFloat16><<<grid, kGThreads, 0, s>>>(a); break;
    case QDtype::kBFloat16: fp8_gemm_kernel<QDtype::kBFloat16><<<grid, kGThreads, 0, s>>>(a); break;
    default: fp8_gemm_kernel<QDtype::kFloat32><<<grid, kGThreads, 0, s>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace velodiff
