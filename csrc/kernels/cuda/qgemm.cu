// CUDA kernels of the quantized GEMM family: velodiff::quantize_act and velodiff::qgemm.
// Format and semantics: csrc/include/velodiff/qgemm.h. Torch-free: compiles with nvcc alone (CI compiles it for
// sm_80, sm_89 and sm_90a on a CPU-only machine; the build uses --use_fast_math, see "Exact rounding" below).
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
// qgemm: y[M, N] = epilogue( sum_g ascales[m,g] * wscales[n,g] * int32 dot_g ). CTA tile BM x 128 (BM = 128,
// 64 or 32, picked so that the grid fills the GPU), 8 warps as 2 (M) x 4 (N), warp tile (BM/2) x 32 =
// MT x 4 tiles of m16n8. The K loop steps one group (64 K) at a time through a 4-stage cp.async pipeline of
// the packed A [BM x 64] and B [128 x 64] tiles (16-byte cp.async, zero-filled for rows past M or N; one
// __syncthreads per group). Per group and per m16n8 tile the tensor cores give the exact int32 group dot,
// which is scaled into an fp32 accumulator right away (fp32 accumulation across groups, never half).
//
// Fragment loading. The operand fragments of mma.m16n8k64.s4 (and m16n8k32.s8) are, per thread with
// g = lane/4, t = lane%4: A = 4 x b32 = {row g, row g+8} x {two 32-bit K words}, B = 2 x b32 = row (n) g x the
// same two K words, where "K word" = 8 nibbles (s4) or 4 bytes (s8) of consecutive K. Which K words a thread
// holds does not matter for the result as long as A and B use the same assignment: a group's dot product is a
// sum over its K elements in any order, and the int32 accumulator only ever spans one group. So each thread
// takes *adjacent* words of the packed row-major rows in shared memory: s4 words 2t, 2t+1 (one 64-bit LDS
// per row), s8 words 4t..4t+3 (one 128-bit LDS per row, two k32 MMAs). Rows are stored densely (32 or 64 bytes
// per row and stage); these loads are bank-conflict free. The C/D fragment is the usual one: rows g and
// g+8, columns 2t and 2t+1.
//
// int32 -> fp32 without I2F: the accumulator starts at 0x4B400000 (the float 1.5 * 2^23), so the MMA result
// read as a float is 1.5 * 2^23 + dot exactly (|dot| < 2^22 always holds here), and one FADD recovers dot.
// The per-group update is then FADD + FMUL (ascale * wscale) + FFMA per output element.
//
// Tensor-core paths for bits 4 (QTensorPath in qgemm.h; the host picks one per call, QTensorPath::kAuto = s4
// below sm_90, s8 from sm_90 on; bits 8 always uses mma.sync m16n8k32 .s8.s8):
//  (a) s4, sm_80..sm_89: the native int4 tensor cores, mma.sync m16n8k64 .s4.s4 (Hopper has none).
//  (b) s8, sm_80 and later: keeps the 4-bit storage and loads, and unpacks each nibble word in registers into
//      two s8 words, (w << 4) & 0xF0F0F0F0 (even nibbles) and w & 0xF0F0F0F0 (odd nibbles): each byte is then
//      16 x the signed code, so the s8 MMA gives 256 x dot (still < 2^22) and the 1/256 is folded exactly
//      into the activation scale. Two m16n8k32 s8 MMAs per group ("4-bit storage on INT8 tensor cores").
//  (c) e4m3, sm_89 and later: the same unpacking into e4m3 bytes for mma.sync m16n8k32 .e4m3 with fp32
//      accumulators. A byte 0x0u (u in 0..15) is the e4m3 number u * 2^-9 (exponent field 0: subnormal
//      u/8 * 2^-6 for u < 8; exponent field 1: (1 + (u-8)/8) * 2^-6 = u * 2^-9 for u >= 8), and e4m3 is
//      sign-magnitude, so code c becomes |c| in the low bits plus the sign bit: x = the nibble in a byte,
//      sign mask m = prmt's sign replication of the nibble's bit 3 moved to bit 7, result =
//      m ? 0x90 - x (= 0x80 | (16 - x) = 0x80 | |c|) : x. Every product is an integer times 2^-18 and a
//      group's sum has |dot| <= 4096, so the fp32 accumulation inside the MMA is exact; 2^18 is folded into
//      the activation scale. It saves the int->float step of the epilogue but costs ~5 ALU ops per 4
//      codes instead of ~1.5. SASS: native QMMA on sm_89, but on sm_90a ptxas lowers the FP8 mma.sync to
//      F2FP conversions + two f16 HMMA per k32 (64 HMMA and 192 F2FP per group at MT = 4, against 32 IMMA for
//      (b)), so on Hopper FP8 means path (d).
//  (d) wgmma-s8 / wgmma-e4m3, sm_90a only: the unpackings of (b) / (c) written to shared memory for Hopper's
//      warpgroup MMA (qgemm_wgmma_kernel below; mma.sync does not reach Hopper's peak).
//  Below sm_80 the GEMM traps and qgemm_cuda returns cudaErrorNotSupported (quantize_act runs anywhere).
//
// Epilogue: the low-rank up projection sum_r (lora_act[m,r] * lora_scales[r]) * lora_up[n,r] in fp32, with
// 32-rank chunks of lora_act (scaled) and lora_up staged in shared memory (reusing the pipeline buffers),
// then bias, activation and the store in the model dtype (pairs of columns per store when aligned).
// ---------------------------------------------------------------------------------------------------------
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "velodiff/kernels.h"

// Device-side path selection (see the comment above). The host pass sees the defaults.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define VELODIFF_QGEMM_MMA 1
#if __CUDA_ARCH__ >= 890
#define VELODIFF_QGEMM_E4M3 1
#endif
#if __CUDA_ARCH__ < 900
#define VELODIFF_QGEMM_NATIVE_S4 1
#else
#define VELODIFF_QGEMM_NATIVE_S4 0
#endif
#else
#define VELODIFF_QGEMM_MMA 0
#define VELODIFF_QGEMM_NATIVE_S4 0
#endif

