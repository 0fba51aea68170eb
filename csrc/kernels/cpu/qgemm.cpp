// CPU kernels of the quantized GEMM family: velodiff::quantize_act and velodiff::qgemm.
// Format and semantics: csrc/include/velodiff/qgemm.h. Torch-free.
//
// Three code paths with identical integer results (integer group sums are exact in any order), chosen at run time
// (cpu_isa.h; the library is compiled for baseline x86-64, so the vector functions carry target attributes):
//  * AVX-512VNNI (qgemm; quantize_act runs its AVX2 code there): vpdpbusd micro-kernel, gives the AVX2 path's bits.
//  * AVX2 + FMA + F16C.
//  * portable scalar C++.
// VELODIFF_CPU_ISA caps the choice (avx512 and avx512bf16 mean VNNI where the CPU has it); VELODIFF_QGEMM_SCALAR=1
// forces the portable path (both read at every call; used by the tests to compare the paths).

// quantize_act: per row, fp32 conversion (+ the low-rank down projection on the unsmoothed row), IEEE division by
// smooth, per-group amax / Q, IEEE division by the scale, round half to even, clamp, pack. Bit-exact with the
// reference (_mm256_div_ps / _mm256_round_ps(nearest) are the IEEE operations the scalar path performs).
//
// qgemm (AVX2 / VNNI): one parallel region. The weights are repacked once per call into 16-column panels; work
// items (a chunk of rows x a group of 8 panels) are scheduled dynamically, each unpacking its rows once; a
// register-blocked micro-kernel computes one group of 64 at a time in integers and folds it into fp32
// accumulators with ascale * wscale.
//  * AVX2, 4 x 16 tiles. 4 bits: activation codes are offset to unsigned (a + 8 in [0, 15]) so
//    _mm256_maddubs_epi16 (u8 x s8, pairs summed to int16) applies without the sign trick; |pair| <= 2 * 15 * 8 =
//    240, a group of 16 such steps stays below 2^12 in int16, and sum (a + 8) w = sum a w + 8 sum w is corrected
//    with per-(column, group) weight sums. 8 bits: codes widened to int16, _mm256_madd_epi16 (pairs summed to
//    int32) accumulated in int32.
//  * VNNI, 12 x 16 tiles (tile_vnni): u8 x s8 quads with vpdpbusd into int32, both widths (8 bits offset by 128).
// The epilogue adds the bias and the low-rank branch (fp32 FMA over R), applies the activation and converts to the
// model dtype (round to nearest even).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VELODIFF_QGEMM_X86 1
#endif

#include "cpu_isa.h"
#include "elem_io.h"
#include "velodiff/float16.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

using elem_io::activate;
using elem_io::load_elem;
using elem_io::store_elem;

constexpr int64_t kG = kQGroup;     // 64
constexpr int64_t kMR = 4;          // micro-tile rows (4 x 16: 8 accumulators, no spills)
constexpr int64_t kNR = 16;         // micro-tile columns (two 8-lane vectors; one 16-lane vector for VNNI)
constexpr int64_t kMRV = 12;        // VNNI micro-tile rows (12 int32 + 12 fp32 accumulators of 32 registers)

// ---------------------------------------------------------------------------------------------------------------
// Element conversions
// ---------------------------------------------------------------------------------------------------------------

inline int8_t nibble_code(uint8_t nib) { return static_cast<int8_t>(static_cast<int>(nib ^ 8u) - 8); }

// The code path of both kernels: cpu_isa.h's tier (capped by VELODIFF_CPU_ISA; VELODIFF_QGEMM_SCALAR=1 means
// portable), narrowed to what the paths need: AVX2 + FMA + F16C, and AVX-512VNNI on the avx512 tiers (qgemm's
// VNNI micro-kernel; quantize_act then runs its AVX2 code). False (and a message) for a bad VELODIFF_CPU_ISA.
enum class QPath { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2 };

bool select_path(QPath& path, char* error) {
  cpu_isa::Isa isa;
  if (!cpu_isa::select_isa(isa, error, "VELODIFF_QGEMM_SCALAR")) return false;
  path = QPath::kPortable;
#ifdef VELODIFF_QGEMM_X86
  static const bool f16c = __builtin_cpu_supports("f16c");
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  if (f16c && isa >= cpu_isa::Isa::kAvx2) path = QPath::kAvx2;
  if (f16c && vnni && isa >= cpu_isa::Isa::kAvx512) path = QPath::kAvx512Vnni;
#else
  (void)isa;
#endif
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// quantize_act
// ---------------------------------------------------------------------------------------------------------------

// lora_act[r] = sum_k xf[k] * ld[k, r] (fp32). Inlined into both the scalar and the AVX2 row functions, so the
// loop over r vectorises with the ISA of the caller.
__attribute__((always_inline)) inline void lora_down_row(const float* __restrict__ xf, const float* __restrict__ ld,
                                                         int64_t K, int64_t R, float* __restrict__ out) {
  for (int64_t r = 0; r < R; ++r) out[r] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float xk = xf[k];
    const float* __restrict__ row = ld + k * R;
    for (int64_t r = 0; r < R; ++r) out[r] += xk * row[r];
  }
}

// Writes codes of one group (64 int8 codes in `c`) to the packed row.
inline void store_group_codes(const int8_t* c, int bits, void* qrow, int64_t g) {
  if (bits == 8) {
    std::memcpy(static_cast<int8_t*>(qrow) + g * kG, c, kG);
  } else {
    uint8_t* o = static_cast<uint8_t*>(qrow) + g * (kG / 2);
    for (int64_t j = 0; j < kG / 2; ++j)
      o[j] = static_cast<uint8_t>((c[2 * j] & 0xF) | ((c[2 * j + 1] & 0xF) << 4));
  }
}

