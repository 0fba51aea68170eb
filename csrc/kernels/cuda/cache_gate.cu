// CUDA kernel of the cache gate. Semantics: csrc/include/velodiff/cache_gate.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// Two launches on the caller's stream, no host synchronisation (a step can be captured in a CUDA graph):
//   1. cache_gate_partial_kernel, grid (blocks per sample, B): every block reads the valid index from state on
//      the device, copies its share of the probe into the spare buffer stored[w] and, with a reference, sums
//      |p - s| and |s| in fp64 over its share (a fixed grid-stride split that depends only on S), reduces them
//      over the block in a fixed order (warp shuffles, then warp 0) and writes the pair to the workspace.
//      No atomics: the result does not depend on scheduling.
//   2. cache_gate_finalize_kernel, one block: adds each sample's partials in block order, takes d_b with the
//      0/0 guard and the NaN-propagating max over samples, then thread 0 runs cache_gate_finish (the polynomial,
//      the accumulation, the decision) in fp64 and writes state and the decision.
// Simple first version (scalar coalesced loads, 4 in flight per thread); not yet timed on a GPU.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int kThreads = kCacheGateCudaThreads;
constexpr int kUnroll = kCacheGateCudaUnroll;
constexpr int kWarps = kThreads / 32;

// Values are widened with cache_gate_f64 (velodiff/cache_gate.h): the build's --use_fast_math turns on -ftz, under
// which a plain cast can compile to cvt.ftz.f64.f32 and read a subnormal probe (bf16 or fp32) as zero.
__device__ __forceinline__ double exact_f64(float x) { return cache_gate_f64(x); }

struct LoadF32 {
  using T = float;
  __device__ __forceinline__ static double value(float x) { return exact_f64(x); }
};
struct LoadF16 {
  using T = unsigned short;
  __device__ __forceinline__ static double value(unsigned short x) { return exact_f64(__half2float(__ushort_as_half(x))); }
};
struct LoadBF16 {
  using T = unsigned short;
  __device__ __forceinline__ static double value(unsigned short x) { return exact_f64(bf16_to_float(x)); }
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums (num, den) over the block in a fixed order; the totals are valid in thread 0. `red` is reused: the
// trailing barrier lets the caller call this again.
__device__ __forceinline__ void block_sum2(double& num, double& den, double (*red)[kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  num = warp_sum(num);
  den = warp_sum(den);
  if (lane == 0) {
    red[0][warp] = num;
    red[1][warp] = den;
  }
  __syncthreads();
  if (warp == 0) {
    num = warp_sum(lane < kWarps ? red[0][lane] : 0.0);
    den = warp_sum(lane < kWarps ? red[1][lane] : 0.0);
  }
  __syncthreads();
}

template <typename L>
__global__ void __launch_bounds__(kThreads)
    cache_gate_partial_kernel(const typename L::T* __restrict__ probe, typename L::T* stored,
                              const float* __restrict__ state, int64_t B, int64_t S, int64_t nblk,
                              double* __restrict__ workspace) {
  using T = typename L::T;
  __shared__ double red[2][kWarps];
  const int v = cache_gate_valid_index(state[kGateValid]);  // uniform over the grid
  const int w = v >= 0 ? 1 - v : 0;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* p = probe + b * S;
    T* dst = stored + (w * B + b) * S;
    const T* ref = stored + ((v >= 0 ? v : 0) * B + b) * S;  // read only when v >= 0
    double num = 0.0, den = 0.0;
    for (int64_t base = blockIdx.x * kCacheGateCudaTile; base < S; base += nblk * kCacheGateCudaTile) {
      T pv[kUnroll], rv[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = base + k * kThreads + threadIdx.x;
        pv[k] = T();
        rv[k] = T();
        if (i < S) {
          pv[k] = p[i];
          if (v >= 0) rv[k] = ref[i];
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = base + k * kThreads + threadIdx.x;
        if (i < S) {
          dst[i] = pv[k];
          if (v >= 0) {
            const double s = L::value(rv[k]);
            num += fabs(L::value(pv[k]) - s);
            den += fabs(s);
          }
        }
      }
    }
    if (v >= 0) {
      block_sum2(num, den, red);
      if (threadIdx.x == 0) {
        workspace[2 * (b * nblk + blockIdx.x)] = num;
        workspace[2 * (b * nblk + blockIdx.x) + 1] = den;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) cache_gate_finalize_kernel(CacheGateArgs a,
                                                                       const double* __restrict__ workspace,
                                                                       int64_t nblk) {
  __shared__ double red[2][kWarps];
  __shared__ int valid;
  if (threadIdx.x == 0) valid = cache_gate_valid_index(a.state[kGateValid]);
  __syncthreads();  // every thread has read v before thread 0 rewrites state below
  const int v = valid;
  double d = __builtin_huge_val();
  if (v >= 0) {
    for (int64_t b = 0; b < a.batch; ++b) {
      double num = 0.0, den = 0.0;
      for (int64_t j = threadIdx.x; j < nblk; j += kThreads) {
        num += workspace[2 * (b * nblk + j)];
        den += workspace[2 * (b * nblk + j) + 1];
      }
      block_sum2(num, den, red);
      if (threadIdx.x == 0) {
        const double db = cache_gate_sample_distance(num, den);
        d = b == 0 ? db : cache_gate_max(d, db);
      }
    }
  }
  if (threadIdx.x == 0) cache_gate_finish(a, v, d);
}

template <typename L>
cudaError_t launch_typed(const CacheGateArgs& a, double* workspace, cudaStream_t stream) {
  const int64_t nblk = cache_gate_cuda_blocks(a.per_sample);
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
  using T = typename L::T;
  cache_gate_partial_kernel<L><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.probe),
                                                              static_cast<T*>(a.stored), a.state, a.batch,
                                                              a.per_sample, nblk, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  cache_gate_finalize_kernel<<<1, kThreads, 0, stream>>>(a, workspace, nblk);
  return cudaGetLastError();
}

}  // namespace

int cache_gate_cuda(const CacheGateArgs& a, double* workspace, void* stream) {
  if (a.probe == nullptr || a.stored == nullptr || a.state == nullptr || a.decision == nullptr ||
      workspace == nullptr || a.batch < 1 || a.per_sample < 1 || a.num_coefficients < 0 ||
      a.num_coefficients > kCacheGateMaxCoefficients || (a.flags & ~kCacheGateAllFlags))
    return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case GateDType::kFloat16: return launch_typed<LoadF16>(a, workspace, s);
    case GateDType::kBFloat16: return launch_typed<LoadBF16>(a, workspace, s);
    default: return launch_typed<LoadF32>(a, workspace, s);
  }
}

}  // namespace velodiff