namespace velodiff {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Dtype helpers
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Stores two adjacent outputs; p is aligned to 2 * sizeof(T).
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b);
template <>
__device__ __forceinline__ void store_pair<float>(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// IEEE fp32 division, round to nearest even, subnormals kept, whatever -use_fast_math / -ftz say.
__device__ __forceinline__ float div_rn_ieee(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// quantize_act
// ---------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------
// qgemm: PTX wrappers (each guarded by the architectures that have the instruction)
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if VELODIFF_QGEMM_MMA
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#else
  (void)smem, (void)gmem, (void)src_bytes;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if VELODIFF_QGEMM_MMA
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if VELODIFF_QGEMM_MMA
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// d += A (16x64 s4, row) * B (64x8 s4, col); sm_80..sm_89 only (Hopper has no int4 tensor cores).
[[maybe_unused]] __device__ __forceinline__ void mma_s4(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
#if VELODIFF_QGEMM_MMA && VELODIFF_QGEMM_NATIVE_S4
  asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

// d += A (16x32 s8, row) * B (32x8 s8, col); sm_80 and later.
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
#if VELODIFF_QGEMM_MMA
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

// d += A (16x32 e4m3, row) * B (32x8 e4m3, col) in fp32; sm_89 and later.
[[maybe_unused]] __device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                          uint32_t a3, uint32_t b0, uint32_t b1) {
#if VELODIFF_QGEMM_MMA && VELODIFF_QGEMM_E4M3
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

// Signed nibbles -> s8 bytes holding 16 x the code: even nibbles (the low one of each byte) and odd nibbles.
__device__ __forceinline__ uint32_t nib_even_x16(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t nib_odd_x16(uint32_t w) { return w & 0xF0F0F0F0u; }

// 0xFF in every byte whose bit 7 is set, 0x00 elsewhere (prmt's sign-replicating byte selection).
__device__ __forceinline__ uint32_t byte_sign_mask(uint32_t v) {
  uint32_t m;
  asm("prmt.b32 %0, %1, %1, 0xBA98;\n" : "=r"(m) : "r"(v));
  return m;
}
// x: four bytes 0x0n holding two's-complement nibbles n; sign: their bit 3 moved to bit 7 -> e4m3 bytes of
// the codes times 2^-9 (path (c) in the header comment).
__device__ __forceinline__ uint32_t nibbles_to_e4m3(uint32_t x, uint32_t sign) {
  const uint32_t m = byte_sign_mask(sign);
  return (x & ~m) | ((0x90909090u - x) & m);
}
__device__ __forceinline__ uint32_t nib_even_e4m3(uint32_t w) { return nibbles_to_e4m3(w & 0x0F0F0F0Fu, w << 4); }
__device__ __forceinline__ uint32_t nib_odd_e4m3(uint32_t w) { return nibbles_to_e4m3((w >> 4) & 0x0F0F0F0Fu, w); }

// Nibble word w -> the 8-bit word of its even / odd nibbles: e4m3 bytes (FP8) or s8 bytes x 16.
template <bool FP8>
__device__ __forceinline__ uint32_t nib_even(uint32_t w) { return FP8 ? nib_even_e4m3(w) : nib_even_x16(w); }
template <bool FP8>
__device__ __forceinline__ uint32_t nib_odd(uint32_t w) { return FP8 ? nib_odd_e4m3(w) : nib_odd_x16(w); }

// ---------------------------------------------------------------------------------------------------------
// qgemm kernel
// ---------------------------------------------------------------------------------------------------------
constexpr int kGemmThreads = 256;  // 8 warps: 2 along M x 4 along N
constexpr int kBN = 128;           // CTA tile N
constexpr int kNT = 4;             // m16n8 tiles per warp along N (warp N = 32)
constexpr int kStages = 4;         // cp.async pipeline depth, one group per stage
constexpr int kRankChunk = 32;     // ranks of the low-rank branch staged per epilogue pass
constexpr uint32_t kMagicBits = 0x4B400000u;  // 1.5 * 2^23
constexpr float kMagic = 12582912.f;

// Device-side names of the 4-bit tensor-core paths (QTensorPath without kAuto, resolved on the host).
constexpr int kPathS4 = 1, kPathS8 = 2, kPathE4M3 = 3;

template <int BITS, int MT>
struct GemmConfig {
  static constexpr int kBM = 2 * MT * 16;
  static constexpr int kGroupBytes = BITS * kQGroup / 8;  // one row's group: 32 (s4) or 64 (s8) bytes
  static constexpr int kStageBytes = (kBM + kBN) * kGroupBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kLoraBytes = (kBM + kBN) * (kRankChunk + 1) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kLoraBytes ? kPipeBytes : kLoraBytes;
};

// One group of A [BM rows x kGroupBytes] and B [128 rows x kGroupBytes] into a stage, 16 bytes per cp.async,
// by NTHREADS threads.
template <int BITS, int MT, int NTHREADS = kGemmThreads>
__device__ __forceinline__ void load_stage(uint8_t* stage, const uint8_t* __restrict__ qx,
                                           const uint8_t* __restrict__ qw, int64_t M, int64_t N, int64_t m0,
                                           int64_t n0, int64_t row_bytes, int64_t group, int tid) {
  using C = GemmConfig<BITS, MT>;
  constexpr int kChunks = C::kGroupBytes / 16;
  const int64_t goff = group * C::kGroupBytes;
#pragma unroll
  for (int c = tid; c < (C::kBM + kBN) * kChunks; c += NTHREADS) {
    const int row = c / kChunks, part = c % kChunks;
    const bool is_a = row < C::kBM;
    const int64_t r = is_a ? m0 + row : n0 + (row - C::kBM);
    const bool ok = r < (is_a ? M : N);
    const uint8_t* src = (is_a ? qx : qw) + (ok ? r : 0) * row_bytes + goff + part * 16;
    cp_async16(stage + row * C::kGroupBytes + part * 16, src, ok ? 16 : 0);
  }
}

template <typename T, int MT>
struct Scales {
  float a[MT][2];   // ascales of rows g and g + 8 of each m tile
  float w[kNT][2];  // wscales of columns 2t and 2t + 1 of each n tile
};

template <typename T, int MT>
__device__ __forceinline__ void load_scales(Scales<T, MT>& s, const float* __restrict__ ascales,
                                            const T* __restrict__ wscales, int64_t M, int64_t N, int64_t ng,
                                            int64_t row0, int64_t col0, int64_t group, float a_factor) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = row0 + mt * 16 + h * 8;
      s.a[mt][h] = m < M ? __ldg(ascales + m * ng + group) * a_factor : 0.f;
    }
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t n = col0 + nt * 8 + c;
      s.w[nt][c] = n < N ? to_f(wscales[n * ng + group]) : 0.f;
    }
}

// acc += dot * ascale * wscale for one m16n8 tile (dot as a float: exact, |dot| < 2^22).
__device__ __forceinline__ void scale_accumulate(float (&acc)[4], const float (&dot)[4], float a0, float a1,
                                                 float w0, float w1) {
  acc[0] = fmaf(dot[0], a0 * w0, acc[0]);
  acc[1] = fmaf(dot[1], a0 * w1, acc[1]);
  acc[2] = fmaf(dot[2], a1 * w0, acc[2]);
  acc[3] = fmaf(dot[3], a1 * w1, acc[3]);
}

// int32 -> fp32 without I2F: the bits kMagicBits + dot read as a float are 1.5 * 2^23 + dot exactly
// (|dot| < 2^22); one FADD recovers dot.
__device__ __forceinline__ float dot_from_magic(int bits) { return __int_as_float(bits) - kMagic; }

// The same for an integer MMA result d = kMagicBits + dot.
__device__ __forceinline__ void scale_accumulate(float (&acc)[4], const int (&d)[4], float a0, float a1, float w0,
                                                 float w1) {
  const float dot[4] = {dot_from_magic(d[0]), dot_from_magic(d[1]), dot_from_magic(d[2]), dot_from_magic(d[3])};
  scale_accumulate(acc, dot, a0, a1, w0, w1);
}

// All MMAs of one group for one warp, scaled into acc. sa / sb: the warp's first A / B row in the stage.
// PATH: kPathS4 / kPathS8 / kPathE4M3 for bits 4 (ignored for bits 8).
template <int BITS, int MT, int PATH, typename T>
__device__ __forceinline__ void mma_group(float (&acc)[MT][kNT][4], const uint8_t* sa, const uint8_t* sb,
                                          const Scales<T, MT>& s, int g, int t) {
  constexpr int GB = GemmConfig<BITS, MT>::kGroupBytes;
  if constexpr (BITS == 8) {
    // Thread t holds K words 4t..4t+3 of its rows (one 16-byte load): words 4t, 4t+1 feed the first k32 MMA,
    // 4t+2, 4t+3 the second, for A and B alike.
    uint4 af[MT][2], bf[kNT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) af[mt][h] = *reinterpret_cast<const uint4*>(sa + (mt * 16 + h * 8 + g) * GB + t * 16);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) bf[nt] = *reinterpret_cast<const uint4*>(sb + (nt * 8 + g) * GB + t * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        int d[4] = {int(kMagicBits), int(kMagicBits), int(kMagicBits), int(kMagicBits)};
        mma_s8(d, af[mt][0].x, af[mt][1].x, af[mt][0].y, af[mt][1].y, bf[nt].x, bf[nt].y);
        mma_s8(d, af[mt][0].z, af[mt][1].z, af[mt][0].w, af[mt][1].w, bf[nt].z, bf[nt].w);
        scale_accumulate(acc[mt][nt], d, s.a[mt][0], s.a[mt][1], s.w[nt][0], s.w[nt][1]);
      }
  } else {
    // Thread t holds nibble words 2t, 2t+1 of its rows (one 8-byte load).
    uint2 af[MT][2], bf[kNT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) af[mt][h] = *reinterpret_cast<const uint2*>(sa + (mt * 16 + h * 8 + g) * GB + t * 8);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) bf[nt] = *reinterpret_cast<const uint2*>(sb + (nt * 8 + g) * GB + t * 8);
    if constexpr (PATH == kPathS4) {
      // mma.m16n8k64.s4: A regs {row g word 2t, row g+8 word 2t, row g word 2t+1, row g+8 word 2t+1},
      // B regs {word 2t, word 2t+1}.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          int d[4] = {int(kMagicBits), int(kMagicBits), int(kMagicBits), int(kMagicBits)};
          mma_s4(d, af[mt][0].x, af[mt][1].x, af[mt][0].y, af[mt][1].y, bf[nt].x, bf[nt].y);
          scale_accumulate(acc[mt][nt], d, s.a[mt][0], s.a[mt][1], s.w[nt][0], s.w[nt][1]);
        }
    } else {
      // 4-bit storage on the s8 (or e4m3) tensor cores: nibble word w -> 8-bit words even(w), odd(w) (s8: 16 x
      // the codes; e4m3: the codes x 2^-9). k32 MMA #j uses nibble word 2t+j: A regs {even(row g),
      // even(row g+8), odd(row g), odd(row g+8)}, B regs {even, odd}: the same K element sits at the same
      // (register, byte) in A and B.
      constexpr bool kFp8 = PATH == kPathE4M3;
      uint32_t bu[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        bu[nt][0] = nib_even<kFp8>(bf[nt].x);
        bu[nt][1] = nib_odd<kFp8>(bf[nt].x);
        bu[nt][2] = nib_even<kFp8>(bf[nt].y);
        bu[nt][3] = nib_odd<kFp8>(bf[nt].y);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t a0e = nib_even<kFp8>(af[mt][0].x), a0o = nib_odd<kFp8>(af[mt][0].x);
        const uint32_t a1e = nib_even<kFp8>(af[mt][1].x), a1o = nib_odd<kFp8>(af[mt][1].x);
        const uint32_t a0e2 = nib_even<kFp8>(af[mt][0].y), a0o2 = nib_odd<kFp8>(af[mt][0].y);
        const uint32_t a1e2 = nib_even<kFp8>(af[mt][1].y), a1o2 = nib_odd<kFp8>(af[mt][1].y);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          if constexpr (kFp8) {
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            mma_e4m3(d, a0e, a1e, a0o, a1o, bu[nt][0], bu[nt][1]);
            mma_e4m3(d, a0e2, a1e2, a0o2, a1o2, bu[nt][2], bu[nt][3]);
            scale_accumulate(acc[mt][nt], d, s.a[mt][0], s.a[mt][1], s.w[nt][0], s.w[nt][1]);
          } else {
            int d[4] = {int(kMagicBits), int(kMagicBits), int(kMagicBits), int(kMagicBits)};
            mma_s8(d, a0e, a1e, a0o, a1o, bu[nt][0], bu[nt][1]);
            mma_s8(d, a0e2, a1e2, a0o2, a1o2, bu[nt][2], bu[nt][3]);
            scale_accumulate(acc[mt][nt], d, s.a[mt][0], s.a[mt][1], s.w[nt][0], s.w[nt][1]);
          }
        }
      }
    }
  }
}

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(u));
    }
    case 3: return v / (1.f + __expf(-v));
    default: return v;
  }
}

