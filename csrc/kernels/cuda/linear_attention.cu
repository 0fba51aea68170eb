// CUDA kernels of non-causal linear attention. Semantics: csrc/include/velodiff/linear_attention.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// Simple first version, correct before fast (not yet run or timed on a GPU). Three launches on one stream:
//   1. state_kernel, grid (P chunks x D/32 x (Dv+1)/32 state tiles, B * H): a block of 256 threads owns a 32 x 32 tile
//      of the augmented state [S' | z'] (header) for one key chunk: per step it stages 32 keys' phi(k) (the tile's
//      rows) and [v, 1] (the tile's columns) as fp32 in shared memory, then each thread adds them to its 4 state
//      elements in registers (fp32 fma, key order). The partial tile goes to the workspace [B * H, P, D, Dv + 1].
//      Splitting the keys into P chunks (linear_attention_cuda_chunks) gives a batch-1 call enough blocks, instead
//      of one block walking all Nk keys per (b, h) as the public Triton kernels do.
//   2. sum_kernel (only when P > 1): the partials of each state element added in chunk order (deterministic; no
//      atomics), into the workspace after the partials.
//   3. output_kernel, grid (ceil(Nq / 8), B * H): one warp per query; it stages phi(q_i) in shared memory, reduces
//      the denominator phi(q_i) . z' + eps' over the warp, and lane c writes channels c, c + 32, ... as an fp32 dot
//      product over d against the state (read from global memory / L2, coalesced over the lanes) divided by it
//      (IEEE division, __fdiv_rn).
// No host synchronisation: the op can be captured in a CUDA graph.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype_io.cuh"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int kTile = kLinAttnCudaTile;  // 32 state rows x 32 state columns per block
constexpr int kStateThreads = 256;       // thread t: row t / 8, columns t % 8 + 8 u (u < 4)
constexpr int kKeyStep = 32;             // keys staged per step
constexpr int kOutWarps = 8;
constexpr int kOutThreads = kOutWarps * 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <AttnDType DT>
__global__ void __launch_bounds__(kStateThreads)
    state_kernel(const LinearAttentionArgs a, float* partial, int64_t chunks, int64_t chunk, int tiles_c) {
  __shared__ float sk[kKeyStep][kTile + 1];  // phi(k) of the step's keys, the tile's rows
  __shared__ float sv[kKeyStep][kTile];      // [v, 1, 0...] of the step's keys, the tile's columns
  const int64_t D = a.head_dim, Dv = a.v_head_dim, W = Dv + 1, Nk = a.kv_len;
  const int64_t tiles_d = (D + kTile - 1) / kTile;
  const int64_t per_chunk = tiles_d * tiles_c;
  const int64_t p = blockIdx.x / per_chunk, rem = blockIdx.x % per_chunk;
  const int64_t d0 = (rem / tiles_c) * kTile, c0 = (rem % tiles_c) * kTile;
  const int row = threadIdx.x >> 3, cg = threadIdx.x & 7;
  const int64_t j0 = p * chunk < Nk ? p * chunk : Nk;
  const int64_t j1 = j0 + chunk < Nk ? j0 + chunk : Nk;
  for (int64_t bh = blockIdx.y; bh < a.batch * a.heads; bh += gridDim.y) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
    const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t t0 = j0; t0 < j1; t0 += kKeyStep) {
      const int n = static_cast<int>(j1 - t0 < kKeyStep ? j1 - t0 : kKeyStep);
      __syncthreads();  // the previous step's tiles are no longer being read
      for (int e = threadIdx.x; e < kKeyStep * kTile; e += kStateThreads) {
        const int jj = e / kTile, x = e % kTile;
        float kx = 0.f, vx = 0.f;
        if (jj < n) {
          const int64_t j = t0 + jj, d = d0 + x, c = c0 + x;
          if (d < D) kx = linear_attention_phi(a.kind, load_f<DT>(a.k, kbase + j * a.k_stride[2] + d * a.k_stride[3]));
          if (c < Dv)
            vx = load_f<DT>(a.v, vbase + j * a.v_stride[2] + c * a.v_stride[3]);
          else if (c == Dv)
            vx = 1.f;  // the column of z' = sum_j phi(k_j)
        }
        sk[jj][x] = kx;
        sv[jj][x] = vx;
      }
      __syncthreads();
      for (int jj = 0; jj < n; ++jj) {
        const float kd = sk[jj][row];
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[u] = fmaf(kd, sv[jj][cg + 8 * u], acc[u]);
      }
    }
    const int64_t d = d0 + row;
    if (d < D) {
      float* dst = partial + ((bh * chunks + p) * D + d) * W;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = c0 + cg + 8 * u;
        if (c < W) dst[c] = acc[u];
      }
    }
  }
}