// Row m: xf = float(x[m]) (K values), v = xf / smooth zero-padded to Kp, then the groups.
void quantize_row_scalar(const QuantizeActArgs& a, const float* ld, int64_t m, float* xf, float* v) {
  const int64_t K = a.K, Kp = qgemm_padded_k(K), ng = Kp / kG;
  const float Q = a.bits == 4 ? 7.f : 127.f;
  for (int64_t k = 0; k < K; ++k) xf[k] = load_elem(a.dtype, a.x, m * K + k);
  if (a.R > 0) lora_down_row(xf, ld, K, a.R, a.lora_act + m * a.R);
  for (int64_t k = 0; k < K; ++k) v[k] = a.smooth != nullptr ? xf[k] / a.smooth[k] : xf[k];
  for (int64_t k = K; k < Kp; ++k) v[k] = 0.f;
  void* qrow = static_cast<uint8_t*>(a.qx) + m * (a.bits == 4 ? Kp / 2 : Kp);
  int8_t codes[kG];
  for (int64_t g = 0; g < ng; ++g) {
    const float* vg = v + g * kG;
    float amax = 0.f;
    for (int64_t j = 0; j < kG; ++j) amax = std::max(amax, std::fabs(vg[j]));
    const float s = amax / Q;
    a.ascales[m * ng + g] = s;
    for (int64_t j = 0; j < kG; ++j) {
      float q = 0.f;
      if (s != 0.f) q = std::min(std::max(std::nearbyint(vg[j] / s), -Q - 1.f), Q);
      codes[j] = static_cast<int8_t>(q);
    }
    store_group_codes(codes, a.bits, qrow, g);
  }
}

#ifdef VELODIFF_QGEMM_X86
#define VD_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 values of dtype at p -> fp32
VD_AVX2 inline __m256 load8(QDtype dt, const void* p, int64_t i) {
  switch (dt) {
    case QDtype::kFloat16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    case QDtype::kBFloat16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

// Row m; `loaded`: xf already holds float(x[m]) (the blocked down-projection converted it), else it is filled here.
VD_AVX2 void quantize_row_avx2(const QuantizeActArgs& a, const float* ld, int64_t m, float* xf, float* v,
                               bool loaded = false) {
  const int64_t K = a.K, Kp = qgemm_padded_k(K), ng = Kp / kG;
  const float Q = a.bits == 4 ? 7.f : 127.f;
  int64_t k = 0;
  if (!loaded) {
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(xf + k, load8(a.dtype, a.x, m * K + k));
    for (; k < K; ++k) xf[k] = load_elem(a.dtype, a.x, m * K + k);
  }
  if (a.R > 0) lora_down_row(xf, ld, K, a.R, a.lora_act + m * a.R);
  k = 0;
  if (a.smooth != nullptr) {
    for (; k + 8 <= K; k += 8)
      _mm256_storeu_ps(v + k, _mm256_div_ps(_mm256_loadu_ps(xf + k), _mm256_loadu_ps(a.smooth + k)));
    for (; k < K; ++k) v[k] = xf[k] / a.smooth[k];
  } else {
    std::memcpy(v, xf, sizeof(float) * K);
  }
  for (k = K; k < Kp; ++k) v[k] = 0.f;

  void* qrow = static_cast<uint8_t*>(a.qx) + m * (a.bits == 4 ? Kp / 2 : Kp);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-Q - 1.f), hi = _mm256_set1_ps(Q);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < ng; ++g) {
    const float* vg = v + g * kG;
    __m256 x[8];
    __m256 mx = _mm256_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      x[j] = _mm256_loadu_ps(vg + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_and_ps(x[j], absmask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float s = _mm_cvtss_f32(m4) / Q;
    a.ascales[m * ng + g] = s;
    __m256i bytes[2];
    if (s == 0.f) {
      bytes[0] = bytes[1] = _mm256_setzero_si256();
    } else {
      const __m256 sv = _mm256_set1_ps(s);
      __m256i c[8];
      for (int j = 0; j < 8; ++j) {
        const __m256 q = _mm256_round_ps(_mm256_div_ps(x[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i p01 = _mm256_packs_epi32(c[4 * h], c[4 * h + 1]);
        const __m256i p23 = _mm256_packs_epi32(c[4 * h + 2], c[4 * h + 3]);
        bytes[h] = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);  // codes 32h .. 32h + 31
      }
    }
    if (a.bits == 8) {
      int8_t* o = static_cast<int8_t*>(qrow) + g * kG;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), bytes[0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32), bytes[1]);
    } else {
      // 16-bit lane j holds codes (2j, 2j + 1): byte = (lo & 0xF) | (hi & 0xF) << 4
      const __m256i m0f = _mm256_set1_epi16(0x000f), mf0 = _mm256_set1_epi16(0x00f0);
      __m256i r[2];
      for (int h = 0; h < 2; ++h)
        r[h] = _mm256_or_si256(_mm256_and_si256(bytes[h], m0f), _mm256_and_si256(_mm256_srli_epi16(bytes[h], 4), mf0));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(r[0], r[1]), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint8_t*>(qrow) + g * (kG / 2)), packed);
    }
  }
}

// Low-rank down-projection of a block of kLoraRows rows: out[i, r] = sum_k x[i, k] * ld[k, r] (fp32), x = rows of
// float(x) (stride K; rows past `rows` are zero), ld [K, R] fp32. Register tile kLoraRows x 16 (12 accumulators),
// so ld is streamed once per block of rows instead of once per row; R tails of 8 and scalar after.
constexpr int kLoraRows = 6;

VD_AVX2 void lora_down_block_avx2(const float* x, int64_t K, int rows, const float* ld, int64_t R, float* out) {
  int64_t r = 0;
  for (; r + 16 <= R; r += 16) {
    __m256 acc[kLoraRows][2];
    for (int i = 0; i < kLoraRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(ld + k * R + r), b1 = _mm256_loadu_ps(ld + k * R + r + 8);
#pragma GCC unroll 6
      for (int i = 0; i < kLoraRows; ++i) {
        const __m256 xi = _mm256_broadcast_ss(x + i * K + k);
        acc[i][0] = _mm256_fmadd_ps(xi, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xi, b1, acc[i][1]);
      }
    }
    // Compile-time row indices (rows <= kLoraRows is tested per row): a run-time bound here kept the whole
    // accumulator array in memory, stored and reloaded every k (half the speed).
#pragma GCC unroll 6
    for (int i = 0; i < kLoraRows; ++i)
      if (i < rows) {
        _mm256_storeu_ps(out + i * R + r, acc[i][0]);
        _mm256_storeu_ps(out + i * R + r + 8, acc[i][1]);
      }
  }
  for (; r + 8 <= R; r += 8) {
    __m256 acc[kLoraRows];
    for (int i = 0; i < kLoraRows; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b = _mm256_loadu_ps(ld + k * R + r);
      for (int i = 0; i < kLoraRows; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + i * K + k), b, acc[i]);
    }
#pragma GCC unroll 6
    for (int i = 0; i < kLoraRows; ++i)
      if (i < rows) _mm256_storeu_ps(out + i * R + r, acc[i]);
  }
  for (; r < R; ++r)
    for (int i = 0; i < rows; ++i) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[i * K + k] * ld[k * R + r];
      out[i * R + r] = sum;
    }
}