struct GemmParams {
  QGemmArgs a;
  bool pair_store;  // y is aligned to 2 * sizeof(T) and N is even
};

// The end of every qgemm kernel: the low-rank up projection, bias, activation and the store. Each thread holds
// MT x NT m16n8 accumulator tiles (rows wr0 + 16 mt + {g, g + 8}, columns wc0 + 8 nt + 2 t + {0, 1} of the CTA's
// BM x 128 output tile at (m0, n0)); smem (at least (BM + 128) x 33 floats) is free for reuse on entry.
template <typename T, int MT, int NT, int BM, int NTHREADS>
__device__ __forceinline__ void gemm_epilogue(float (&acc)[MT][NT][4], uint8_t* smem, const GemmParams& p,
                                              int64_t m0, int64_t n0, int wr0, int wc0, int g, int t, int tid) {
  const QGemmArgs& a = p.a;
  const int64_t M = a.M, N = a.N, R = a.R;
  const int64_t row0 = m0 + wr0 + g;
  const int64_t col0 = n0 + wc0 + 2 * t;
  // Low-rank up projection: acc += (lora_act[m, :] * lora_scales) . lora_up[n, :], 32 ranks per pass.
  if (R > 0) {
    constexpr int LD = kRankChunk + 1;  // padded rows: conflict-free column reads
    float* la = reinterpret_cast<float*>(smem);
    float* lu = la + BM * LD;
    const T* lora_up = static_cast<const T*>(a.lora_up);
    for (int64_t r0 = 0; r0 < R; r0 += kRankChunk) {
      const int rc = static_cast<int>(R - r0 < kRankChunk ? R - r0 : kRankChunk);
      for (int i = tid; i < BM * kRankChunk; i += NTHREADS) {
        const int row = i / kRankChunk, j = i % kRankChunk;
        const int64_t m = m0 + row;
        float v = 0.f;
        if (m < M && j < rc) {
          v = a.lora_act[m * R + r0 + j];
          if (a.lora_scales != nullptr) v *= a.lora_scales[r0 + j];
        }
        la[row * LD + j] = v;
      }
      for (int i = tid; i < kBN * kRankChunk; i += NTHREADS) {
        const int row = i / kRankChunk, j = i % kRankChunk;
        const int64_t n = n0 + row;
        lu[row * LD + j] = (n < N && j < rc) ? to_f(lora_up[n * R + r0 + j]) : 0.f;
      }
      __syncthreads();
      for (int j = 0; j < rc; ++j) {
        float av[MT][2], bv[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) av[mt][h] = la[(wr0 + mt * 16 + h * 8 + g) * LD + j];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) bv[nt][c] = lu[(wc0 + nt * 8 + 2 * t + c) * LD + j];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            acc[mt][nt][0] = fmaf(av[mt][0], bv[nt][0], acc[mt][nt][0]);
            acc[mt][nt][1] = fmaf(av[mt][0], bv[nt][1], acc[mt][nt][1]);
            acc[mt][nt][2] = fmaf(av[mt][1], bv[nt][0], acc[mt][nt][2]);
            acc[mt][nt][3] = fmaf(av[mt][1], bv[nt][1], acc[mt][nt][3]);
          }
      }
      __syncthreads();
    }
  }

  // Bias, activation, store.
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int act = static_cast<int>(a.activation);
  float bv[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t n = col0 + nt * 8 + c;
      bv[nt][c] = (bias != nullptr && n < N) ? to_f(bias[n]) : 0.f;
    }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = row0 + mt * 16 + h * 8;
      if (m >= M) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t n = col0 + nt * 8;
        const float v0 = activate(acc[mt][nt][2 * h] + bv[nt][0], act);
        const float v1 = activate(acc[mt][nt][2 * h + 1] + bv[nt][1], act);
        T* out = y + m * N + n;
        if (p.pair_store && n + 1 < N) {
          store_pair<T>(out, v0, v1);
        } else {
          if (n < N) out[0] = from_f<T>(v0);
          if (n + 1 < N) out[1] = from_f<T>(v1);
        }
      }
    }
}

