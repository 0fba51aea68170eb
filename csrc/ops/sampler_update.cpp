// CPU implementation of velodiff::sampler_update (torch glue over csrc/kernels/cpu/sampler_update.cpp).
#include "sampler_update_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

std::tuple<at::Tensor, at::Tensor> sampler_update_cpu_op(
    const at::Tensor& x, const at::Tensor& cond, const std::optional<at::Tensor>& uncond,
    const std::optional<at::Tensor>& anchor, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& history, const at::Tensor& coef, int64_t write_slot, double guidance_rescale,
    bool want_y) {
  at::Tensor x_next, y;
  SamplerUpdateArgs a = prepare_sampler_update(x, cond, uncond, anchor, noise, history, coef, write_slot,
                                               guidance_rescale, want_y, x_next, y);
  char error[256] = {0};
  TORCH_CHECK(sampler_update_cpu(a, error), error);
  return {x_next, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CPU, m) { m.impl("sampler_update", &sampler_update_cpu_op); }

}  // namespace velodiff
