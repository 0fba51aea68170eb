// CUDA implementation of velodiff::attention (torch glue over csrc/kernels/cuda/attention.cu). No host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "attention_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor attention_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out;
  const AttentionArgs a = prepare_attention(q, k, v, key_padding_mask, scale, out);
  if (out.numel() == 0) return out;
  const int err = attention_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "attention: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) { m.impl("attention", &attention_cuda_op); }

}  // namespace velodiff