template <typename T, int BITS, int MT, int PATH>
__global__ void __launch_bounds__(kGemmThreads, 1) qgemm_kernel(const GemmParams p) {
  // Below sm_80 the cp.async / mma wrappers trap, as do the s4 path on sm_90+ and the e4m3 path below sm_89
  // (the launcher never picks those).
  using C = GemmConfig<BITS, MT>;
  extern __shared__ uint4 smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_raw);
  const QGemmArgs& a = p.a;
  const int64_t M = a.M, N = a.N;
  const int64_t ng = a.K / kQGroup;
  const int64_t row_bytes = a.K * BITS / 8;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const uint8_t* qx = static_cast<const uint8_t*>(a.qx);
  const uint8_t* qw = static_cast<const uint8_t*>(a.qw);
  const T* wscales = static_cast<const T*>(a.wscales);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wr0 = (warp >> 2) * MT * 16;  // warp's first row in the CTA tile
  const int wc0 = (warp & 3) * kNT * 8;   // warp's first column
  const int64_t row0 = m0 + wr0 + g;      // global row of this thread's first accumulator row
  const int64_t col0 = n0 + wc0 + 2 * t;  // global column of its first accumulator column
  // The 4-bit-on-s8 path multiplies both operands by 16, the e4m3 path by 2^-9: fold 1/256 or 2^18 (exact)
  // into the activation scale.
  const float a_factor = BITS == 8 ? 1.f : PATH == kPathS8 ? 1.f / 256.f : PATH == kPathE4M3 ? 262144.f : 1.f;

  float acc[MT][kNT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ng) load_stage<BITS, MT>(smem + s * C::kStageBytes, qx, qw, M, N, m0, n0, row_bytes, s, tid);
    cp_async_commit();
  }
  Scales<T, MT> cur;
  if (ng > 0) load_scales(cur, a.ascales, wscales, M, N, ng, row0, col0, 0, a_factor);
  for (int64_t kt = 0; kt < ng; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt has landed for all threads; everyone is done with stage kt - 1
    const int64_t nk = kt + kStages - 1;
    if (nk < ng)
      load_stage<BITS, MT>(smem + (nk % kStages) * C::kStageBytes, qx, qw, M, N, m0, n0, row_bytes, nk, tid);
    cp_async_commit();
    Scales<T, MT> nxt;  // prefetch the next group's scales into registers (the last one loads twice)
    load_scales(nxt, a.ascales, wscales, M, N, ng, row0, col0, kt + 1 < ng ? kt + 1 : kt, a_factor);
    const uint8_t* stage = smem + (kt % kStages) * C::kStageBytes;
    mma_group<BITS, MT, PATH, T>(acc, stage + wr0 * C::kGroupBytes, stage + (C::kBM + wc0) * C::kGroupBytes,
                                    cur, g, t);
    cur = nxt;
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are free for the epilogue

  gemm_epilogue<T, MT, kNT, C::kBM, kGemmThreads>(acc, smem, p, m0, n0, wr0, wc0, g, t, tid);
}