// Rows [m0, m0 + rows) of float(x), zero-filled to kLoraRows rows, into buf [kLoraRows, K].
VD_AVX2 void load_rows_avx2(const QuantizeActArgs& a, int64_t m0, int rows, float* buf) {
  const int64_t K = a.K;
  for (int i = 0; i < kLoraRows; ++i) {
    float* dst = buf + i * K;
    if (i >= rows) {
      std::memset(dst, 0, sizeof(float) * K);
      continue;
    }
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load8(a.dtype, a.x, (m0 + i) * K + k));
    for (; k < K; ++k) dst[k] = load_elem(a.dtype, a.x, (m0 + i) * K + k);
  }
}
#endif  // VELODIFF_QGEMM_X86

// ---------------------------------------------------------------------------------------------------------------
// qgemm: portable path
// ---------------------------------------------------------------------------------------------------------------

// Codes of row `row` of a packed matrix (width Kp) as int8.
inline void unpack_row(const void* packed, int bits, int64_t row, int64_t Kp, int8_t* out) {
  if (bits == 8) {
    std::memcpy(out, static_cast<const int8_t*>(packed) + row * Kp, Kp);
  } else {
    const uint8_t* p = static_cast<const uint8_t*>(packed) + row * (Kp / 2);
    for (int64_t j = 0; j < Kp / 2; ++j) {
      out[2 * j] = nibble_code(p[j] & 0xF);
      out[2 * j + 1] = nibble_code(p[j] >> 4);
    }
  }
}

// Model-dtype operands of the portable path in fp32.
struct QGemmFloats {
  std::vector<float> wscales;  // [N, ng]
  std::vector<float> bias;     // [N] or empty
  std::vector<float> lora_up;  // [N, R] or empty
};

void to_float(QDtype dt, const void* src, int64_t n, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) dst[i] = load_elem(dt, src, i);
}

void qgemm_scalar(const QGemmArgs& a) {
  const int64_t M = a.M, N = a.N, Kp = a.K, R = a.R, ng = Kp / kG;
  QGemmFloats f;
  to_float(a.dtype, a.wscales, N * ng, f.wscales);
  if (a.bias != nullptr) to_float(a.dtype, a.bias, N, f.bias);
  if (R > 0) to_float(a.dtype, a.lora_up, N * R, f.lora_up);
  std::vector<int8_t> w(static_cast<size_t>(N * Kp));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) unpack_row(a.qw, a.bits, n, Kp, w.data() + n * Kp);
