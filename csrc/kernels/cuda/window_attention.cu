// CUDA kernel of windowed attention (MSW-MSA). Semantics: csrc/include/velodiff/window_attention.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// Simple first version, correct before fast (not yet run or timed on a GPU): grid (windows * ceil(Wh * Ww / 8),
// min(B * H, 65535)), a block of 8 warps per (window, 8 of its queries) and (b, h), one warp per query. The window
// and the query's slot come from the block index, its token from the header's index arithmetic
// (window_token: the cyclic shift and the windows, no partition or reverse copy), and the block runs exact
// attention's flash_block (attention_device.cuh) over the window's real tokens in local row-major order (key j is
// slot (j / C, j % C) of the window's R x C real slots). Blocks past a window's last query (the smaller windows at
// the map's bottom and right edges) return at once. One launch, no atomics, no host synchronisation.
#include <cuda_runtime.h>

#include "attention_device.cuh"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

using attention_device::kThreads;
using attention_device::kWarps;

// The real tokens of window (wy, wx): R x C of them, all attended.
struct WindowKeys {
  WindowAttentionArgs map;  // the shift and window sizes (a copy: kernel parameters are not addressed)
  int64_t wy, wx, cols, count;
  __device__ int64_t token(int64_t j) const { return window_token(map, wy, wx, j / cols, j % cols); }
  __device__ bool kept(int64_t) const { return true; }
};

template <AttnDType DT>
__global__ void __launch_bounds__(kThreads) window_attention_kernel(const WindowAttentionArgs wa, int64_t nw,
                                                                    int64_t qtiles, int tile) {
  extern __shared__ float smem[];
  const AttentionArgs& a = wa.attn;
  const int64_t window = blockIdx.x / qtiles, qtile = blockIdx.x % qtiles;
  const int64_t wy = window / nw, wx = window % nw;
  const int64_t rows = window_real(wy, wa.window_h, wa.height), cols = window_real(wx, wa.window_w, wa.width);
  const int64_t count = rows * cols;
  if (qtile * kWarps >= count) return;  // uniform over the block: no barrier is skipped by part of it
  const int64_t slot = qtile * kWarps + (threadIdx.x >> 5);
  const int64_t query = slot < count ? window_token(wa, wy, wx, slot / cols, slot % cols) : -1;
  const WindowKeys keys{wa, wy, wx, cols, count};
  for (int64_t bh = blockIdx.y; bh < a.batch * a.heads; bh += gridDim.y) {
    attention_device::flash_block<DT>(a, bh / a.heads, bh % a.heads, query, keys, tile, smem);
    __syncthreads();  // sq is rewritten for the next (b, h)
  }
}

template <AttnDType DT>
int launch(const WindowAttentionArgs& wa, int64_t windows, int64_t nw, int64_t qtiles, cudaStream_t stream) {
  const AttentionArgs& a = wa.attn;
  const int tile = attention_cuda_key_tile(a.head_dim, a.v_head_dim);
  const size_t smem = static_cast<size_t>(attention_cuda_smem_bytes(a.head_dim, a.v_head_dim));
  const cudaError_t err = attention_device::allow_attention_smem(window_attention_kernel<DT>, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t bh = a.batch * a.heads;
  const dim3 grid(static_cast<unsigned>(windows * qtiles), static_cast<unsigned>(bh < 65535 ? bh : 65535));
  window_attention_kernel<DT><<<grid, kThreads, smem, stream>>>(wa, nw, qtiles, tile);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int window_attention_cuda(const WindowAttentionArgs& wa, void* stream) {
  const AttentionArgs& a = wa.attn;
  if (a.batch * a.heads == 0) return 0;
  if (a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.v_head_dim < 1 ||
      a.v_head_dim > kAttentionMaxHeadDim || wa.height < 1 || wa.width < 1 ||
      a.q_len != wa.height * wa.width || a.kv_len != a.q_len || a.mask != nullptr || wa.window_h < 1 ||
      wa.window_h > wa.height || wa.window_w < 1 || wa.window_w > wa.width || wa.shift_y < 0 ||
      wa.shift_y >= wa.height || wa.shift_x < 0 || wa.shift_x >= wa.width)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t nw = window_grid(wa.width, wa.window_w);
  const int64_t windows = window_grid(wa.height, wa.window_h) * nw;
  const int64_t qtiles = (wa.window_h * wa.window_w + kWarps - 1) / kWarps;
  if (windows * qtiles > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case AttnDType::kFloat16: return launch<AttnDType::kFloat16>(wa, windows, nw, qtiles, s);
    case AttnDType::kBFloat16: return launch<AttnDType::kBFloat16>(wa, windows, nw, qtiles, s);
    default: return launch<AttnDType::kFloat32>(wa, windows, nw, qtiles, s);
  }
}

}  // namespace velodiff