// ---------------------------------------------------------------------------------------------------------
// qgemm on Hopper's warpgroup MMA (sm_90a only; paths kPathWgmmaS8 / kPathWgmmaE4M3, bits 4)
// ---------------------------------------------------------------------------------------------------------
// CTA tile 64 WGS x 128 with WGS = 1 or 2 warpgroups (QGemmArgs::wgmma_rows; 1 is the default: two CTAs per
// SM, so that one's MMAs can run while the other scales); warpgroup w computes rows 64 w .. 64 w + 63 with
// wgmma.mma_async m64n128k32 (s8 or e4m3, both operands from shared memory). Per group of 64 K:
//  1. the packed 4-bit A and B tiles arrive through a 4-stage cp.async ring (the mma.sync kernel's stages);
//  2. all threads unpack a group into 8-bit codes (the s8 or e4m3 bytes of paths (b) / (c) above) in the
//     canonical K-major layout without swizzle: 8-row x 16-byte "core matrices" of 128 contiguous bytes, the
//     two core matrices of a k32 step adjacent (leading byte offset 128), 8-row groups 256 bytes apart
//     (stride byte offset 256); two such buffers alternate between groups. Which K element lands where does
//     not matter as long as A and B agree (a group's dot is a sum), so the cheap even/odd nibble split is used.
//     fence.proxy.async (the tensor cores read what ordinary stores wrote) and a barrier publish it;
//  3. group kt: two wgmma (k32 each; the first with scale-d = 0, so no other instruction ever writes the
//     accumulators), committed together; while they run, the threads unpack group kt + 1 into the other
//     buffer; then wgmma.wait_group 0 and the group's dots are scaled into the fp32 accumulators,
//     acc += dot * (ascale[m] * wscale[n]) (s8: the int32 bits through the magic-number step above; e4m3:
//     the fp32 result directly, exact as in path (c)).
// Reading one accumulator set while the next group's MMAs run (two sets) made ptxas serialize the wgmma
// (C7514) and spill at 255 registers; one set uses ~200 registers and no local memory.
// A first version: no warp specialisation, no TMA; the next steps (a producer warpgroup that loads and
// unpacks, setmaxnreg, 128-byte swizzle, scaling overlapped with the other warpgroup's MMAs) wait for an H100
// to measure this one.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define VELODIFF_QGEMM_WGMMA 1
#else
#define VELODIFF_QGEMM_WGMMA 0
#endif

// 1 in the device code built for sm_90a, 0 in every other image: the host asks before it picks a wgmma path.
__device__ int g_qgemm_wgmma_built = VELODIFF_QGEMM_WGMMA;

constexpr int kPathWgmmaS8 = 4, kPathWgmmaE4M3 = 5;
// Shared memory of the wgmma kernel with WGS warpgroups (CTA tile 64 WGS x 128): the cp.async ring of packed
// groups, two unpacked groups (A then B, each as two k32 steps), two buffers of 128 float wscales.
template <int WGS>
struct WgConfig {
  static constexpr int kThreads = 128 * WGS;
  static constexpr int kBM = 64 * WGS;
  static constexpr int kMT = 2 * WGS;                                // GemmConfig<4, kMT>::kBM == kBM
  static constexpr int kStageBytes = GemmConfig<4, kMT>::kStageBytes;  // (kBM + 128) rows x 32 bytes
  static constexpr int kPacked = kStages * kStageBytes;
  static constexpr int kAStep = kBM * 32;                            // A's k32 step: kBM rows x 32 bytes
  static constexpr int kBStep = kBN * 32;                            // B's: 128 rows x 32 bytes
  static constexpr int kUnpacked = 2 * kAStep + 2 * kBStep;          // one group, A and B
  static constexpr int kScalesOff = kPacked + 2 * kUnpacked;
  static constexpr int kSmemBytes = kScalesOff + 2 * kBN * 4;        // WGS 2: 66560, WGS 1: 50176
  static_assert(GemmConfig<4, kMT>::kBM == kBM, "the ring's stage holds kBM A rows");
  static_assert(kSmemBytes >= (kBM + kBN) * (kRankChunk + 1) * 4, "epilogue staging must fit");
  static_assert(2 * kSmemBytes <= 227 * 1024 || WGS == 2, "two CTAs of one warpgroup must fit an SM");
};