#pragma omp parallel
  {
    std::vector<int8_t> x(static_cast<size_t>(Kp));
    std::vector<float> la(static_cast<size_t>(R));
#pragma omp for schedule(dynamic, 4)
    for (int64_t m = 0; m < M; ++m) {
      unpack_row(a.qx, a.bits, m, Kp, x.data());
      for (int64_t r = 0; r < R; ++r)
        la[r] = a.lora_act[m * R + r] * (a.lora_scales != nullptr ? a.lora_scales[r] : 1.f);
      const float* as = a.ascales + m * ng;
      for (int64_t n = 0; n < N; ++n) {
        const int8_t* wn = w.data() + n * Kp;
        const float* ws = f.wscales.data() + n * ng;
        float acc = 0.f;
        for (int64_t g = 0; g < ng; ++g) {
          int32_t isum = 0;
          for (int64_t j = g * kG; j < (g + 1) * kG; ++j) isum += int32_t(x[j]) * int32_t(wn[j]);
          acc += as[g] * ws[g] * static_cast<float>(isum);
        }
        if (!f.bias.empty()) acc += f.bias[n];
        const float* lu = R > 0 ? f.lora_up.data() + n * R : nullptr;
        for (int64_t r = 0; r < R; ++r) acc += la[r] * lu[r];
        store_elem(a.dtype, a.y, m * N + n, activate(acc, a.activation));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// qgemm: AVX2 path
// ---------------------------------------------------------------------------------------------------------------
#ifdef VELODIFF_QGEMM_X86

// Weights and model-dtype vectors repacked into np = ceil(N / 16) column panels (columns >= N are zero).
// Activations go to the integer products as unsigned bytes a + off (off = 8 for 4 bits, 128 for 8 bits on the
// VNNI path: u8 x s8 is what _mm256_maddubs_epi16 and vpdpbusd multiply), and sum (a + off) w = sum a w +
// off sum w is corrected with the weight sums `corr`. The AVX2 8-bit path widens both operands to int16 instead.
struct PackedW {
  int64_t np = 0, ng = 0, Kp = 0, R = 0;
  // panel p at p * Kp * 16 elements:
  //   wq (4 bits; 8 bits on VNNI): int8, element (n, k) at (k / 4) * 64 + (n / 8 % 2) * 32 + (n % 8) * 4 + k % 4,
  //       i.e. 4 consecutive k per 32-bit lane, lanes in column order: one 64-byte vector per 4 k.
  //   w8 (8 bits on AVX2): int16, element (n, k) at (k / 2) * 32 + (n / 8 % 2) * 16 + (n % 8) * 2 + k % 2
  // Views into one blob (PackLayout): made per call, or a caller's prepacked weights (read only then).
  int8_t* wq = nullptr;
  int16_t* w8 = nullptr;
  int32_t* corr = nullptr;  // with wq: [np][ng][16] off * sum_{k in g} w[n, k]
  float* wsc = nullptr;     // [np][ng][16]
  float* bias = nullptr;    // [np * 16] (zeros when absent)
  float* lup = nullptr;     // [np][R][16]
};

// The blob of packed weights: a header of kPackHeader int64 (magic, format version, path, bits, N, Kp, R, total
// bytes), then the sections of PackedW, each at a multiple of 64 bytes. Columns >= N are zero.
constexpr int64_t kPackMagic = 0x31505144;  // "DQP1"
constexpr int64_t kPackHeader = 8;
struct PackLayout {
  int64_t wq = 0, w8 = 0, corr = 0, wsc = 0, bias = 0, lup = 0, total = 0;  // byte offsets (0: absent) and size
};

// Byte b of packed int4 codes -> its two codes as int8 bytes (low nibble first).
struct NibbleTable {
  uint16_t pair[256];
  NibbleTable() {
    for (int b = 0; b < 256; ++b) {
      const int8_t lo = nibble_code(static_cast<uint8_t>(b & 0xF)), hi = nibble_code(static_cast<uint8_t>(b >> 4));
      pair[b] = static_cast<uint16_t>(static_cast<uint8_t>(lo) | (static_cast<uint8_t>(hi) << 8));
    }
  }
};
const NibbleTable kNibbles;

// The unsigned offset of the activation codes (see PackedW); 0 when the path widens them to int16 instead.
int32_t activation_offset(int bits, bool vnni) { return bits == 4 ? 8 : vnni ? 128 : 0; }

PackLayout pack_layout(int bits, int64_t N, int64_t Kp, int64_t R, bool vnni) {
  const int64_t np = (N + kNR - 1) / kNR, ng = Kp / kG, panel = np * Kp * kNR;
  PackLayout L;
  int64_t at = kPackHeader * 8;
  auto section = [&at](int64_t bytes) {
    const int64_t offset = at;
    at += (bytes + 63) / 64 * 64;
    return offset;
  };
  if (activation_offset(bits, vnni) != 0) {
    L.wq = section(panel);
    L.corr = section(np * ng * kNR * 4);
  } else {
    L.w8 = section(panel * 2);
  }
  L.wsc = section(np * ng * kNR * 4);
  L.bias = section(np * kNR * 4);
  L.lup = section(np * R * kNR * 4);
  L.total = at;
  return L;
}

// P's views into `base` (64-byte aligned, L.total bytes).
PackedW bind_packed(uint8_t* base, const PackLayout& L, int64_t N, int64_t Kp, int64_t R) {
  PackedW P;
  P.np = (N + kNR - 1) / kNR;
  P.ng = Kp / kG;
  P.Kp = Kp;
  P.R = R;
  P.wq = L.wq != 0 ? reinterpret_cast<int8_t*>(base + L.wq) : nullptr;
  P.w8 = L.w8 != 0 ? reinterpret_cast<int16_t*>(base + L.w8) : nullptr;
  P.corr = L.corr != 0 ? reinterpret_cast<int32_t*>(base + L.corr) : nullptr;
  P.wsc = reinterpret_cast<float*>(base + L.wsc);
  P.bias = reinterpret_cast<float*>(base + L.bias);
  P.lup = reinterpret_cast<float*>(base + L.lup);
  return P;
}

void write_pack_header(uint8_t* base, const QGemmArgs& a, bool vnni, const PackLayout& L) {
  const int64_t header[kPackHeader] = {kPackMagic, 1, vnni ? 2 : 1, a.bits, a.N, a.K, a.R, L.total};
  std::memcpy(base, header, sizeof(header));
}

// Column n of the weights into its panel (one thread per column: no two threads write the same element).
void pack_weight_column(const QGemmArgs& a, const PackedW& P, int64_t n, bool vnni) {
  const int64_t Kp = P.Kp, ng = P.ng, R = P.R;
  const int64_t p = n / kNR, c = n % kNR, half = c / 8, lane = c % 8;
  const int32_t off = activation_offset(a.bits, vnni);
  if (off != 0) {
    int8_t* dst = P.wq + p * Kp * kNR + half * 32 + lane * 4;
    for (int64_t g = 0; g < ng; ++g) {
      int32_t s = 0;
      for (int64_t q = g * (kG / 4); q < (g + 1) * (kG / 4); ++q) {  // 4 codes
        int8_t codes[4];
        if (a.bits == 4) {  // 2 bytes
          const uint8_t* src = static_cast<const uint8_t*>(a.qw) + n * (Kp / 2) + 2 * q;
          const uint32_t word = kNibbles.pair[src[0]] | (static_cast<uint32_t>(kNibbles.pair[src[1]]) << 16);
          std::memcpy(codes, &word, sizeof(word));
        } else {
          std::memcpy(codes, static_cast<const int8_t*>(a.qw) + n * Kp + 4 * q, sizeof(codes));
        }
        std::memcpy(dst + q * 64, codes, sizeof(codes));
        s += codes[0] + codes[1] + codes[2] + codes[3];
      }
      P.corr[(p * ng + g) * kNR + c] = off * s;
    }
  } else {
    const int8_t* src = static_cast<const int8_t*>(a.qw) + n * Kp;
    int16_t* dst = P.w8 + p * Kp * kNR + half * 16 + lane * 2;
    for (int64_t k = 0; k < Kp; k += 2) {
      dst[k * 16] = src[k];
      dst[k * 16 + 1] = src[k + 1];
    }
  }
  for (int64_t g = 0; g < ng; ++g) P.wsc[(p * ng + g) * kNR + c] = load_elem(a.dtype, a.wscales, n * ng + g);
  if (a.bias != nullptr) P.bias[p * kNR + c] = load_elem(a.dtype, a.bias, n);
  for (int64_t r = 0; r < R; ++r) P.lup[(p * R + r) * kNR + c] = load_elem(a.dtype, a.lora_up, n * R + r);
}

// The activation rows unpacked for the micro-kernels, once per call, padded to Mp (a multiple of the micro-tile's
// rows) with zero codes and zero scales: uint8 a + off (4 bits; 8 bits on VNNI) or int16 (8 bits on AVX2), [Mp, Kp];
// ascales [Mp, ng]; lora_act * lora_scales [Mp, R].
// Allocated without zeroing: unpack_rows writes every element.
struct UnpackedRows {
  std::unique_ptr<uint8_t[]> xu;
  std::unique_ptr<int16_t[]> x8;
  std::unique_ptr<float[]> asc, las;
  UnpackedRows(const QGemmArgs& a, int64_t Mp, bool vnni)
      : asc(new float[Mp * (a.K / kG)]), las(new float[Mp * a.R]) {
    if (activation_offset(a.bits, vnni) != 0)
      xu.reset(new uint8_t[Mp * a.K]);
    else
      x8.reset(new int16_t[Mp * a.K]);
  }
};

// Rows [m0, m0 + rows) of B (rows past M get the padding); each thread its own rows.
void unpack_rows(const QGemmArgs& a, int64_t m0, int64_t rows, bool vnni, UnpackedRows& B) {
  const int64_t Kp = a.K, ng = Kp / kG, R = a.R;
  const int64_t valid = std::max<int64_t>(0, std::min(rows, a.M - m0));
  const int32_t off = activation_offset(a.bits, vnni);
  if (off != 0) {
    uint8_t* dst = B.xu.get() + m0 * Kp;
    if (a.bits == 4) {
      const uint8_t* src = static_cast<const uint8_t*>(a.qx) + m0 * (Kp / 2);
      for (int64_t j = 0; j < valid * Kp / 2; ++j) {
        dst[2 * j] = static_cast<uint8_t>((src[j] & 0xF) ^ 8);
        dst[2 * j + 1] = static_cast<uint8_t>((src[j] >> 4) ^ 8);
      }
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(a.qx) + m0 * Kp;
      for (int64_t j = 0; j < valid * Kp; ++j) dst[j] = static_cast<uint8_t>(src[j] ^ 0x80u);
    }
    std::memset(dst + valid * Kp, off, static_cast<size_t>((rows - valid) * Kp));
  } else {
    const int8_t* src = static_cast<const int8_t*>(a.qx) + m0 * Kp;
    int16_t* dst = B.x8.get() + m0 * Kp;
    for (int64_t j = 0; j < valid * Kp; ++j) dst[j] = src[j];
    std::fill(dst + valid * Kp, dst + rows * Kp, int16_t{0});
  }
  float* asc = B.asc.get() + m0 * ng;
  std::memcpy(asc, a.ascales + m0 * ng, sizeof(float) * valid * ng);
  std::fill(asc + valid * ng, asc + rows * ng, 0.f);
  float* las = B.las.get() + m0 * R;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t r = 0; r < R; ++r)
      las[i * R + r] =
          i < valid ? a.lora_act[(m0 + i) * R + r] * (a.lora_scales != nullptr ? a.lora_scales[r] : 1.f) : 0.f;
}

VD_AVX2 inline __m256i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Keeps the accumulators in registers: GCC otherwise spills some of them inside the hot loop.
#define VD_PIN_ACC(acc)                                                   \
  _Pragma("GCC unroll 8") for (int i_ = 0; i_ < kMR; ++i_) {              \
    __asm__("" : "+x"(acc[i_][0]), "+x"(acc[i_][1]));                     \
  }

// c[i][j] += (ascale[i] * wsc[j]) * float(s[i][j]) for one group.
VD_AVX2 inline void fold_group(const __m256i (&s)[kMR][2], const float* asc, int64_t ng, const float* wsc,
                               float* c) {
  const __m256 w0 = _mm256_loadu_ps(wsc), w1 = _mm256_loadu_ps(wsc + 8);
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    const __m256 ai = _mm256_set1_ps(asc[i * ng]);
    float* ci = c + i * kNR;
    _mm256_storeu_ps(ci, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][0]), _mm256_mul_ps(ai, w0), _mm256_loadu_ps(ci)));
    _mm256_storeu_ps(ci + 8,
                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][1]), _mm256_mul_ps(ai, w1), _mm256_loadu_ps(ci + 8)));
  }
}

