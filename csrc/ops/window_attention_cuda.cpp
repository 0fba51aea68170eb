// CUDA implementation of velodiff::window_attention (torch glue over csrc/kernels/cuda/window_attention.cu). No
// host sync.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "velodiff/kernels.h"
#include "window_attention_args.h"

namespace velodiff {
namespace {

at::Tensor window_attention_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    c10::IntArrayRef size, c10::IntArrayRef window, c10::IntArrayRef shift,
                                    std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out;
  const WindowAttentionArgs a = prepare_window_attention(q, k, v, size, window, shift, scale, out);
  if (out.numel() == 0) return out;
  const int err = window_attention_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "window_attention: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) { m.impl("window_attention", &window_attention_cuda_op); }

}  // namespace velodiff