__device__ __forceinline__ void fence_proxy_async() {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving reads of an accumulator register above the wgmma.wait that completes it.
__device__ __forceinline__ void fence_reg(int& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading byte offset
// (between the core matrices adjacent in K) and stride byte offset (between 8-row groups), all >> 4; no swizzle.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem_ptr) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(128 >> 4) << 16) |
         (static_cast<uint64_t>(256 >> 4) << 32);
}

#define VELODIFF_WG_D64                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, " \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define VELODIFF_WG_OUT(C, d)                                                                                  \
  C(d[0]), C(d[1]), C(d[2]), C(d[3]), C(d[4]), C(d[5]), C(d[6]), C(d[7]), C(d[8]), C(d[9]), C(d[10]),          \
      C(d[11]), C(d[12]), C(d[13]), C(d[14]), C(d[15]), C(d[16]), C(d[17]), C(d[18]), C(d[19]), C(d[20]),      \
      C(d[21]), C(d[22]), C(d[23]), C(d[24]), C(d[25]), C(d[26]), C(d[27]), C(d[28]), C(d[29]), C(d[30]),      \
      C(d[31]), C(d[32]), C(d[33]), C(d[34]), C(d[35]), C(d[36]), C(d[37]), C(d[38]), C(d[39]), C(d[40]),      \
      C(d[41]), C(d[42]), C(d[43]), C(d[44]), C(d[45]), C(d[46]), C(d[47]), C(d[48]), C(d[49]), C(d[50]),      \
      C(d[51]), C(d[52]), C(d[53]), C(d[54]), C(d[55]), C(d[56]), C(d[57]), C(d[58]), C(d[59]), C(d[60]),      \
      C(d[61]), C(d[62]), C(d[63])
#define VELODIFF_WG_R(x) "+r"(x)
#define VELODIFF_WG_F(x) "+f"(x)

// d (=|+=) A (64 x 32, smem) * B (32 x 128, smem); the accumulator layout is that of 16 m16n8 tiles per warp:
// d[4 j + i] = row 16 (warp % 4) + g + 8 (i / 2), column 8 j + 2 t + i % 2.
__device__ __forceinline__ void wgmma_s8(int (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " VELODIFF_WG_D64 ", %64, %65, p;\n}\n"
               : VELODIFF_WG_OUT(VELODIFF_WG_R, d)
               : "l"(da), "l"(db), "r"(scale_d));
#else
  (void)d, (void)da, (void)db, (void)scale_d;
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_e4m3(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
#if VELODIFF_QGEMM_WGMMA
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " VELODIFF_WG_D64 ", %64, %65, p, 1, 1;\n}\n"
               : VELODIFF_WG_OUT(VELODIFF_WG_F, d)
               : "l"(da), "l"(db), "r"(scale_d));
#else
  (void)d, (void)da, (void)db, (void)scale_d;
  __trap();
#endif
}

// Unpacks group `group` (packed stage `stage`: kBM A rows, then 128 B rows, 32 bytes each) into the
// canonical layout at `u`, stages its wscales in `ws` and loads this thread's ascales; zeros for group >= ng.
template <typename T, bool FP8, int WGS>
__device__ __forceinline__ void wg_unpack(uint8_t* u, float* ws, float (&as)[2], const uint8_t* stage,
                                          const QGemmArgs& a, int64_t n0, int64_t ng, int64_t group, int64_t arow,
                                          int tid) {
  using W = WgConfig<WGS>;
  const bool real = group < ng;
  const int64_t gi = real ? group : 0;
#pragma unroll
  for (int task = tid; task < (W::kBM + kBN) * 2; task += W::kThreads) {  // a stage row and one K half of it
    // 16 tasks cover 8 rows x 2 halves; the 8 threads of a 16-byte access phase take rows 0-3 of one half and
    // rows 4-7 of the other, so both the 16-byte loads (row * 32 + h * 16) and the stores ((row & 7) * 16 in
    // the half's k32 step) hit 8 distinct 16-byte bank groups.
    const int j = task & 7, flip = (task >> 3) & 1;
    const int h = j >> 2;
    const int row = (task >> 4) * 8 + (j & 3) + 4 * (h ^ flip);
    uint4 w = *reinterpret_cast<const uint4*>(stage + row * 32 + h * 16);
    if (!real) w = make_uint4(0u, 0u, 0u, 0u);
    // core matrix 0 (bytes 0..15 of the k32 step) and 1 (bytes 16..31)
    const uint4 lo = make_uint4(nib_even<FP8>(w.x), nib_odd<FP8>(w.x), nib_even<FP8>(w.y), nib_odd<FP8>(w.y));
    const uint4 hi = make_uint4(nib_even<FP8>(w.z), nib_odd<FP8>(w.z), nib_even<FP8>(w.w), nib_odd<FP8>(w.w));
    const bool is_a = row < W::kBM;
    const int r = is_a ? row : row - W::kBM;
    uint8_t* dst = u + (is_a ? h * W::kAStep : 2 * W::kAStep + h * W::kBStep) + (r >> 3) * 256 + (r & 7) * 16;
    *reinterpret_cast<uint4*>(dst) = lo;
    *reinterpret_cast<uint4*>(dst + 128) = hi;
  }
  if (tid < kBN) {
    const int64_t n = n0 + tid;
    ws[tid] = (real && n < a.N) ? to_f(static_cast<const T*>(a.wscales)[n * ng + gi]) : 0.f;
  }
  constexpr float kFactor = FP8 ? 262144.f : 1.f / 256.f;  // undo the x 2^-9 (e4m3) or x 16 (s8) per operand
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = arow + 8 * i;
    as[i] = (real && m < a.M) ? __ldg(a.ascales + m * ng + gi) * kFactor : 0.f;
  }
}