// One kMR x 16 micro-tile over all groups, 4-bit codes. x: kMR rows of a + 8 (stride Kp); w: the panel.
VD_AVX2 void tile_w4(int64_t Kp, const uint8_t* x, const int8_t* w, const int32_t* corr, const float* wsc,
                     const float* asc, float* c) {
  const int64_t ng = Kp / kG;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < ng; ++g) {
    __m256i acc[kMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    const uint8_t* xg = x + g * kG;
    const int8_t* wg = w + g * kG * kNR;
    for (int q = 0; q < kG / 4; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + q * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + q * 64 + 32));
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) {
        const __m256i xi = bcast32(xg + i * Kp + q * 4);
        acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(xi, w0));
        acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(xi, w1));
      }
      VD_PIN_ACC(acc)
    }
    const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + g * kNR));
    const __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + g * kNR + 8));
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      acc[i][0] = _mm256_sub_epi32(_mm256_madd_epi16(acc[i][0], ones), k0);
      acc[i][1] = _mm256_sub_epi32(_mm256_madd_epi16(acc[i][1], ones), k1);
    }
    fold_group(acc, asc + g, ng, wsc + g * kNR, c);
  }
}

// The same for 8-bit codes widened to int16.
VD_AVX2 void tile_w8(int64_t Kp, const int16_t* x, const int16_t* w, const float* wsc, const float* asc,
                     float* c) {
  const int64_t ng = Kp / kG;
  for (int64_t g = 0; g < ng; ++g) {
    __m256i acc[kMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    const int16_t* xg = x + g * kG;
    const int16_t* wg = w + g * kG * kNR;
    for (int q = 0; q < kG / 2; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + q * 32));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + q * 32 + 16));
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) {
        const __m256i xi = bcast32(xg + i * Kp + q * 2);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(xi, w0));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(xi, w1));
      }
      VD_PIN_ACC(acc)
    }
    fold_group(acc, asc + g, ng, wsc + g * kNR, c);
  }
}

#define VD_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

// One kMRV x 16 micro-tile over all groups on AVX-512VNNI, both widths: x: kMRV rows of unsigned codes a + off
// (stride Kp); w: the wq panel; corr: off * the group weight sums. vpdpbusd adds four u8 x s8 products per int32
// lane, so a group's dot is 16 instructions per row, exact in int32 (|sum| <= 64 * 255 * 128 < 2^21); the fold
// c += float(dot) * (ascale * wscale) is fold_group's, in the same order, so this path gives the AVX2 path's bits.
// The 12 dots and the 12 fp32 rows of c stay in registers for the whole K loop.
VD_VNNI void tile_vnni(int64_t Kp, const uint8_t* x, const int8_t* w, const int32_t* corr, const float* wsc,
                       const float* asc, float* c) {
  const int64_t ng = Kp / kG;
  __m512 cv[kMRV];
#pragma GCC unroll 16
  for (int i = 0; i < kMRV; ++i) cv[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i acc[kMRV];
#pragma GCC unroll 16
    for (int i = 0; i < kMRV; ++i) acc[i] = _mm512_setzero_si512();
    const uint8_t* xg = x + g * kG;
    const int8_t* wg = w + g * kG * kNR;
    for (int q = 0; q < kG / 4; ++q) {
      const __m512i wv = _mm512_loadu_si512(wg + q * 64);
#pragma GCC unroll 16
      for (int i = 0; i < kMRV; ++i) {
        int32_t xi;
        std::memcpy(&xi, xg + i * Kp + q * 4, sizeof(xi));
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(xi), wv);
      }
    }
    const __m512i k = _mm512_loadu_si512(corr + g * kNR);
    const __m512 ws = _mm512_loadu_ps(wsc + g * kNR);
#pragma GCC unroll 16
    for (int i = 0; i < kMRV; ++i)
      cv[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], k)),
                              _mm512_mul_ps(_mm512_set1_ps(asc[i * ng + g]), ws), cv[i]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMRV; ++i) _mm512_storeu_ps(c + i * kNR, cv[i]);
}

