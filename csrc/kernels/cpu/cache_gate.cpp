// CPU kernel of the cache gate. Semantics: csrc/include/velodiff/cache_gate.h.
//
// One pass over the probe: every sample is split into fixed chunks of kChunk elements (the tasks of an OpenMP
// loop); a task reads its probe and reference values as fp32 (exact for fp16 / bf16), adds |p - s| and |s| in
// fp64 into 8 lanes (each value widened to fp64, so nothing rounds before the sums), stores the probe's bytes into
// the spare buffer stored[w] on the way (AVX2 + F16C, chosen at run time; a portable path otherwise), and leaves
// its two sums in a partial array. The partials are then added per sample in chunk order: the result is the same
// for every thread count, and the AVX2 path gives the same bits as the portable one (the same IEEE operations
// per lane in the same order, no multiplies to contract). VELODIFF_CACHE_GATE_SCALAR=1 forces the portable path
// (the tests compare the two).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "velodiff/cache_gate.h"
#include "velodiff/float16.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int64_t kChunk = 16384;          // elements per task: the fixed split of a sample
constexpr int64_t kBlock = 512;            // elements converted at a time (two fp32 blocks stay in L1)
constexpr int kLanes = 8;                  // independent fp64 partial sums per task, added in a fixed order
constexpr int64_t kParallelMin = 1 << 16;  // below this many elements, threads cost more than they save

// Portable sums of one block into the 8 lanes: lane l takes the elements j with j % 8 == l.
void block_sums_portable(const float* p, const float* s, int64_t n, double* num, double* den) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double sv = s[j + l];
      num[l] += std::fabs(static_cast<double>(p[j + l]) - sv);
      den[l] += std::fabs(sv);
    }
  for (; j < n; ++j) {
    const double sv = s[j];
    num[j % kLanes] += std::fabs(static_cast<double>(p[j]) - sv);
    den[j % kLanes] += std::fabs(sv);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define VD_AVX2 __attribute__((target("avx2,f16c")))

// 8 probe values as fp32 (exact), and the same 8 values' raw bytes stored to dst.
template <GateDType D>
VD_AVX2 inline __m256 load8_copy(const void* src, int64_t j, void* dst) {
  if constexpr (D == GateDType::kFloat32) {
    const __m256 v = _mm256_loadu_ps(static_cast<const float*>(src) + j);
    if (dst != nullptr) _mm256_storeu_ps(static_cast<float*>(dst) + j, v);
    return v;
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + j));
    if (dst != nullptr) _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + j), raw);
    if constexpr (D == GateDType::kFloat16) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));  // bf16: the high half
  }
}

// The sums of n elements (n a multiple of 8) with AVX2, the probe copied to `spare` on the way: lanes 0-3 in one
// register, 4-7 in the other, so the result is bit-identical to block_sums_portable over the same elements.
template <GateDType D>
VD_AVX2 void sums_copy_avx2(const void* p, const void* s, void* spare, int64_t n, double* num, double* den) {
  const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  __m256d n0 = _mm256_loadu_pd(num), n1 = _mm256_loadu_pd(num + 4);
  __m256d d0 = _mm256_loadu_pd(den), d1 = _mm256_loadu_pd(den + 4);
  for (int64_t j = 0; j < n; j += kLanes) {
    const __m256 pv = load8_copy<D>(p, j, spare);
    const __m256 sv = load8_copy<D>(s, j, nullptr);
    const __m256d p0 = _mm256_cvtps_pd(_mm256_castps256_ps128(pv));
    const __m256d p1 = _mm256_cvtps_pd(_mm256_extractf128_ps(pv, 1));
    const __m256d s0 = _mm256_cvtps_pd(_mm256_castps256_ps128(sv));
    const __m256d s1 = _mm256_cvtps_pd(_mm256_extractf128_ps(sv, 1));
    n0 = _mm256_add_pd(n0, _mm256_and_pd(_mm256_sub_pd(p0, s0), abs_mask));
    n1 = _mm256_add_pd(n1, _mm256_and_pd(_mm256_sub_pd(p1, s1), abs_mask));
    d0 = _mm256_add_pd(d0, _mm256_and_pd(s0, abs_mask));
    d1 = _mm256_add_pd(d1, _mm256_and_pd(s1, abs_mask));
  }
  _mm256_storeu_pd(num, n0);
  _mm256_storeu_pd(num + 4, n1);
  _mm256_storeu_pd(den, d0);
  _mm256_storeu_pd(den + 4, d1);
}

