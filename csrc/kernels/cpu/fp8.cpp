// CPU kernels of velodiff::quantize_fp8 and velodiff::fp8_gemm (format and formulas in velodiff/fp8.h).
//
// quantize_fp8: one pass per row for its absolute maximum, one for the codes (encode_fp8 after an IEEE division,
// exactly the reference's arithmetic), 16 lanes at a time with AVX-512 (same results). OpenMP over rows.
//
// fp8_gemm: every FP8 value is exact in bfloat16 (3 or 2 mantissa bits of bf16's 7; exponents 2^-16..2^15 inside
// its range), and every product of two is exact in float32 (at most 4 x 4 significant bits), so the GEMM is the
// bf16 dot product of the decoded codes with fp32 accumulation. Two paths (chosen at run time, cpu_isa.h):
//  * avx512bf16: vdpbf16ps, a 12-row x 16-column register tile (12 fp32 accumulators) over K pairs; the weights are
//    decoded once per call into 16-column panels of bf16 pairs [K/2][16][2] (one 64-byte row per K pair), the
//    activations into bf16 rows padded to an even K. The instruction flushes subnormal fp32 sums to zero, which
//    cannot occur here: products are multiples of 2^-32 (e5m2) or 2^-18 (e4m3), so is every partial sum.
//  * portable: the same panels in float32, a 4-row x 16-column tile in plain C++ (the compiler vectorises the
//    columns for whatever the baseline build targets).
// 4-bit weights (a w_table) are decoded into the same panels through the table (fp8_weight_code).
// The paths sum in different orders (pairs vs single products), so their last bits may differ (velodiff/fp8.h);
// each is within fp32 summation error of the exact product, which the tests check against float64.
// The epilogue scales, adds the bias, applies the activation and rounds to the output dtype (elem_io.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VELODIFF_FP8_X86 1
#endif

#include "cpu_isa.h"
#include "elem_io.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

using elem_io::activate;
using elem_io::load_elem;
using elem_io::store_elem;

constexpr int64_t kNR = 16;   // panel columns
constexpr int64_t kMRB = 12;  // bf16 tile rows
constexpr int64_t kMRP = 4;   // portable tile rows

enum class Fp8Path { kPortable = 0, kAvx512Bf16 = 1 };

bool select_path(Fp8Path& path, char* error) {
  cpu_isa::Isa isa;
  if (!cpu_isa::select_isa(isa, error)) return false;
  path = isa >= cpu_isa::Isa::kAvx512Bf16 ? Fp8Path::kAvx512Bf16 : Fp8Path::kPortable;
  return true;
}

// The 256 decoded values of a format (exact), as float32 and as bfloat16 bits (the high half: exact too).
struct DecodeTable {
  float f32[256];
  uint16_t bf16[256];
  explicit DecodeTable(Fp8Format f) {
    for (int c = 0; c < 256; ++c) {
      f32[c] = decode_fp8(static_cast<uint8_t>(c), f);
      bf16[c] = static_cast<uint16_t>(float_to_bits(f32[c]) >> 16);
    }
  }
};

const DecodeTable& table(Fp8Format f) {
  static const DecodeTable e4m3(Fp8Format::kE4M3), e5m2(Fp8Format::kE5M2);
  return f == Fp8Format::kE4M3 ? e4m3 : e5m2;
}

bool check_gemm(const Fp8GemmArgs& a, char* error) {
  if (a.M < 0 || a.N < 0 || a.K < 0) {
    std::snprintf(error, 256, "fp8_gemm: negative size M=%lld N=%lld K=%lld", static_cast<long long>(a.M),
                  static_cast<long long>(a.N), static_cast<long long>(a.K));
    return false;
  }
  if ((a.M > 0 && a.N > 0) && (a.ascales == nullptr || a.wscales == nullptr || a.y == nullptr ||
                               (a.K > 0 && (a.a == nullptr || a.w == nullptr)))) {
    std::snprintf(error, 256, "fp8_gemm: null pointer");
    return false;
  }
  return true;
}

// The epilogue of one output element.
inline void finish(const Fp8GemmArgs& a, int64_t m, int64_t n, float dot) {
  float v = dot * (a.ascales[m] * a.wscales[n]);
  if (a.bias != nullptr) v += load_elem(a.out_dtype, a.bias, n);
  store_elem(a.out_dtype, a.y, m * a.N + n, activate(v, a.activation));
}

// ---------------------------------------------------------------------------------------------------------------
// Portable path: float32 panels [K][16], 4 x 16 tiles.
// ---------------------------------------------------------------------------------------------------------------

