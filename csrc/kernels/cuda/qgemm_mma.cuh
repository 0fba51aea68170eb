// The mma.sync GEMM kernel of velodiff::qgemm: paths (a), (b) and (c) of qgemm_device.cuh for 4-bit codes, and
// every 8-bit GEMM. A template, included only by the files that instantiate it, one per tensor-core instruction
// (qgemm_mma_s4.cu, qgemm_mma_s8.cu, qgemm_mma_e4m3.cu); the kernel and its launch templates sit in an anonymous
// namespace, so each instantiation is private to the file that launches it.
//
// CTA tile BM x 128 (BM = 128, 64 or 32, picked so that the grid fills the GPU), 8 warps as 2 (M) x 4 (N), warp
// tile (BM/2) x 32 = MT x 4 tiles of m16n8. The K loop steps one group (64 K) at a time through a 4-stage
// cp.async pipeline of the packed A [BM x 64] and B [128 x 64] tiles (16-byte cp.async, zero-filled for rows past
// M or N; one __syncthreads per group). Per group and per m16n8 tile the tensor cores give the exact int32 group
// dot, which is scaled into an fp32 accumulator right away (fp32 accumulation across groups, never half).
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
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include "qgemm_device.cuh"

namespace velodiff {
namespace qgemm_detail {
namespace {

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

// Launches the mma.sync kernel on BITS-bit codes with tensor-core path PATH, in the model dtype of `a`.
template <int BITS, int PATH>
cudaError_t launch_mma_path(const QGemmArgs& a, int sms, cudaStream_t stream) {
  return for_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_gemm_bits<T, BITS, PATH>(gemm_params<T>(a), sms, stream);
  });
}

}  // namespace
}  // namespace qgemm_detail
}  // namespace velodiff