VD_AVX2 inline void store8(QDtype dt, void* y, int64_t i, __m256 v) {
  switch (dt) {
    case QDtype::kFloat16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case QDtype::kBFloat16: {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
      const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + i),
                       _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
      break;
    }
    default: _mm256_storeu_ps(static_cast<float*>(y) + i, v);
  }
}

// Bias, low-rank branch, activation, conversion and store of one micro-tile (rows m0.., panel p); `las` points at
// the tile's first row of lora_act * lora_scales.
VD_AVX2 void tile_epilogue(const QGemmArgs& a, const PackedW& P, int64_t p, int64_t m0, const float* las, float* c) {
  const int64_t R = P.R;
  __m256 v[kMR][2];
  const __m256 b0 = _mm256_loadu_ps(P.bias + p * kNR), b1 = _mm256_loadu_ps(P.bias + p * kNR + 8);
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    v[i][0] = _mm256_add_ps(_mm256_loadu_ps(c + i * kNR), b0);
    v[i][1] = _mm256_add_ps(_mm256_loadu_ps(c + i * kNR + 8), b1);
  }
  const float* lu = P.lup + p * R * kNR;
  for (int64_t r = 0; r < R; ++r) {
    const __m256 u0 = _mm256_loadu_ps(lu + r * kNR), u1 = _mm256_loadu_ps(lu + r * kNR + 8);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m256 l = _mm256_set1_ps(las[i * R + r]);
      v[i][0] = _mm256_fmadd_ps(l, u0, v[i][0]);
      v[i][1] = _mm256_fmadd_ps(l, u1, v[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    _mm256_storeu_ps(c + i * kNR, v[i][0]);
    _mm256_storeu_ps(c + i * kNR + 8, v[i][1]);
  }
  const int64_t n0 = p * kNR;
  const int64_t rows = std::min<int64_t>(kMR, a.M - m0), cols = std::min<int64_t>(kNR, a.N - n0);
  if (a.activation != QActivation::kNone)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) c[i * kNR + j] = activate(c[i * kNR + j], a.activation);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = (m0 + i) * a.N + n0;
    if (cols == kNR) {
      store8(a.dtype, a.y, o, _mm256_loadu_ps(c + i * kNR));
      store8(a.dtype, a.y, o + 8, _mm256_loadu_ps(c + i * kNR + 8));
    } else {
      for (int64_t j = 0; j < cols; ++j) store_elem(a.dtype, a.y, o + j, c[i * kNR + j]);
    }
  }
}

// Work item (row chunk, panel group): every panel of the group against the chunk's rows (the panel, 16 * Kp
// codes, stays in L1 across the chunk's micro-tiles; the chunk stays in L2). `rows` is a multiple of the
// micro-tile's rows (kMRV on VNNI, else kMR).
VD_AVX2 void gemm_item(const QGemmArgs& a, const PackedW& P, const UnpackedRows& all, int64_t m0, int64_t rows,
                       int64_t p0, int64_t p1, bool vnni) {
  const int64_t Kp = P.Kp, ng = P.ng, R = P.R;
  struct {  // the chunk's rows
    const uint8_t* xu;
    const int16_t* x8;
    const float* asc;
    const float* las;
  } B{all.xu ? all.xu.get() + m0 * Kp : nullptr, all.x8 ? all.x8.get() + m0 * Kp : nullptr,
      all.asc.get() + m0 * ng, all.las.get() + m0 * R};
  alignas(64) float c[kMRV * kNR];
  for (int64_t p = p0; p < p1; ++p) {
    const float* wsc = P.wsc + p * ng * kNR;
    const int32_t* corr = P.corr != nullptr ? P.corr + p * ng * kNR : nullptr;
    if (vnni) {
      for (int64_t t = 0; t < rows; t += kMRV) {
        tile_vnni(Kp, B.xu + t * Kp, P.wq + p * Kp * kNR, corr, wsc, B.asc + t * ng, c);
        for (int64_t j = 0; j < kMRV; j += kMR)
          tile_epilogue(a, P, p, m0 + t + j, B.las + (t + j) * R, c + j * kNR);
      }
      continue;
    }
    for (int64_t t = 0; t < rows; t += kMR) {
      std::memset(c, 0, sizeof(float) * kMR * kNR);
      if (a.bits == 4)
        tile_w4(Kp, B.xu + t * Kp, P.wq + p * Kp * kNR, corr, wsc, B.asc + t * ng, c);
      else
        tile_w8(Kp, B.x8 + t * Kp, P.w8 + p * Kp * kNR, wsc, B.asc + t * ng, c);
      tile_epilogue(a, P, p, m0 + t, B.las + t * R, c);
    }
  }
}

// A zero-filled byte buffer whose data() is 64-byte aligned.
class AlignedBytes {
 public:
  explicit AlignedBytes(int64_t n) : raw_(new uint8_t[n + 64]()) {}
  uint8_t* data() { return raw_.get() + (64 - reinterpret_cast<uintptr_t>(raw_.get()) % 64) % 64; }

 private:
  std::unique_ptr<uint8_t[]> raw_;
};