void gemm_portable(const Fp8GemmArgs& a) {
  const int64_t M = a.M, N = a.N, K = a.K, panels = (N + kNR - 1) / kNR;
  const float* at = table(a.a_format).f32;
  const float* wt = table(a.w_format).f32;
  std::vector<float> x(static_cast<size_t>(M * K));
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M * K; ++i) x[i] = at[a.a[i]];
    std::vector<float> panel(static_cast<size_t>(K * kNR));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < kNR; ++j) panel[k * kNR + j] = j < cols ? wt[fp8_weight_code(a, n0 + j, k)] : 0.f;
      for (int64_t m0 = 0; m0 < M; m0 += kMRP) {
        const int64_t rows = std::min(kMRP, M - m0);
        float acc[kMRP][kNR] = {};
        for (int64_t k = 0; k < K; ++k) {
          const float* wk = panel.data() + k * kNR;
          for (int64_t r = 0; r < rows; ++r) {
            const float xv = x[(m0 + r) * K + k];
            for (int64_t j = 0; j < kNR; ++j) acc[r][j] += xv * wk[j];
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j) finish(a, m0 + r, n0 + j, acc[r][j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 BF16 path: bf16 pair panels [K2][16][2] (K2 = ceil(K / 2)), 12 x 16 tiles of vdpbf16ps.
// ---------------------------------------------------------------------------------------------------------------
#ifdef VELODIFF_FP8_X86
#define VD_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// rows x 16 outputs of x (bf16 pairs as uint32, K2 per row) against one panel; dots into out[r * 16 + j].
template <int Rows>
VD_BF16 void tile_bf16(int64_t K2, const uint32_t* x, const uint32_t* panel, float* out) {
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + k * kNR);
    for (int r = 0; r < Rows; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * K2 + k])), w);
  }
  for (int r = 0; r < Rows; ++r) _mm512_storeu_ps(out + r * kNR, acc[r]);
}

using TileFn = void (*)(int64_t, const uint32_t*, const uint32_t*, float*);
constexpr TileFn kTiles[kMRB + 1] = {nullptr,         tile_bf16<1>,  tile_bf16<2>, tile_bf16<3>, tile_bf16<4>,
                                     tile_bf16<5>,    tile_bf16<6>,  tile_bf16<7>, tile_bf16<8>, tile_bf16<9>,
                                     tile_bf16<10>,   tile_bf16<11>, tile_bf16<12>};

void gemm_bf16(const Fp8GemmArgs& a) {
  const int64_t M = a.M, N = a.N, K = a.K, K2 = (K + 1) / 2, panels = (N + kNR - 1) / kNR;
  const uint16_t* at = table(a.a_format).bf16;
  const uint16_t* wt = table(a.w_format).bf16;
  // Activation rows as bf16 pairs (low half: even k), zero past K; rows padded to a whole tile.
  const int64_t Mp = (M + kMRB - 1) / kMRB * kMRB;
  std::vector<uint32_t> x(static_cast<size_t>(Mp * K2), 0u);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K2; ++k) {
        const uint32_t lo = at[a.a[m * K + 2 * k]];
        const uint32_t hi = 2 * k + 1 < K ? at[a.a[m * K + 2 * k + 1]] : 0u;
        x[m * K2 + k] = lo | (hi << 16);
      }
    std::vector<uint32_t> panel(static_cast<size_t>(K2 * kNR));
    float out[kMRB * kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
      for (int64_t j = 0; j < kNR; ++j) {
        for (int64_t k = 0; k < K2; ++k) {
          const uint32_t lo = j < cols ? wt[fp8_weight_code(a, n0 + j, 2 * k)] : 0u;
          const uint32_t hi = j < cols && 2 * k + 1 < K ? wt[fp8_weight_code(a, n0 + j, 2 * k + 1)] : 0u;
          panel[k * kNR + j] = lo | (hi << 16);
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += kMRB) {
        const int64_t rows = std::min(kMRB, M - m0);
        kTiles[rows](K2, x.data() + m0 * K2, panel.data(), out);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j) finish(a, m0 + r, n0 + j, out[r * kNR + j]);
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// quantize_fp8, one row: its absolute maximum (NaN if it holds one), then the codes of x / s. The AVX-512 version
// performs the same IEEE operations 16 lanes at a time (vdivps, vrndscaleps to nearest even), so both give the same
// codes and scales, which the tests check against the reference on either path.
// ---------------------------------------------------------------------------------------------------------------

// Row m's scale from its absolute maximum, stored; a zero row gets zero codes here. Returns the scale.
float store_scale(const QuantizeFp8Args& a, int64_t m, float amax) {
  const float s = amax / fp8_max(a.format);
  a.scales[m] = s;
  if (s == 0.f) std::memset(a.codes + m * a.K, 0, static_cast<size_t>(a.K));
  return s;
}

void quantize_row_portable(const QuantizeFp8Args& a, int64_t m) {
  float amax = 0.f;
  for (int64_t k = 0; k < a.K; ++k) {
    const float v = std::fabs(load_elem(a.dtype, a.x, m * a.K + k));
    amax = (v > amax || v != v) && amax == amax ? v : amax;  // a NaN, once seen, stays
  }
  const float s = store_scale(a, m, amax);
  if (s == 0.f) return;
  uint8_t* row = a.codes + m * a.K;
  for (int64_t k = 0; k < a.K; ++k) row[k] = encode_fp8(load_elem(a.dtype, a.x, m * a.K + k) / s, a.format);
}

#ifdef VELODIFF_FP8_X86
#define VD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// Up to 16 elements of row `x` from index k (n <= 16 of them; the rest of the vector is 0) as float32.
VD_AVX512 inline __m512 load16(QDtype dt, const void* x, int64_t k, int n) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  switch (dt) {
    case QDtype::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + k));
    case QDtype::kBFloat16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + k)), 16));
    default: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + k);
  }
}

