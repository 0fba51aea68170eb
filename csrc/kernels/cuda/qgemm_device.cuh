// Device building blocks shared by the CUDA kernels of the quantized GEMM family, one kernel per file:
//   quantize_act.cu     velodiff::quantize_act: codes, scales and the low-rank down projection in one pass
//   qgemm_mma.cuh       the mma.sync GEMM kernel (a template), instantiated per tensor-core path in
//     qgemm_mma_s4.cu     path (a): 4-bit codes on the int4 tensor cores (sm_80..sm_89)
//     qgemm_mma_s8.cu     path (b): 4-bit codes unpacked to s8; and every 8-bit GEMM (sm_80 and later)
//     qgemm_mma_e4m3.cu   path (c): 4-bit codes unpacked to e4m3 (sm_89 and later)
//   qgemm_wgmma.cu      path (d): Hopper's warpgroup MMA (sm_90a), and the flag saying whether it was built
//   qgemm.cu            velodiff::qgemm's host entry point: argument checks, the path, the dispatch
// Format and semantics: csrc/include/velodiff/qgemm.h. Torch-free: every file compiles with nvcc alone (CI
// compiles each for sm_80, sm_89 and sm_90a on a CPU-only machine; the build uses --use_fast_math, see "Exact
// rounding" in quantize_act.cu). Everything in this header is a template, inline or constexpr, so the objects
// link without duplicate symbols; the kernels are private to their file (anonymous namespaces), and each kernel
// file exports only its launcher, declared at the end of this header.
//
// ---------------------------------------------------------------------------------------------------------
// qgemm: y[M, N] = epilogue( sum_g ascales[m,g] * wscales[n,g] * int32 dot_g ). Per group of 64 K the tensor
// cores give the exact int32 group dot, which is scaled into an fp32 accumulator right away (fp32 accumulation
// across groups, never half). The mma.sync kernel (qgemm_mma.cuh) and the wgmma kernel (qgemm_wgmma.cu) differ
// in how they get the dots; they share the cp.async loads, the unpackings, the scaling and the epilogue below.
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
//      warpgroup MMA (qgemm_wgmma_kernel in qgemm_wgmma.cu; mma.sync does not reach Hopper's peak).
//  Below sm_80 the GEMM traps and qgemm_cuda returns cudaErrorNotSupported (quantize_act runs anywhere).
//
// Epilogue: the low-rank up projection sum_r (lora_act[m,r] * lora_scales[r]) * lora_up[n,r] in fp32, with
// 32-rank chunks of lora_act (scaled) and lora_up staged in shared memory (reusing the pipeline buffers),
// then bias, activation and the store in the model dtype (pairs of columns per store when aligned).
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "dtype_io.cuh"  // activate
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
namespace qgemm_detail {

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


// Runs launch(TypeTag<T>{}) with T the element type of the model dtype (float, __half or __nv_bfloat16);
// the launcher reads T back as typename decltype(tag)::type.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename Launch>
cudaError_t for_dtype(QDtype dtype, Launch&& launch) {
  switch (dtype) {
    case QDtype::kFloat16: return launch(TypeTag<__half>{});
    case QDtype::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
    case QDtype::kFloat32: return launch(TypeTag<float>{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------
// PTX wrappers of the mma.sync paths (each guarded by the architectures that have the instruction)
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
// Tiles, group loads, scaling and epilogue of both GEMM kernels
// ---------------------------------------------------------------------------------------------------------
constexpr int kGemmThreads = 256;  // 8 warps: 2 along M x 4 along N
constexpr int kBN = 128;           // CTA tile N
constexpr int kNT = 4;             // m16n8 tiles per warp along N (warp N = 32)
constexpr int kStages = 4;         // cp.async pipeline depth, one group per stage
constexpr int kRankChunk = 32;     // ranks of the low-rank branch staged per epilogue pass
constexpr uint32_t kMagicBits = 0x4B400000u;  // 1.5 * 2^23
constexpr float kMagic = 12582912.f;

// Device-side names of the 4-bit tensor-core paths (QTensorPath without kAuto, resolved on the host).
constexpr int kPathS4 = 1, kPathS8 = 2, kPathE4M3 = 3, kPathWgmmaS8 = 4, kPathWgmmaE4M3 = 5;

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

// ---------------------------------------------------------------------------------------------------------
// Host side of the GEMM launchers
// ---------------------------------------------------------------------------------------------------------
inline bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// The kernel parameters of a GEMM whose model dtype has element type T.
template <typename T>
GemmParams gemm_params(const QGemmArgs& a) {
  GemmParams p;
  p.a = a;
  p.pair_store = a.N % 2 == 0 && aligned(a.y, 2 * sizeof(T));
  return p;
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

// The launchers of the GEMM kernels, one per kernel file; `a` passed qgemm_cuda's checks (qgemm.cu), `sms` is the
// device's multiprocessor count. Each returns the cudaError_t of its launch.
// qgemm_mma_s4.cu: 4-bit codes, mma.sync .s4 (sm_80..sm_89).
cudaError_t launch_qgemm_mma_s4(const QGemmArgs& a, int sms, cudaStream_t stream);
// qgemm_mma_s8.cu: 8-bit codes, or 4-bit codes unpacked to s8; mma.sync .s8 (sm_80 and later).
cudaError_t launch_qgemm_mma_s8(const QGemmArgs& a, int sms, cudaStream_t stream);
// qgemm_mma_e4m3.cu: 4-bit codes unpacked to e4m3, mma.sync .e4m3 (sm_89 and later).
cudaError_t launch_qgemm_mma_e4m3(const QGemmArgs& a, int sms, cudaStream_t stream);
// qgemm_wgmma.cu: 4-bit codes unpacked to s8 (fp8 false) or e4m3 (fp8 true) for wgmma (sm_90a builds only).
cudaError_t launch_qgemm_wgmma(const QGemmArgs& a, bool fp8, cudaStream_t stream);

}  // namespace qgemm_detail
}  // namespace velodiff
