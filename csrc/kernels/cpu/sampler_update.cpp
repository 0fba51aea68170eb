// CPU kernel of the fused sampler update. Semantics: csrc/include/velodiff/sampler_update.h.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 -> fp32 with the F16C instruction (8 values per instruction), chosen at run time.
__attribute__((target("avx,f16c"))) void fp16_block_f16c(const uint16_t* p, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
  for (; j < n; ++j) dst[j] = fp16_to_float_branchless(p[j]);
}
const bool kHaveF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#endif

// Converts n model-output values starting at i into dst (fp32).
inline void load_block(const Loader& src, int64_t i, int64_t n, float* dst) {
  switch (src.dtype) {
    case ModelDType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src.ptr) + i;
#if defined(__x86_64__) && defined(__GNUC__)
      if (kHaveF16C) {
        fp16_block_f16c(p, n, dst);
        break;
      }
#endif
      for (int64_t j = 0; j < n; ++j) dst[j] = fp16_to_float_branchless(p[j]);
      break;
    }
    case ModelDType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src.ptr) + i;
      for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(p[j]);
      break;
    }
    default: {
      const float* p = static_cast<const float*>(src.ptr) + i;
      for (int64_t j = 0; j < n; ++j) dst[j] = p[j];
    }
  }
}

constexpr int64_t kBlock = 512;            // elements per inner block (fits L1 with all streams)
constexpr int64_t kParallelMin = 1 << 16;  // below this, threads cost more than they save

// One block [i0, i0 + n): the whole update with K known at compile time so the loops vectorise.
template <int K>
void update_block(const SamplerUpdateArgs& a, const Loader& cond, const Loader* uncond, const float* factor,
                  int64_t i0, int64_t n) {
  float g[kBlock];
  float u[kBlock];
  const float* cf = a.coef;
  load_block(cond, i0, n, g);
  if (uncond != nullptr) {
    load_block(*uncond, i0, n, u);
    const float w = cf[kCoefW], delta = cf[kCoefDelta];
    for (int64_t j = 0; j < n; ++j) {
      const float uj = delta * u[j];
      g[j] = uj + w * (g[j] - uj);
    }
    if (factor != nullptr) {
      const int64_t S = a.per_sample;
      for (int64_t j = 0; j < n; ++j) g[j] *= factor[(i0 + j) / S];
    }
  }
  const int64_t N = a.batch * a.per_sample;
  const float px = cf[kCoefPx], pm = cf[kCoefPm];
  const float cx = cf[kCoefCx], ca = cf[kCoefCa], cd = cf[kCoefCd], cz = cf[kCoefCz];
  const float ex = cf[kCoefEx], ea = cf[kCoefEa], ed = cf[kCoefEd];
  const float* q = cf + kCoefHeader;
  const float* ch = q + K;
  const float* eh = ch + K;
  const float* __restrict__ x = a.x + i0;
  const float* __restrict__ an = a.anchor ? a.anchor + i0 : nullptr;
  const float* __restrict__ z = a.noise ? a.noise + i0 : nullptr;
  float* __restrict__ xn = a.x_next + i0;
  float* __restrict__ y = a.y ? a.y + i0 : nullptr;
  float d[kBlock];
  float acc_x[kBlock];
  float acc_y[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    d[j] = px * x[j] + pm * g[j];
    acc_x[j] = cx * x[j];
    acc_y[j] = ex * x[j];
  }
  if (an != nullptr)
    for (int64_t j = 0; j < n; ++j) {
      acc_x[j] += ca * an[j];
      acc_y[j] += ea * an[j];
    }
  if (z != nullptr)
    for (int64_t j = 0; j < n; ++j) acc_x[j] += cz * z[j];
  for (int k = 0; k < K; ++k) {
    const float* __restrict__ h = a.history + k * N + i0;
    const float qk = q[k], ck = ch[k], ek = eh[k];
    for (int64_t j = 0; j < n; ++j) {
      d[j] += qk * h[j];
      acc_x[j] += ck * h[j];
      acc_y[j] += ek * h[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) xn[j] = acc_x[j] + cd * d[j];
  if (y != nullptr)
    for (int64_t j = 0; j < n; ++j) y[j] = acc_y[j] + ed * d[j];
  if (a.write_slot >= 0) {
    float* __restrict__ hw = a.history + a.write_slot * N + i0;
    for (int64_t j = 0; j < n; ++j) hw[j] = d[j];
  }
}

template <int K>
void update_all(const SamplerUpdateArgs& a, const Loader& cond, const Loader* uncond, const float* factor) {
  const int64_t N = a.batch * a.per_sample;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (N >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kBlock;
    update_block<K>(a, cond, uncond, factor, i0, std::min(kBlock, N - i0));
  }
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
  const Loader cond{a.model_dtype, a.cond};
  const Loader uncond{a.model_dtype, a.uncond};
  const Loader* up = a.uncond ? &uncond : nullptr;
  std::vector<float> factor;
  if (a.guidance_rescale > 0.f) factor = rescale_factors(a, cond, uncond, a.coef[kCoefW], a.coef[kCoefDelta]);
  const float* fp = factor.empty() ? nullptr : factor.data();
  if (!dispatch_history(K, [&](auto k) { update_all<decltype(k)::value>(a, cond, up, fp); })) return false;
  return true;
}

}  // namespace velodiff