// The AVX2 path, or the VNNI one (`vnni`: tile_vnni for both widths, the rest shared). `prepacked`: the caller's
// blob for this path and these shapes (qgemm_pack_weights_cpu), or null to pack the weights here.
void qgemm_avx2(const QGemmArgs& a, bool vnni, const uint8_t* prepacked) {
  const int64_t M = a.M, N = a.N, Kp = a.K, R = a.R;
  const PackLayout L = pack_layout(a.bits, N, Kp, R, vnni);
  std::unique_ptr<AlignedBytes> own;
  if (prepacked == nullptr) own = std::make_unique<AlignedBytes>(L.total);
  // the kernels only read the weights; a prepacked blob is never written
  const PackedW P = bind_packed(own ? own->data() : const_cast<uint8_t*>(prepacked), L, N, Kp, R);
  const int64_t np = P.np;

  // Row chunks of up to 32 micro-tiles, fewer when a chunk's unpacked codes would pass ~128 KiB.
  const int64_t elem = activation_offset(a.bits, vnni) != 0 ? 1 : 2, mr = vnni ? kMRV : kMR;
  const int64_t chunk_tiles =
      std::max<int64_t>(1, std::min<int64_t>(32, (128 << 10) / (mr * std::max<int64_t>(Kp, 1) * elem)));
  const int64_t chunk_rows = chunk_tiles * mr;
  const int64_t mtiles = (M + mr - 1) / mr, Mp = mtiles * mr;
  UnpackedRows B(a, Mp, vnni);
  const int64_t chunks = (mtiles + chunk_tiles - 1) / chunk_tiles;
  constexpr int64_t kPanelGroup = 8;
  const int64_t groups = (np + kPanelGroup - 1) / kPanelGroup;
  const int64_t items = chunks * groups;
  [[maybe_unused]] const double work = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(Kp + R);
  // One parallel region (each region end is a barrier, costly when the cores are shared).
#pragma omp parallel if (work >= 2e6)
  {
    if (own) {
#pragma omp for schedule(static) nowait
      for (int64_t n = 0; n < N; ++n) pack_weight_column(a, P, n, vnni);
    }
#pragma omp for schedule(static) nowait
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t m0 = chunk * chunk_rows;
      unpack_rows(a, m0, std::min(chunk_rows, Mp - m0), vnni, B);
    }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t chunk = it / groups, grp = it % groups;
      const int64_t m0 = chunk * chunk_rows;
      const int64_t rows = std::min(chunk_rows, Mp - m0);
      gemm_item(a, P, B, m0, rows, grp * kPanelGroup, std::min(np, (grp + 1) * kPanelGroup), vnni);
    }
  }
}
#endif  // VELODIFF_QGEMM_X86

#ifdef VELODIFF_QGEMM_X86
// a.packed, when it holds weights packed for this call's shapes on `vnni`'s path; null when there is none or it was
// packed for the other path (the call then packs its own). False (and a message) for a blob that is not a weight
// pack or was made for other shapes.
bool prepacked_for(const QGemmArgs& a, bool vnni, const uint8_t*& blob, char* error) {
  blob = nullptr;
  if (a.packed == nullptr || a.packed_bytes == 0) return true;
  int64_t h[kPackHeader] = {0};
  if (a.packed_bytes >= static_cast<int64_t>(sizeof(h))) std::memcpy(h, a.packed, sizeof(h));
  if (h[0] != kPackMagic || h[1] != 1 || h[7] != a.packed_bytes) {
    std::snprintf(error, 256, "qgemm: packed is not a weight pack of velodiff.ops.qgemm_pack (%lld bytes)",
                  static_cast<long long>(a.packed_bytes));
    return false;
  }
  if (h[3] != a.bits || h[4] != a.N || h[5] != a.K || h[6] != a.R) {
    std::snprintf(error, 256,
                  "qgemm: packed was made for bits=%lld N=%lld Kp=%lld R=%lld, this call has bits=%d N=%lld "
                  "Kp=%lld R=%lld; pack these weights again",
                  static_cast<long long>(h[3]), static_cast<long long>(h[4]), static_cast<long long>(h[5]),
                  static_cast<long long>(h[6]), a.bits, static_cast<long long>(a.N), static_cast<long long>(a.K),
                  static_cast<long long>(a.R));
    return false;
  }
  if (h[2] == (vnni ? 2 : 1)) blob = static_cast<const uint8_t*>(a.packed);
  return true;
}
#endif

bool check_bits(const char* fn, int bits, char* error) {
  if (bits == 4 || bits == 8) return true;
  std::snprintf(error, 256, "%s: bits must be 4 or 8, got %d", fn, bits);
  return false;
}

bool check_ptr(const char* fn, const char* name, const void* p, int64_t count, char* error) {
  if (p != nullptr || count == 0) return true;
  std::snprintf(error, 256, "%s: %s must be non-null (%lld elements)", fn, name, static_cast<long long>(count));
  return false;
}

}  // namespace

bool quantize_act_cpu(const QuantizeActArgs& a, char* error) {
  const char* fn = "quantize_act_cpu";
  if (!check_bits(fn, a.bits, error)) return false;
  if (a.M < 0 || a.K < 0 || a.R < 0) {
    std::snprintf(error, 256, "%s: sizes must be >= 0, got M=%lld K=%lld R=%lld", fn, static_cast<long long>(a.M),
                  static_cast<long long>(a.K), static_cast<long long>(a.R));
    return false;
  }
  const int64_t Kp = qgemm_padded_k(a.K);
  if (!check_ptr(fn, "x", a.x, a.M * a.K, error) || !check_ptr(fn, "qx", a.qx, a.M * Kp, error) ||
      !check_ptr(fn, "ascales", a.ascales, a.M * (Kp / kG), error) ||
      !check_ptr(fn, "lora_down", a.lora_down, a.K * a.R, error) ||
      !check_ptr(fn, "lora_act", a.lora_act, a.M * a.R, error))
    return false;
  if (a.M == 0) return true;
  if (Kp == 0) {  // no columns: lora_act is an empty sum
    for (int64_t i = 0; i < a.M * a.R; ++i) a.lora_act[i] = 0.f;
    return true;
  }
  // lora_down as fp32 (shared by all rows)
  std::vector<float> ld_buf;
  const float* ld = nullptr;
  if (a.R > 0) {
    if (a.dtype == QDtype::kFloat32) {
      ld = static_cast<const float*>(a.lora_down);
    } else {
      to_float(a.dtype, a.lora_down, a.K * a.R, ld_buf);
      ld = ld_buf.data();
    }
  }
  QPath path;
  if (!select_path(path, error)) return false;
#ifdef VELODIFF_QGEMM_X86
  if (path != QPath::kPortable) {
    // Blocks of kLoraRows rows: the block's down-projection with the register-tiled micro-kernel, then each
    // row's quantization (which then skips the down-projection: R = 0 in its arguments).
    QuantizeActArgs rows_only = a;
    rows_only.R = 0;
    const int64_t blocks = (a.M + kLoraRows - 1) / kLoraRows;
#pragma omp parallel if (a.M * (Kp + a.K * a.R) >= (1 << 15))
    {
      std::vector<float> xf(static_cast<size_t>(a.K) * kLoraRows), v(static_cast<size_t>(Kp));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t m0 = b * kLoraRows;
        const int rows = static_cast<int>(std::min<int64_t>(kLoraRows, a.M - m0));
        if (a.R > 0) {
          load_rows_avx2(a, m0, rows, xf.data());
          lora_down_block_avx2(xf.data(), a.K, rows, ld, a.R, a.lora_act + m0 * a.R);
        }
        for (int i = 0; i < rows; ++i)
          quantize_row_avx2(rows_only, nullptr, m0 + i, xf.data() + i * a.K, v.data(), /*loaded=*/a.R > 0);
      }
    }
    return true;
  }