// WGS = 2: one CTA of two warpgroups per SM (~200 registers per thread); WGS = 1: two independent CTAs of one
// warpgroup per SM, whose MMAs and scaling phases can overlap each other.
template <typename T, bool FP8, int WGS>
__global__ void __launch_bounds__(128 * WGS, 3 - WGS) qgemm_wgmma_kernel(const GemmParams p) {
  using D = typename std::conditional<FP8, float, int>::type;
  using W = WgConfig<WGS>;
  constexpr int kStage = W::kStageBytes;
  extern __shared__ uint4 smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_raw);
  const QGemmArgs& a = p.a;
  const int64_t ng = a.K / kQGroup;
  const int64_t row_bytes = a.K / 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * W::kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, wg = warp >> 2;
  const int wr0 = wg * 64 + (warp & 3) * 16;  // this warp's first row in the CTA tile
  const int64_t arow = m0 + wr0 + g;          // global row of the thread's first accumulator row
  const uint8_t* qx = static_cast<const uint8_t*>(a.qx);
  const uint8_t* qw = static_cast<const uint8_t*>(a.qw);
  uint8_t* unpacked = smem + W::kPacked;
  float* wsbuf = reinterpret_cast<float*>(smem + W::kScalesOff);

  float acc[1][16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[0][j][i] = 0.f;
  D d[64];
  float as[2], as_next[2];

  // The ring runs one group ahead of the mma.sync kernel's: group kt + 1 is unpacked while group kt's MMAs run,
  // so the prologue fills all kStages slots and iteration kt refills the slot of group kt with group kt + 4.
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    if (s < ng) load_stage<4, W::kMT, W::kThreads>(smem + s * kStage, qx, qw, a.M, a.N, m0, n0, row_bytes, s, tid);
    cp_async_commit();
  }
  cp_async_wait<kStages - 1>();
  __syncthreads();
  wg_unpack<T, FP8, WGS>(unpacked, wsbuf, as, smem, a, n0, ng, 0, arow, tid);
  fence_proxy_async();
  __syncthreads();  // group 0 is unpacked and visible to the tensor cores

  for (int64_t kt = 0; kt < ng; ++kt) {
    const int b = static_cast<int>(kt & 1);
    uint8_t* u = unpacked + b * W::kUnpacked;
    // 1. Issue this group's two k32 MMAs (the first one overwrites d: scale-d = 0).
    wgmma_fence();
#pragma unroll
    for (int kh = 0; kh < 2; ++kh) {
      const uint64_t da = wgmma_desc(u + kh * W::kAStep + wg * 64 / 8 * 256);
      const uint64_t db = wgmma_desc(u + 2 * W::kAStep + kh * W::kBStep);
      if constexpr (FP8)
        wgmma_e4m3(d, da, db, kh);
      else
        wgmma_s8(d, da, db, kh);
    }
    wgmma_commit();
    // 2. While the tensor cores run: refill the ring and unpack the next group into the other buffer.
    cp_async_wait<kStages - 2>();  // of the groups committed (up to kt + 3), at most kt + 2 and kt + 3 pending
    __syncthreads();  // stage kt + 1 has landed for every thread's copies
    const int64_t nk = kt + kStages;
    if (nk < ng)
      load_stage<4, W::kMT, W::kThreads>(smem + (nk % kStages) * kStage, qx, qw, a.M, a.N, m0, n0, row_bytes, nk,
                                         tid);
    cp_async_commit();
    wg_unpack<T, FP8, WGS>(unpacked + (1 - b) * W::kUnpacked, wsbuf + (1 - b) * kBN, as_next,
                      smem + ((kt + 1) % kStages) * kStage, a, n0, ng, kt + 1, arow, tid);
    // 3. Wait for this group's MMAs and scale the group dots into acc: acc += dot * (ascale * wscale).
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_reg(d[i]);
    const float* ws = wsbuf + b * kBN;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float2 w = *reinterpret_cast<const float2*>(ws + 8 * j + 2 * t);
      float dot[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (FP8)
          dot[i] = d[4 * j + i];
        else  // the wgmma started from 0 (scale-d = 0), so add the magic bits here
          dot[i] = dot_from_magic(d[4 * j + i] + int(kMagicBits));
      }
      // The same rounding as scale_accumulate, dot * (ascale * wscale): every path gives the same bits.
      scale_accumulate(acc[0][j], dot, as[0], as[1], w.x, w.y);
    }
    as[0] = as_next[0];
    as[1] = as_next[1];
    fence_proxy_async();
    __syncthreads();  // group kt + 1 is unpacked and visible; everyone is done with buffer b
  }
  cp_async_wait<0>();
  __syncthreads();  // the shared memory is free for the epilogue

  gemm_epilogue<T, 1, 16, W::kBM, W::kThreads>(acc, smem, p, m0, n0, wr0, 0, g, t, tid);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------
