// CUDA kernel of exact attention. Semantics: csrc/include/velodiff/attention.h.
// Torch-free: compiles with nvcc alone (CI compiles it for sm_80, sm_89 and sm_90a on a CPU-only machine).
//
// Simple first version, correct before fast (not yet run or timed on a GPU): grid (ceil(Lq / 8), B * H), a block
// of 8 warps, one warp per query, running flash_block (attention_device.cuh: K / V tiles in shared memory, online
// softmax with warp shuffles, the output channels in registers) over every key of (b, h), masked keys left out of
// the softmax. One launch, no atomics, no host synchronisation: the op can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include "attention_device.cuh"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

using attention_device::kThreads;
using attention_device::kWarps;

// Every key of (b, h), in order; attended unless the key-padding mask says otherwise.
struct AllKeys {
  int64_t count;
  const uint8_t* mask;  // this batch's row of the mask, or nullptr
  int64_t mask_stride;
  __device__ int64_t token(int64_t j) const { return j; }
  __device__ bool kept(int64_t j) const { return mask == nullptr || mask[j * mask_stride] != 0; }
};

template <AttnDType DT>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionArgs a, int tile) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5;
  for (int64_t bh = blockIdx.y; bh < a.batch * a.heads; bh += gridDim.y) {
    const int64_t b = bh / a.heads, h = bh % a.heads;
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    const AllKeys keys{a.kv_len, a.mask != nullptr ? a.mask + b * a.mask_stride[0] : nullptr, a.mask_stride[1]};
    attention_device::flash_block<DT>(a, b, h, i < a.q_len ? i : -1, keys, tile, smem);
    __syncthreads();  // sq is rewritten for the next (b, h)
  }
}

template <AttnDType DT>
int launch(const AttentionArgs& a, cudaStream_t stream) {
  const int tile = attention_cuda_key_tile(a.head_dim, a.v_head_dim);
  const size_t smem = static_cast<size_t>(attention_cuda_smem_bytes(a.head_dim, a.v_head_dim));
  const cudaError_t err = attention_device::allow_attention_smem(attention_kernel<DT>, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t qtiles = (a.q_len + kWarps - 1) / kWarps;
  const int64_t bh = a.batch * a.heads;
  const dim3 grid(static_cast<unsigned>(qtiles), static_cast<unsigned>(bh < 65535 ? bh : 65535));
  attention_kernel<DT><<<grid, kThreads, smem, stream>>>(a, tile);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int attention_cuda(const AttentionArgs& a, void* stream) {
  if (a.batch * a.heads * a.q_len == 0) return 0;
  if (a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.v_head_dim < 1 ||
      a.v_head_dim > kAttentionMaxHeadDim || (a.q_len + kWarps - 1) / kWarps > 2147483647LL)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case AttnDType::kFloat16: return launch<AttnDType::kFloat16>(a, s);
    case AttnDType::kBFloat16: return launch<AttnDType::kBFloat16>(a, s);
    default: return launch<AttnDType::kFloat32>(a, s);
  }
}

}  // namespace velodiff