#endif
#pragma omp parallel if (a.M * (Kp + a.K * a.R) >= (1 << 15))
  {
    std::vector<float> xf(static_cast<size_t>(a.K)), v(static_cast<size_t>(Kp));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < a.M; ++m) quantize_row_scalar(a, ld, m, xf.data(), v.data());
  }
  return true;
}

bool qgemm_cpu(const QGemmArgs& a, char* error) {
  const char* fn = "qgemm_cpu";
  if (!check_bits(fn, a.bits, error)) return false;
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.R < 0 || a.K % kG != 0) {
    std::snprintf(error, 256, "%s: sizes must be >= 0 with K a multiple of 64, got M=%lld N=%lld K=%lld R=%lld",
                  fn, static_cast<long long>(a.M), static_cast<long long>(a.N), static_cast<long long>(a.K),
                  static_cast<long long>(a.R));
    return false;
  }
  const int act = static_cast<int>(a.activation);
  if (act < 0 || act > 3) {
    std::snprintf(error, 256, "%s: activation must be 0..3, got %d", fn, act);
    return false;
  }
  const int64_t ng = a.K / kG;
  if (!check_ptr(fn, "qx", a.qx, a.M * a.K, error) || !check_ptr(fn, "ascales", a.ascales, a.M * ng, error) ||
      !check_ptr(fn, "qw", a.qw, a.N * a.K, error) || !check_ptr(fn, "wscales", a.wscales, a.N * ng, error) ||
      !check_ptr(fn, "lora_act", a.lora_act, a.M * a.R, error) ||
      !check_ptr(fn, "lora_up", a.lora_up, a.N * a.R, error) || !check_ptr(fn, "y", a.y, a.M * a.N, error))
    return false;
  if (a.M == 0 || a.N == 0) return true;
  QPath path;
  if (!select_path(path, error)) return false;
#ifdef VELODIFF_QGEMM_X86
  if (path != QPath::kPortable) {
    const bool vnni = path == QPath::kAvx512Vnni;
    const uint8_t* blob = nullptr;
    if (!prepacked_for(a, vnni, blob, error)) return false;
    qgemm_avx2(a, vnni, blob);
    return true;
  }
#endif
  qgemm_scalar(a);
  return true;
}

bool qgemm_packed_bytes_cpu(const QGemmArgs& a, int64_t& bytes, char* error) {
  bytes = 0;
  QPath path;
  if (!check_bits("qgemm_pack", a.bits, error) || !select_path(path, error)) return false;
  if (a.N < 0 || a.K < 0 || a.R < 0 || a.K % kG != 0) {
    std::snprintf(error, 256, "qgemm_pack: sizes must be >= 0 with K a multiple of 64, got N=%lld K=%lld R=%lld",
                  static_cast<long long>(a.N), static_cast<long long>(a.K), static_cast<long long>(a.R));
    return false;
  }
#ifdef VELODIFF_QGEMM_X86
  if (path != QPath::kPortable) bytes = pack_layout(a.bits, a.N, a.K, a.R, path == QPath::kAvx512Vnni).total;
#endif
  return true;
}

bool qgemm_pack_weights_cpu(const QGemmArgs& a, void* out, int64_t bytes, char* error) {
  int64_t need = 0;
  if (!qgemm_packed_bytes_cpu(a, need, error)) return false;
  if (bytes != need) {
    std::snprintf(error, 256, "qgemm_pack: the output must hold %lld bytes, got %lld", static_cast<long long>(need),
                  static_cast<long long>(bytes));
    return false;
  }
  if (need == 0) return true;  // the portable path packs nothing
#ifdef VELODIFF_QGEMM_X86
  if (!check_ptr("qgemm_pack", "qw", a.qw, a.N * a.K, error) ||
      !check_ptr("qgemm_pack", "wscales", a.wscales, a.N * (a.K / kG), error) ||
      !check_ptr("qgemm_pack", "lora_up", a.lora_up, a.N * a.R, error) || !check_ptr("qgemm_pack", "out", out, 1, error))
    return false;
  QPath path;
  select_path(path, error);
  const bool vnni = path == QPath::kAvx512Vnni;
  const PackLayout L = pack_layout(a.bits, a.N, a.K, a.R, vnni);
  uint8_t* base = static_cast<uint8_t*>(out);
  std::memset(base, 0, static_cast<size_t>(L.total));
  write_pack_header(base, a, vnni, L);
  const PackedW P = bind_packed(base, L, a.N, a.K, a.R);
#pragma omp parallel for schedule(static) if (a.N * a.K >= (1 << 16))
  for (int64_t n = 0; n < a.N; ++n) pack_weight_column(a, P, n, vnni);
#endif
  return true;
}

const char* qgemm_cpu_path() {
  QPath path;
  char error[256];
  if (!select_path(path, error)) return "invalid VELODIFF_CPU_ISA";
  static const char* const names[] = {"portable", "avx2", "avx512vnni"};
  return names[static_cast<int>(path)];
}

}  // namespace velodiff