// fp16 -> fp32 with F16C (8 values per instruction).
__attribute__((target("avx,f16c"))) void fp16_block_f16c(const uint16_t* p, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
  for (; j < n; ++j) dst[j] = fp16_to_float_branchless(p[j]);
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
const bool kHaveF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#endif

// n values of a 16-bit probe dtype starting at src, as fp32 (exact).
inline void to_float(GateDType dtype, const uint16_t* src, int64_t n, float* dst) {
  if (dtype == GateDType::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHaveF16C) {
    fp16_block_f16c(src, n, dst);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = fp16_to_float_branchless(src[j]);
}

// The portable path over elements [0, n) of one task (probe p, reference s), in blocks from the task's start.
void task_sums_portable(GateDType dtype, const void* probe, const void* ref, int64_t n, double* num, double* den) {
  if (dtype == GateDType::kFloat32) {
    const float* p = static_cast<const float*>(probe);
    const float* s = static_cast<const float*>(ref);
    for (int64_t j = 0; j < n; j += kBlock) block_sums_portable(p + j, s + j, n - j < kBlock ? n - j : kBlock, num, den);
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(probe);
  const uint16_t* s = static_cast<const uint16_t*>(ref);
  float pf[kBlock], sf[kBlock];
  for (int64_t j = 0; j < n; j += kBlock) {
    const int64_t m = n - j < kBlock ? n - j : kBlock;
    to_float(dtype, p + j, m, pf);
    to_float(dtype, s + j, m, sf);
    block_sums_portable(pf, sf, m, num, den);
  }
}

// One task: elements [j0, j0 + n) of sample b. Copies the probe into `spare` and, with a reference, leaves the
// two sums in out[0], out[1]. Lane l always takes the task's elements j with j % 8 == l, on either path.
void chunk(const CacheGateArgs& a, const void* ref_buf, void* spare_buf, int64_t b, int64_t j0, int64_t n,
           bool simd, double* out) {
  const int64_t off = b * a.per_sample + j0;
  const size_t elem = a.dtype == GateDType::kFloat32 ? 4 : 2;
  const char* probe = static_cast<const char*>(a.probe) + off * elem;
  char* spare = static_cast<char*>(spare_buf) + off * elem;
  if (ref_buf == nullptr) {
    std::memcpy(spare, probe, static_cast<size_t>(n) * elem);
    return;
  }
  const char* ref = static_cast<const char*>(ref_buf) + off * elem;
  double num[kLanes] = {0}, den[kLanes] = {0};
  int64_t done = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd) {
    done = n / kLanes * kLanes;
    switch (a.dtype) {
      case GateDType::kFloat16: sums_copy_avx2<GateDType::kFloat16>(probe, ref, spare, done, num, den); break;
      case GateDType::kBFloat16: sums_copy_avx2<GateDType::kBFloat16>(probe, ref, spare, done, num, den); break;
      default: sums_copy_avx2<GateDType::kFloat32>(probe, ref, spare, done, num, den);
    }
  }
#endif
  // The rest (everything on the portable path, the last n % 8 elements after AVX2): lanes continue at done % 8 = 0.
  if (done < n) {
    std::memcpy(spare + done * elem, probe + done * elem, static_cast<size_t>(n - done) * elem);
    task_sums_portable(a.dtype, probe + done * elem, ref + done * elem, n - done, num, den);
  }
  double tn = 0, td = 0;
  for (int l = 0; l < kLanes; ++l) {
    tn += num[l];
    td += den[l];
  }
  out[0] = tn;
  out[1] = td;
}

}  // namespace

bool cache_gate_cpu(const CacheGateArgs& a, char* error) {
  if (a.probe == nullptr || a.stored == nullptr || a.state == nullptr || a.decision == nullptr) {
    std::snprintf(error, 256, "cache_gate_cpu: probe, stored, state and decision must be non-null");
    return false;
  }
  if (a.batch < 1 || a.per_sample < 1) {
    std::snprintf(error, 256, "cache_gate_cpu: batch and per_sample must be >= 1, got %lld and %lld",
                  static_cast<long long>(a.batch), static_cast<long long>(a.per_sample));
    return false;
  }
  if (a.num_coefficients < 0 || a.num_coefficients > kCacheGateMaxCoefficients || (a.flags & ~kCacheGateAllFlags)) {
    std::snprintf(error, 256, "cache_gate_cpu: at most %d coefficients and flags in 0..7, got %d and %d",
                  kCacheGateMaxCoefficients, a.num_coefficients, a.flags);
    return false;
  }
  const int v = cache_gate_valid_index(a.state[kGateValid]);
  const int w = v >= 0 ? 1 - v : 0;
  const int64_t B = a.batch, S = a.per_sample;
  const size_t elem = a.dtype == GateDType::kFloat32 ? 4 : 2;
  const void* ref_buf = v >= 0 ? static_cast<const char*>(a.stored) + static_cast<size_t>(v * B * S) * elem : nullptr;
  void* spare_buf = static_cast<char*>(a.stored) + static_cast<size_t>(w * B * S) * elem;
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const char* scalar = std::getenv("VELODIFF_CACHE_GATE_SCALAR");
  bool simd = scalar == nullptr || scalar[0] == '\0' || std::strcmp(scalar, "0") == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  simd = simd && kHaveAvx2;
#else
  simd = false;
#endif
  const int64_t tasks = B * chunks;
  std::vector<double> partial(static_cast<size_t>(2 * tasks), 0.0);
  double* part = partial.data();
#pragma omp parallel for schedule(static) if (B * S >= kParallelMin)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / chunks, j0 = (t % chunks) * kChunk;
    chunk(a, ref_buf, spare_buf, b, j0, S - j0 < kChunk ? S - j0 : kChunk, simd, part + 2 * t);
  }
  double d = __builtin_huge_val();
  if (v >= 0) {
    for (int64_t b = 0; b < B; ++b) {
      double num = 0, den = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        num += part[2 * (b * chunks + c)];
        den += part[2 * (b * chunks + c) + 1];
      }
      const double db = cache_gate_sample_distance(num, den);
      d = b == 0 ? db : cache_gate_max(d, db);
    }
  }
  cache_gate_finish(a, v, d);
  return true;
}

}  // namespace velodiff
