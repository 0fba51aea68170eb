// velodiff::qgemm on Hopper's warpgroup MMA, path (d) of qgemm_device.cuh (sm_90a only; QTensorPath kWgmmaS8 /
// kWgmmaE4M3, bits 4), and the flag that tells the host whether this build has that code. Torch-free.
//
// ---------------------------------------------------------------------------------------------------------
// CTA tile 64 WGS x 128 with WGS = 1 or 2 warpgroups (QGemmArgs::wgmma_rows; 1 is the default: two CTAs per
// SM, so that one's MMAs can run while the other scales); warpgroup w computes rows 64 w .. 64 w + 63 with
// wgmma.mma_async m64n128k32 (s8 or e4m3, both operands from shared memory). Per group of 64 K:
//  1. the packed 4-bit A and B tiles arrive through a 4-stage cp.async ring (the mma.sync kernel's stages,
//     load_stage);
//  2. all threads unpack a group into 8-bit codes (the s8 or e4m3 bytes of paths (b) / (c), nib_even / nib_odd)
//     in the canonical K-major layout without swizzle: 8-row x 16-byte "core matrices" of 128 contiguous bytes, the
//     two core matrices of a k32 step adjacent (leading byte offset 128), 8-row groups 256 bytes apart
//     (stride byte offset 256); two such buffers alternate between groups. Which K element lands where does
//     not matter as long as A and B agree (a group's dot is a sum), so the cheap even/odd nibble split is used.
//     fence.proxy.async (the tensor cores read what ordinary stores wrote) and a barrier publish it;
//  3. group kt: two wgmma (k32 each; the first with scale-d = 0, so no other instruction ever writes the
//     accumulators), committed together; while they run, the threads unpack group kt + 1 into the other
//     buffer; then wgmma.wait_group 0 and the group's dots are scaled into the fp32 accumulators,
//     acc += dot * (ascale[m] * wscale[n]) (s8: the int32 bits through the magic-number step, dot_from_magic; e4m3:
//     the fp32 result directly, exact as in path (c)).
// Reading one accumulator set while the next group's MMAs run (two sets) made ptxas serialize the wgmma
// (C7514) and spill at 255 registers; one set uses ~200 registers and no local memory.
// A first version: no warp specialisation, no TMA; the next steps (a producer warpgroup that loads and
// unpacks, setmaxnreg, 128-byte swizzle, scaling overlapped with the other warpgroup's MMAs) wait for an H100
// to measure this one.
// ---------------------------------------------------------------------------------------------------------
#include <type_traits>

#include "qgemm_device.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define VELODIFF_QGEMM_WGMMA 1
#else
#define VELODIFF_QGEMM_WGMMA 0
#endif

namespace velodiff {
namespace qgemm_detail {
namespace {

// 1 in the device code built for sm_90a, 0 in every other image: the host asks (qgemm_cuda_wgmma_built below)
// before it picks a wgmma path. Defined here only; without relocatable device code (the build's -rdc=false) a
// __device__ variable is reachable by cudaMemcpyFromSymbol only from the file that defines it, so its reader
// lives here too.
__device__ int g_qgemm_wgmma_built = VELODIFF_QGEMM_WGMMA;

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

}  // namespace

cudaError_t launch_qgemm_wgmma(const QGemmArgs& a, bool fp8, cudaStream_t stream) {
  return for_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fp8 ? launch_wgmma<T, true>(gemm_params<T>(a), stream) : launch_wgmma<T, false>(gemm_params<T>(a), stream);
  });
}

}  // namespace qgemm_detail

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
  err = cudaMemcpyFromSymbol(&value, qgemm_detail::g_qgemm_wgmma_built, sizeof(int));
  if (err != cudaSuccess) return err;
  built = value == 1;
  if (device < 64) known[device].store(built ? 2 : 1, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace velodiff
