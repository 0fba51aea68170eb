// CUDA kernel of velodiff::quantize_act (format and semantics: csrc/include/velodiff/qgemm.h; the building blocks
// shared with the GEMM kernels: qgemm_device.cuh). Torch-free: compiles with nvcc alone.
//
// ---------------------------------------------------------------------------------------------------------
// quantize_act: one block of 256 threads per 32 rows x 256 K columns (4 groups of 64). The x tile is read once
// into shared memory as fp32. Quantization: each warp takes whole rows, each lane 8 consecutive K elements, so
// 8 lanes hold one group; the group absmax is a 3-step xor shuffle; a lane writes its 8 codes as one 32-bit
// word (4 bits: exactly the packed word of the format) or 8 bytes (8 bits), and ascales. Low-rank down
// projection (SVDQuant, Li et al., ICLR 2025, eq. 5: X W^T ~= X (L1/lambda) L2^T + Q(X/lambda) Q(R)^T; the
// first term's X (L1/lambda) = x @ lora_down on the *unsmoothed* x): the same x tile times the block's
// lora_down rows, lane = rank column r, warp = 4 rows, partial sums over the block's 256 K columns added with
// atomicAdd into the caller-zeroed fp32 lora_act [M, R].
//
// Exact rounding: --use_fast_math turns `/` into an approximate division and flushes subnormals. The
// quantization must be bit-exact with the fp32 IEEE reference, so it uses `div.rn.f32` through inline PTX
// (IEEE, round to nearest even, subnormals kept: unaffected by -ftz and -prec-div), takes |v| and the absmax
// on the float bit patterns (exact, NaN propagates like torch's amax), tests s > 0 on the bits, and rounds
// with __float2int_rn (cvt.rni: round half to even; a subnormal quotient rounds to 0 either way).
//
// ---------------------------------------------------------------------------------------------------------
#include "qgemm_device.cuh"