// encode_fp8 of 16 lanes, as int32 codes.
VD_AVX512 inline __m512i encode16(__m512 v, Fp8Format f) {
  const bool e4 = f == Fp8Format::kE4M3;
  const int man = e4 ? 3 : 2, bias = e4 ? 7 : 15, shift = 23 - man;
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __m512 a = _mm512_castsi512_ps(mag);
  // normal: round the mantissa to `man` bits, ties to even, then rebias the exponent
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, shift), _mm512_set1_epi32(1));
  __m512i code = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32((1 << (shift - 1)) - 1)), odd), shift);
  code = _mm512_sub_epi32(code, _mm512_set1_epi32((127 - bias) << man));
  // subnormal: round(a * 2^(bias + man - 1)) is the code
  const __mmask16 sub = _mm512_cmp_ps_mask(a, _mm512_castsi512_ps(_mm512_set1_epi32((128 - bias) << 23)), _CMP_LT_OQ);
  const __m512 q = _mm512_roundscale_ps(
      _mm512_mul_ps(a, _mm512_castsi512_ps(_mm512_set1_epi32((126 + bias + man) << 23))),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  code = _mm512_mask_mov_epi32(code, sub, _mm512_cvttps_epi32(q));
  // saturation, then infinities and NaNs
  const __mmask16 big = _mm512_cmp_ps_mask(a, _mm512_set1_ps(fp8_max(f)), _CMP_GE_OQ);
  code = _mm512_mask_mov_epi32(code, big, _mm512_set1_epi32(e4 ? 0x7e : 0x7b));
  const __mmask16 inf = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f800000));
  code = _mm512_mask_mov_epi32(code, inf, _mm512_set1_epi32(e4 ? 0x7f : 0x7c));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x7f800000));
  code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(e4 ? 0x7f : 0x7e));
  return _mm512_or_si512(code, sign);
}

VD_AVX512 void quantize_row_avx512(const QuantizeFp8Args& a, int64_t m) {
  const void* x = static_cast<const char*>(a.x) + m * a.K * (a.dtype == QDtype::kFloat32 ? 4 : 2);
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < a.K; k += 16) {
    const __m512 v = _mm512_abs_ps(load16(a.dtype, x, k, static_cast<int>(std::min<int64_t>(16, a.K - k))));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  const float s = store_scale(a, m, nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax));
  if (s == 0.f) return;
  uint8_t* row = a.codes + m * a.K;
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t k = 0; k < a.K; k += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, a.K - k));
    const __m512i codes = encode16(_mm512_div_ps(load16(a.dtype, x, k, n), vs), a.format);
    _mm_mask_storeu_epi8(row + k, static_cast<__mmask16>((1u << n) - 1u), _mm512_cvtepi32_epi8(codes));
  }
}
#endif

}  // namespace

bool quantize_fp8_cpu(const QuantizeFp8Args& a, char* error) {
  if (a.M < 0 || a.K < 0) {
    std::snprintf(error, 256, "quantize_fp8: negative size M=%lld K=%lld", static_cast<long long>(a.M),
                  static_cast<long long>(a.K));
    return false;
  }
  cpu_isa::Isa isa;
  if (!cpu_isa::select_isa(isa, error)) return false;
  const bool vector = isa >= cpu_isa::Isa::kAvx512;
#pragma omp parallel for schedule(static) if (a.M * a.K >= (1 << 15))
  for (int64_t m = 0; m < a.M; ++m) {
#ifdef VELODIFF_FP8_X86
    if (vector) {
      quantize_row_avx512(a, m);
      continue;
    }
#endif
    quantize_row_portable(a, m);
  }
  (void)vector;
  return true;
}

bool fp8_gemm_cpu(const Fp8GemmArgs& a, char* error) {
  if (!check_gemm(a, error)) return false;
  Fp8Path path;
  if (!select_path(path, error)) return false;
  if (a.M == 0 || a.N == 0) return true;
#ifdef VELODIFF_FP8_X86
  if (path == Fp8Path::kAvx512Bf16) {
    gemm_bf16(a);
    return true;
  }
#endif
  gemm_portable(a);
  return true;
}

const char* fp8_gemm_cpu_path() {
  char error[256];
  Fp8Path path;
  if (!select_path(path, error)) return "portable";
  return path == Fp8Path::kAvx512Bf16 ? "avx512bf16" : "portable";
}

}  // namespace velodiff