cudaError_t device_info(int& major, int& minor, int& sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

// The 4-bit path for a device of compute capability cc (major * 10 + minor), or 0 when it cannot run there.
int resolve_path(QTensorPath requested, int cc) {
  switch (requested) {
    case QTensorPath::kAuto: return cc < 90 ? kPathS4 : kPathS8;
    case QTensorPath::kS4: return cc < 90 ? kPathS4 : 0;
    case QTensorPath::kS8: return kPathS8;
    case QTensorPath::kE4M3: return cc >= 89 ? kPathE4M3 : 0;
    case QTensorPath::kWgmmaS8: return cc == 90 ? kPathWgmmaS8 : 0;
    case QTensorPath::kWgmmaE4M3: return cc == 90 ? kPathWgmmaE4M3 : 0;
  }
  return 0;
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

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

// Launches the GEMM kernel `kernel` on a grid of BM x 128 tiles with `smem` bytes of dynamic shared memory.
template <int BM, auto kernel, int NTHREADS = kGemmThreads>
cudaError_t launch_tiles(int smem, const GemmParams& p, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    // Opt in to more than 48 KiB of dynamic shared memory, once per device and kernel (the attribute is per
    // device; each instantiation of this template is one kernel, with its own flags).
    static std::atomic<uint64_t> done{0};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (bit == 0 || (done.load(std::memory_order_relaxed) & bit) == 0) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
      done.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const dim3 grid(static_cast<unsigned>((p.a.M + BM - 1) / BM), static_cast<unsigned>((p.a.N + kBN - 1) / kBN));
  kernel<<<grid, NTHREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int BITS, int MT, int PATH>
cudaError_t launch_gemm_tile(const GemmParams& p, cudaStream_t stream) {
  using C = GemmConfig<BITS, MT>;
  return launch_tiles<C::kBM, qgemm_kernel<T, BITS, MT, PATH>>(C::kSmemBytes, p, stream);
}

template <typename T, int BITS, int PATH>
cudaError_t launch_gemm_bits(const GemmParams& p, int sms, cudaStream_t stream) {
  const int64_t ntiles = (p.a.N + kBN - 1) / kBN;
  auto ctas = [&](int64_t bm) { return (p.a.M + bm - 1) / bm * ntiles; };
  // The largest M tile whose grid still covers every multiprocessor once (small problems: the smallest tile).
  if (ctas(128) >= sms) return launch_gemm_tile<T, BITS, 4, PATH>(p, stream);
  if (ctas(64) >= sms) return launch_gemm_tile<T, BITS, 2, PATH>(p, stream);
  return launch_gemm_tile<T, BITS, 1, PATH>(p, stream);
}

template <typename T, bool FP8, int WGS>
cudaError_t launch_wgmma_ctas(const GemmParams& p, cudaStream_t stream) {
  using W = WgConfig<WGS>;
  return launch_tiles<W::kBM, qgemm_wgmma_kernel<T, FP8, WGS>, W::kThreads>(W::kSmemBytes, p, stream);
}

// QGemmArgs::wgmma_rows picks the CTA: 128 rows (two warpgroups) or 64 (one; the default: two CTAs per SM).
template <typename T, bool FP8>
cudaError_t launch_wgmma(const GemmParams& p, cudaStream_t stream) {
  return p.a.wgmma_rows == 128 ? launch_wgmma_ctas<T, FP8, 2>(p, stream) : launch_wgmma_ctas<T, FP8, 1>(p, stream);
}

template <typename T>
cudaError_t launch_gemm(const QGemmArgs& a, int path, int sms, cudaStream_t stream) {
  GemmParams p;
  p.a = a;
  p.pair_store = a.N % 2 == 0 && aligned(a.y, 2 * sizeof(T));
  if (a.bits == 8) return launch_gemm_bits<T, 8, kPathS8>(p, sms, stream);
  switch (path) {
    case kPathS4: return launch_gemm_bits<T, 4, kPathS4>(p, sms, stream);
    case kPathE4M3: return launch_gemm_bits<T, 4, kPathE4M3>(p, sms, stream);
    case kPathWgmmaS8: return launch_wgmma<T, false>(p, stream);
    case kPathWgmmaE4M3: return launch_wgmma<T, true>(p, stream);
    default: return launch_gemm_bits<T, 4, kPathS8>(p, sms, stream);
  }
}

}  // namespace

int quantize_act_cuda(const QuantizeActArgs& a, void* stream) {
  if (a.bits != 4 && a.bits != 8) return cudaErrorInvalidValue;
  if (a.M < 0 || a.K < 0 || a.R < 0) return cudaErrorInvalidValue;
  if (a.M == 0 || a.K == 0) return cudaSuccess;
  if (a.x == nullptr || a.qx == nullptr || a.ascales == nullptr) return cudaErrorInvalidValue;
  if (a.R > 0 && (a.lora_down == nullptr || a.lora_act == nullptr)) return cudaErrorInvalidValue;
  if (!aligned(a.qx, a.bits == 4 ? 4 : 8)) return cudaErrorInvalidValue;
  if (a.M / kQaRows >= (int64_t{1} << 31) || qgemm_padded_k(a.K) / kQaCols >= 65535) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case QDtype::kFloat16: return launch_quantize<__half>(a, s);
    case QDtype::kBFloat16: return launch_quantize<__nv_bfloat16>(a, s);
    case QDtype::kFloat32: return launch_quantize<float>(a, s);
  }
  return cudaErrorInvalidValue;
}

int qgemm_cuda_wgmma_built(bool& built) {
  // Read once per device (a synchronous copy: never on the hot path, and not first inside a graph capture).
  static std::atomic<int> known[64];  // 0 = not read yet, 1 = no, 2 = yes
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && known[device].load(std::memory_order_relaxed) != 0) {
    built = known[device].load(std::memory_order_relaxed) == 2;
    return cudaSuccess;
  }
  int value = 0;
  err = cudaMemcpyFromSymbol(&value, g_qgemm_wgmma_built, sizeof(int));
  if (err != cudaSuccess) return err;
  built = value == 1;
  if (device < 64) known[device].store(built ? 2 : 1, std::memory_order_relaxed);
  return cudaSuccess;
}

int qgemm_cuda(const QGemmArgs& a, void* stream) {
  if (a.bits != 4 && a.bits != 8) return cudaErrorInvalidValue;
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.R < 0 || a.K % kQGroup != 0) return cudaErrorInvalidValue;
  const int act = static_cast<int>(a.activation);
  if (act < 0 || act > 3) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.y == nullptr || a.wscales == nullptr) return cudaErrorInvalidValue;
  if (a.K > 0 && (a.qx == nullptr || a.qw == nullptr || a.ascales == nullptr)) return cudaErrorInvalidValue;
  if (a.R > 0 && (a.lora_act == nullptr || a.lora_up == nullptr)) return cudaErrorInvalidValue;
  if (!aligned(a.qx, 16) || !aligned(a.qw, 16)) return cudaErrorInvalidValue;  // 16-byte cp.async
  if (a.M / 32 >= (int64_t{1} << 31) || a.N / kBN >= 65535) return cudaErrorInvalidValue;
  int major = 0, minor = 0, sms = 0;
  cudaError_t err = device_info(major, minor, sms);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;  // mma.sync integer shapes and cp.async need sm_80
  const int path = a.bits == 4 ? resolve_path(a.tensor_path, major * 10 + minor) : kPathS8;
  if (path == 0) return cudaErrorNotSupported;
  if (path == kPathWgmmaS8 || path == kPathWgmmaE4M3) {  // those kernels trap in an image without sm_90a code
    bool built = false;
    err = static_cast<cudaError_t>(qgemm_cuda_wgmma_built(built));
    if (err != cudaSuccess) return err;
    if (!built) return cudaErrorNotSupported;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case QDtype::kFloat16: return launch_gemm<__half>(a, path, sms, s);
    case QDtype::kBFloat16: return launch_gemm<__nv_bfloat16>(a, path, sms, s);
    case QDtype::kFloat32: return launch_gemm<float>(a, path, sms, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace velodiff
