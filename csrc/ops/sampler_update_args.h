// Torch glue shared by the CPU and CUDA implementations of velodiff::sampler_update: checks every argument
// (naming it in the error) and fills the torch-free SamplerUpdateArgs.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "velodiff/sampler_update.h"

namespace velodiff {

inline void check_state(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "sampler_update: ", name, " must be float32, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "sampler_update: ", name, " must have the shape of x ", x.sizes(),
                    ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), "sampler_update: ", name, " is on ", t->device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(t->is_contiguous(), "sampler_update: ", name, " must be contiguous");
}

inline ModelDType model_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ModelDType::kFloat32;
    case at::kHalf: return ModelDType::kFloat16;
    case at::kBFloat16: return ModelDType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "sampler_update: cond must be float32, float16 or bfloat16, got ",
                              t.scalar_type());
  }
  return ModelDType::kFloat32;
}

// Checks all arguments, allocates the outputs and returns the filled argument struct.
inline SamplerUpdateArgs prepare_sampler_update(const at::Tensor& x, const at::Tensor& cond,
                                                const std::optional<at::Tensor>& uncond,
                                                const std::optional<at::Tensor>& anchor,
                                                const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Tensor>& history, const at::Tensor& coef,
                                                int64_t write_slot, double guidance_rescale, bool want_y,
                                                at::Tensor& x_next, at::Tensor& y) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "sampler_update: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) >= 1, "sampler_update: x must have a non-empty batch dimension");
  TORCH_CHECK_VALUE(x.is_contiguous(), "sampler_update: x must be contiguous");
  const ModelDType mdt = model_dtype_of(cond);
  TORCH_CHECK_VALUE(cond.sizes() == x.sizes(), "sampler_update: cond must have the shape of x ", x.sizes(),
                    ", got ", cond.sizes());
  TORCH_CHECK_VALUE(cond.device() == x.device(), "sampler_update: cond is on ", cond.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(cond.is_contiguous(), "sampler_update: cond must be contiguous");
  if (uncond.has_value()) {
    TORCH_CHECK_TYPE(uncond->scalar_type() == cond.scalar_type(), "sampler_update: uncond must have cond's dtype ",
                     cond.scalar_type(), ", got ", uncond->scalar_type());
    TORCH_CHECK_VALUE(uncond->sizes() == x.sizes(), "sampler_update: uncond must have the shape of x");
    TORCH_CHECK_VALUE(uncond->device() == x.device(), "sampler_update: uncond must be on x's device");
    TORCH_CHECK_VALUE(uncond->is_contiguous(), "sampler_update: uncond must be contiguous");
  }
  check_state("anchor", anchor, x);
  check_state("noise", noise, x);
  int64_t K = 0;
  if (history.has_value()) {
    const at::Tensor& h = *history;
    TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, "sampler_update: history must be float32, got ",
                     h.scalar_type());
    TORCH_CHECK_VALUE(h.dim() == x.dim() + 1 && h.sizes().slice(1) == x.sizes(),
                      "sampler_update: history must have shape [K, *x.shape], got ", h.sizes());
    K = h.size(0);
    TORCH_CHECK_VALUE(K >= 1 && K <= kMaxHistory, "sampler_update: history must have 1..", kMaxHistory,
                      " slots, got ", K);
    TORCH_CHECK_VALUE(h.device() == x.device(), "sampler_update: history must be on x's device");
    TORCH_CHECK_VALUE(h.is_contiguous(), "sampler_update: history must be contiguous");
  }
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "sampler_update: coef must be float32, got ",
                   coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == sampler_coef_count(static_cast<int>(K)),
                    "sampler_update: coef must have shape [", sampler_coef_count(static_cast<int>(K)), "] for ", K,
                    " history slots, got ", coef.sizes());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "sampler_update: coef must be on x's device");
  TORCH_CHECK_VALUE(coef.is_contiguous(), "sampler_update: coef must be contiguous");
  TORCH_CHECK_VALUE(write_slot >= -1 && write_slot < K, "sampler_update: write_slot must be -1 or in [0, ", K,
                    "), got ", write_slot);
  TORCH_CHECK_VALUE(guidance_rescale >= 0.0 && guidance_rescale <= 1.0,
                    "sampler_update: guidance_rescale must be in [0, 1], got ", guidance_rescale);
  const int64_t per_sample = x.numel() / x.size(0);
  TORCH_CHECK_VALUE(guidance_rescale == 0.0 || (uncond.has_value() && per_sample >= 2),
                    "sampler_update: guidance_rescale > 0 needs uncond and >= 2 elements per sample");

  x_next = at::empty_like(x);
  y = want_y ? at::empty_like(x) : at::empty({0}, x.options());
  SamplerUpdateArgs a;
  a.x = x.data_ptr<float>();
  a.cond = cond.data_ptr();
  a.uncond = uncond.has_value() ? uncond->data_ptr() : nullptr;
  a.model_dtype = mdt;
  a.anchor = anchor.has_value() ? anchor->data_ptr<float>() : nullptr;
  a.noise = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  a.history = history.has_value() ? history->data_ptr<float>() : nullptr;
  a.coef = coef.data_ptr<float>();
  a.x_next = x_next.data_ptr<float>();
  a.y = want_y ? y.data_ptr<float>() : nullptr;
  a.batch = x.size(0);
  a.per_sample = per_sample;
  a.history_slots = static_cast<int>(K);
  a.write_slot = static_cast<int>(write_slot);
  a.guidance_rescale = static_cast<float>(guidance_rescale);
  return a;
}

}  // namespace velodiff