namespace velodiff {
namespace qgemm_detail {
namespace {

// IEEE fp32 division, round to nearest even, subnormals kept, whatever -use_fast_math / -ftz say.
__device__ __forceinline__ float div_rn_ieee(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

constexpr int kQaRows = 32;     // rows of x per block
constexpr int kQaCols = 256;    // K columns per block (4 groups); equals the thread count
constexpr int kQaThreads = 256;

template <typename T, int BITS>
__global__ void __launch_bounds__(kQaThreads) quantize_act_kernel(const QuantizeActArgs a) {
  constexpr int Q = BITS == 4 ? 7 : 127;
  __shared__ __align__(16) float xs[kQaRows][kQaCols];
  __shared__ __align__(16) float sm[kQaCols];
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t M = a.M, K = a.K, R = a.R;
  const int64_t Kp = (K + kQGroup - 1) / kQGroup * kQGroup;
  const int64_t ng = Kp / kQGroup;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kQaRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kQaCols;
  const int tid = threadIdx.x;

  {  // Load the tile: thread = column, coalesced along K; zero outside [M, K) (padding codes are 0).
    const int64_t k = k0 + tid;
    sm[tid] = (a.smooth != nullptr && k < K) ? a.smooth[k] : 1.f;
#pragma unroll 8
    for (int i = 0; i < kQaRows; ++i) {
      const int64_t m = m0 + i;
      xs[i][tid] = (m < M && k < K) ? to_f(x[m * K + k]) : 0.f;
    }
  }
  __syncthreads();

  const int lane = tid & 31, warp = tid >> 5;
  const int c0 = lane * 8;                 // this lane's 8 columns in the tile
  const int64_t gk = k0 + c0;              // their first K index
  const bool col_ok = gk < Kp;             // the same for the 8 lanes of a group (Kp, k0: multiples of 64)
  for (int i = warp; i < kQaRows; i += kQaThreads / 32) {
    const int64_t m = m0 + i;
    if (m >= M) break;  // uniform across the warp
    float v[8];
    const float4 p0 = *reinterpret_cast<const float4*>(&xs[i][c0]);
    const float4 p1 = *reinterpret_cast<const float4*>(&xs[i][c0 + 4]);
    const float4 s0 = *reinterpret_cast<const float4*>(&sm[c0]);
    const float4 s1 = *reinterpret_cast<const float4*>(&sm[c0 + 4]);
    v[0] = div_rn_ieee(p0.x, s0.x);
    v[1] = div_rn_ieee(p0.y, s0.y);
    v[2] = div_rn_ieee(p0.z, s0.z);
    v[3] = div_rn_ieee(p0.w, s0.w);
    v[4] = div_rn_ieee(p1.x, s1.x);
    v[5] = div_rn_ieee(p1.y, s1.y);
    v[6] = div_rn_ieee(p1.z, s1.z);
    v[7] = div_rn_ieee(p1.w, s1.w);
    // |v| and max on the bit patterns: exact for subnormals, and NaN (above +inf) propagates.
    uint32_t amax = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = max(amax, __float_as_uint(v[j]) & 0x7fffffffu);
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    const float s = div_rn_ieee(__uint_as_float(amax), static_cast<float>(Q));
    const bool positive = (__float_as_uint(s) - 1u) < 0x7f800000u;  // 0 < s <= inf; false for 0 and NaN
    int c[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = positive ? min(max(__float2int_rn(div_rn_ieee(v[j], s)), -Q - 1), Q) : 0;
    if (col_ok) {
      if constexpr (BITS == 4) {
        uint32_t w = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) w |= (static_cast<uint32_t>(c[j]) & 0xFu) << (4 * j);
        reinterpret_cast<uint32_t*>(a.qx)[(m * Kp + gk) / 8] = w;
      } else {
        uint2 w;
        w.x = (static_cast<uint32_t>(c[0]) & 0xFFu) | ((static_cast<uint32_t>(c[1]) & 0xFFu) << 8) |
              ((static_cast<uint32_t>(c[2]) & 0xFFu) << 16) | (static_cast<uint32_t>(c[3]) << 24);
        w.y = (static_cast<uint32_t>(c[4]) & 0xFFu) | ((static_cast<uint32_t>(c[5]) & 0xFFu) << 8) |
              ((static_cast<uint32_t>(c[6]) & 0xFFu) << 16) | (static_cast<uint32_t>(c[7]) << 24);
        reinterpret_cast<uint2*>(a.qx)[(m * Kp + gk) / 8] = w;
      }
      if ((lane & 7) == 0) a.ascales[m * ng + gk / kQGroup] = s;
    }
  }

  // Low-rank down projection on the unsmoothed tile: lane = rank column, warp = rows warp + 8j (j < 4).
  if (R > 0 && m0 + warp < M) {
    const T* __restrict__ ld = static_cast<const T*>(a.lora_down);
    const int kn = static_cast<int>(K - k0 < kQaCols ? K - k0 : kQaCols);  // >= 1: k0 < Kp implies k0 < K
    const int kn4 = (kn + 3) & ~3;
    for (int64_t r0 = 0; r0 < R; r0 += 32) {
      const int64_t r = r0 + lane;
      const bool rv = r < R;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < kn4; k += 4) {
        float w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) w[q] = (rv && k + q < kn) ? to_f(ld[(k0 + k + q) * R + r]) : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float4 xv = *reinterpret_cast<const float4*>(&xs[warp + 8 * j][k]);
          acc[j] = fmaf(xv.x, w[0], acc[j]);
          acc[j] = fmaf(xv.y, w[1], acc[j]);
          acc[j] = fmaf(xv.z, w[2], acc[j]);
          acc[j] = fmaf(xv.w, w[3], acc[j]);
        }
      }
      if (rv) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t m = m0 + warp + 8 * j;
          if (m < M) atomicAdd(a.lora_act + m * R + r, acc[j]);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_quantize(const QuantizeActArgs& a, cudaStream_t stream) {
  const int64_t kp = qgemm_padded_k(a.K);
  const dim3 grid(static_cast<unsigned>((a.M + kQaRows - 1) / kQaRows),
                  static_cast<unsigned>((kp + kQaCols - 1) / kQaCols));
  if (a.bits == 4)
    quantize_act_kernel<T, 4><<<grid, kQaThreads, 0, stream>>>(a);
  else
    quantize_act_kernel<T, 8><<<grid, kQaThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace qgemm_detail

int quantize_act_cuda(const QuantizeActArgs& a, void* stream) {
  using namespace qgemm_detail;
  if (a.bits != 4 && a.bits != 8) return cudaErrorInvalidValue;
  if (a.M < 0 || a.K < 0 || a.R < 0) return cudaErrorInvalidValue;
  if (a.M == 0 || a.K == 0) return cudaSuccess;
  if (a.x == nullptr || a.qx == nullptr || a.ascales == nullptr) return cudaErrorInvalidValue;
  if (a.R > 0 && (a.lora_down == nullptr || a.lora_act == nullptr)) return cudaErrorInvalidValue;
  if (!aligned(a.qx, a.bits == 4 ? 4 : 8)) return cudaErrorInvalidValue;
  if (a.M / kQaRows >= (int64_t{1} << 31) || qgemm_padded_k(a.K) / kQaCols >= 65535) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return for_dtype(a.dtype, [&](auto tag) { return launch_quantize<typename decltype(tag)::type>(a, s); });
}

}  // namespace velodiff
