// CUDA implementation of velodiff::sampler_update (torch glue over csrc/kernels/cuda/sampler_update.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "sampler_update_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

std::tuple<at::Tensor, at::Tensor> sampler_update_cuda_op(
    const at::Tensor& x, const at::Tensor& cond, const std::optional<at::Tensor>& uncond,
    const std::optional<at::Tensor>& anchor, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& history, const at::Tensor& coef, int64_t write_slot, double guidance_rescale,
    bool want_y) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_next, y;
  SamplerUpdateArgs a = prepare_sampler_update(x, cond, uncond, anchor, noise, history, coef, write_slot,
                                               guidance_rescale, want_y, x_next, y);
  at::Tensor workspace;
  if (guidance_rescale > 0) workspace = at::empty({4 * x.size(0)}, x.options().dtype(at::kDouble));
  const int err = sampler_update_cuda(a, guidance_rescale > 0 ? workspace.data_ptr<double>() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sampler_update: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {x_next, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) { m.impl("sampler_update", &sampler_update_cuda_op); }

}  // namespace velodiff