// state[bh, e] = sum_p partial[bh, p, e] in chunk order, e < D * W.
__global__ void sum_kernel(const float* partial, float* state, int64_t bh_count, int64_t chunks, int64_t per_state) {
  const int64_t total = bh_count * per_state;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bh = idx / per_state, e = idx % per_state;
    const float* src = partial + bh * chunks * per_state + e;
    float s = src[0];
    for (int64_t p = 1; p < chunks; ++p) s += src[p * per_state];
    state[idx] = s;
  }
}

template <AttnDType DT>
__global__ void __launch_bounds__(kOutThreads)
    output_kernel(const LinearAttentionArgs a, const float* state, float eps_sum) {
  extern __shared__ float sq[];  // [kOutWarps, D]: phi(q_i) of each warp's query
  const int64_t D = a.head_dim, Dv = a.v_head_dim, W = Dv + 1;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kOutWarps + warp;
  if (i >= a.q_len) return;  // warp-uniform; no block-wide barrier below
  float* q = sq + warp * D;
  for (int64_t bh = blockIdx.y; bh < a.batch * a.heads; bh += gridDim.y) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t qrow = b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
    __syncwarp();  // the previous (b, h)'s row is no longer being read
    for (int64_t d = lane; d < D; d += 32) q[d] = linear_attention_phi(a.kind, load_f<DT>(a.q, qrow + d * a.q_stride[3]));
    __syncwarp();
    const float* s = state + bh * D * W;
    float part = 0.f;
    for (int64_t d = lane; d < D; d += 32) part = fmaf(q[d], s[d * W + Dv], part);
    const float den = warp_sum(part) + eps_sum;  // phi(q_i) . z' + eps' >= eps' > 0
    const int64_t orow = b * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
    for (int64_t c = lane; c < Dv; c += 32) {
      float num = 0.f;
      for (int64_t d = 0; d < D; ++d) num = fmaf(q[d], s[d * W + c], num);
      store_f<DT>(a.out, orow + c * a.out_stride[3], __fdiv_rn(num, den));
    }
  }
}

template <AttnDType DT>
int launch(const LinearAttentionArgs& a, float* workspace, cudaStream_t stream) {
  const int64_t BH = a.batch * a.heads, D = a.head_dim, Dv = a.v_head_dim, W = Dv + 1, Nk = a.kv_len;
  const int64_t chunks = linear_attention_cuda_chunks(BH, Nk, D, Dv);
  const int64_t chunk = (Nk + chunks - 1) / chunks;
  const int64_t tiles_c = (W + kTile - 1) / kTile;
  const int64_t blocks = chunks * linear_attention_cuda_state_tiles(D, Dv);
  if (blocks > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const unsigned grid_y = static_cast<unsigned>(BH < 65535 ? BH : 65535);
  float* partial = workspace;
  float* state = chunks > 1 ? workspace + BH * chunks * D * W : workspace;
  state_kernel<DT><<<dim3(static_cast<unsigned>(blocks), grid_y), kStateThreads, 0, stream>>>(
      a, partial, chunks, chunk, static_cast<int>(tiles_c));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  if (chunks > 1) {
    const int64_t total = BH * D * W;
    const int64_t sum_blocks = (total + 255) / 256 < 65535 ? (total + 255) / 256 : 65535;
    sum_kernel<<<static_cast<unsigned>(sum_blocks), 256, 0, stream>>>(partial, state, BH, chunks, D * W);
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t qtiles = (a.q_len + kOutWarps - 1) / kOutWarps;
  const size_t smem = static_cast<size_t>(kOutWarps * D) * sizeof(float);  // <= 16 KB (D <= 512)
  output_kernel<DT><<<dim3(static_cast<unsigned>(qtiles), grid_y), kOutThreads, smem, stream>>>(
      a, state, linear_attention_eps_sum(a));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int linear_attention_cuda(const LinearAttentionArgs& a, float* workspace, void* stream) {
  if (a.batch * a.heads == 0) return 0;
  if (a.head_dim < 1 || a.head_dim > kLinearAttentionMaxHeadDim || a.v_head_dim < 1 ||
      a.v_head_dim > kLinearAttentionMaxHeadDim || a.q_len < 1 || a.kv_len < 1 || workspace == nullptr ||
      (a.q_len + kOutWarps - 1) / kOutWarps > 2147483647LL)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case AttnDType::kFloat16: return launch<AttnDType::kFloat16>(a, workspace, s);
    case AttnDType::kBFloat16: return launch<AttnDType::kBFloat16>(a, workspace, s);
    default: return launch<AttnDType::kFloat32>(a, workspace, s);
  }
}

}  // namespace velodiff
