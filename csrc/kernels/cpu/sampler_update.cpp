// CPU kernel of the fused sampler update. Semantics: csrc/include/velodiff/sampler_update.h.
#include <cmath>
#include <cstdio>
#include <vector>

#include "velodiff/float16.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

struct Loader {
  ModelDType dtype;
  const void* ptr;
  inline float operator()(int64_t i) const {
    switch (dtype) {
      case ModelDType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(ptr)[i]);
      case ModelDType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(ptr)[i]);
      default: return static_cast<const float*>(ptr)[i];
    }
  }
};

// The CFG-combined model output at element i (before guidance rescale).
inline float guided(const Loader& c, const Loader* u, float w, float delta, int64_t i) {
  const float ci = c(i);
  if (u == nullptr) return ci;
  const float ui = delta * (*u)(i);
  return ui + w * (ci - ui);
}

// Per-sample factor (1 - phi) + phi * std(c_b) / std(g_b), Lin et al. 2305.08891 eq. 15-16; unbiased std.
std::vector<float> rescale_factors(const SamplerUpdateArgs& a, const Loader& c, const Loader& u, float w,
                                   float delta) {
  std::vector<float> factor(a.batch, 1.f);
  const int64_t S = a.per_sample;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < a.batch; ++b) {
    double sc = 0, scc = 0, sg = 0, sgg = 0;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t i = b * S + j;
      const double ci = c(i);
      const double gi = guided(c, &u, w, delta, i);
      sc += ci;
      scc += ci * ci;
      sg += gi;
      sgg += gi * gi;
    }
    const double var_c = (scc - sc * sc / S) / (S - 1);
    const double var_g = (sgg - sg * sg / S) / (S - 1);
    const double ratio = std::sqrt(std::fmax(var_c, 0.0)) / std::sqrt(std::fmax(var_g, 0.0));
    factor[b] = static_cast<float>((1.0 - a.guidance_rescale) + a.guidance_rescale * ratio);
  }
  return factor;
}

}  // namespace

bool sampler_update_cpu(const SamplerUpdateArgs& a, char* error) {
  if (a.x == nullptr || a.cond == nullptr || a.coef == nullptr || a.x_next == nullptr) {
    std::snprintf(error, 256, "sampler_update_cpu: x, cond, coef and x_next must be non-null");
    return false;
  }
  const int K = a.history_slots;
  if (K < 0 || K > kMaxHistory || (K > 0 && a.history == nullptr)) {
    std::snprintf(error, 256, "sampler_update_cpu: history_slots must be in [0, %d] with a buffer, got %d",
                  kMaxHistory, K);
    return false;
  }
  if (a.write_slot >= K || a.write_slot < -1) {
    std::snprintf(error, 256, "sampler_update_cpu: write_slot %d out of range for %d slots", a.write_slot, K);
    return false;
  }
  if (a.guidance_rescale > 0.f && (a.uncond == nullptr || a.per_sample < 2)) {
    std::snprintf(error, 256, "sampler_update_cpu: guidance_rescale needs uncond and >= 2 elements per sample");
    return false;
  }
  const float* cf = a.coef;
  const float w = cf[kCoefW], delta = cf[kCoefDelta];
  const float px = cf[kCoefPx], pm = cf[kCoefPm];
  const float cx = cf[kCoefCx], ca = cf[kCoefCa], cd = cf[kCoefCd], cz = cf[kCoefCz];
  const float ex = cf[kCoefEx], ea = cf[kCoefEa], ed = cf[kCoefEd];
  const float* q = cf + kCoefHeader;
  const float* ch = q + K;
  const float* eh = ch + K;

  const Loader cond{a.model_dtype, a.cond};
  const Loader uncond{a.model_dtype, a.uncond};
  const Loader* up = a.uncond ? &uncond : nullptr;
  std::vector<float> factor;
  if (a.guidance_rescale > 0.f) factor = rescale_factors(a, cond, uncond, w, delta);

  const int64_t S = a.per_sample;
  const int64_t N = a.batch * S;
  const int64_t slot_stride = N;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    float g = guided(cond, up, w, delta, i);
    if (!factor.empty()) g *= factor[i / S];
    const float xi = a.x[i];
    float d = px * xi + pm * g;
    float xn = cx * xi + cz * (a.noise ? a.noise[i] : 0.f) + ca * (a.anchor ? a.anchor[i] : 0.f);
    float yv = ex * xi + ea * (a.anchor ? a.anchor[i] : 0.f);
    for (int k = 0; k < K; ++k) {
      const float h = a.history[k * slot_stride + i];
      d += q[k] * h;
      xn += ch[k] * h;
      yv += eh[k] * h;
    }
    a.x_next[i] = xn + cd * d;
    if (a.y) a.y[i] = yv + ed * d;
    if (a.write_slot >= 0) a.history[a.write_slot * slot_stride + i] = d;
  }
  return true;
}

}  // namespace velodiff
