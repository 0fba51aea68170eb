// The flash-attention tile routine of the CPU kernels, shared by exact attention (attention.cpp) and windowed
// attention (window_attention.cpp): one task computes `rows` queries of one (b, h) against a list of keys, in
// tiles, with the online softmax of csrc/include/velodiff/attention.h. Both kernels run these very functions, so
// windowed attention over one unshifted window that is the whole map gives exact attention's bits.
//
// A task packs its queries as fp32 [rows, D] pre-multiplied by scale * log2(e) (base-2 logits), then walks the
// keys in tiles of kKeyTile: it packs the tile's K transposed ([D, keys], fp32) and V ([keys, Dv8], fp32, Dv
// rounded up to 8 with zeros) - or takes the tile from a key list packed once by pack_keys -, reading q, k and v
// through their strides (no copy of the inputs), computes the tile's logits S = Q K^T, updates the running max /
// sum and rescales the accumulator (online softmax), then adds P V. Queries and keys are token indices (a list,
// or a contiguous range), so the callers choose which tokens form a task without moving any data.
//
// Two paths, the same bits: AVX2 + FMA (chosen at run time; register blocks of 4 queries x 16 keys for Q K^T
// and 4 queries x 16 channels for P V, broadcasting one operand), and a portable path that performs the same
// IEEE operations in the same order with std::fma. exp2 is our own polynomial (Cephes exp2f's coefficients) in
// both, the row sums are added in key order in both, and every file including this header must be compiled with
// -ffp-contract=off (CMakeLists.txt) so that no multiply-add is fused behind our back. The result of a query
// depends on nothing but its own row, the key list and the tile boundaries (every kKeyTile keys from the list's
// start): any thread count and any grouping of queries into tasks give the same bits. VELODIFF_ATTENTION_SCALAR=1
// forces the portable path (the tests compare the two).
//
// Torch-free, CPU only; included by csrc/kernels/cpu/*.cpp alone (not part of the public include directory).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "velodiff/attention.h"
#include "velodiff/float16.h"

namespace velodiff {
namespace flash_cpu {

constexpr int64_t kQueryBlock = 64;  // queries per task
constexpr int64_t kKeyTile = 64;     // keys per tile (a multiple of 16)
constexpr int kRows = 4;             // queries per register block
constexpr int64_t kParallelMin = 1 << 18;  // below this many multiply-adds, threads cost more than they save

// 2^x for x <= 0 (finite or -inf): 2^n * p(f), n = round(x), f = x - n in [-1/2, 1/2], p Cephes exp2f's degree-6
// polynomial (relative error about 2e-7); x < -126 gives 0 (the result would be below 2^-126, and relative to
// the row's largest term, which is 1, it is nothing). Written so that the AVX2 version below performs exactly
// these operations.
constexpr float kExpP0 = 1.535336188319500e-4f, kExpP1 = 1.339887440266574e-3f, kExpP2 = 9.618437357674640e-3f,
                kExpP3 = 5.550332471162809e-2f, kExpP4 = 2.402264791363012e-1f, kExpP5 = 6.931472028550421e-1f;
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: (x + M) - M rounds x to an integer (nearest even)

inline float exp2_portable(float x) {
  if (!(x >= -126.f)) return x != x ? x : 0.f;  // NaN stays NaN
  const float n = (x + kRoundMagic) - kRoundMagic;
  const float f = x - n;
  float p = kExpP0;
  p = std::fma(p, f, kExpP1);
  p = std::fma(p, f, kExpP2);
  p = std::fma(p, f, kExpP3);
  p = std::fma(p, f, kExpP4);
  p = std::fma(p, f, kExpP5);
  p = std::fma(p, f, 1.f);
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

inline float load_as_float(AttnDType dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case AttnDType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case AttnDType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
}

inline void store_from_float(AttnDType dtype, void* base, int64_t offset, float value) {
  switch (dtype) {
    case AttnDType::kFloat16: static_cast<uint16_t*>(base)[offset] = attention_float_to_fp16(value); break;
    case AttnDType::kBFloat16: static_cast<uint16_t*>(base)[offset] = attention_float_to_bf16(value); break;
    default: static_cast<float*>(base)[offset] = value;
  }
}

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// The per-thread scratch of one task.
struct Scratch {
  int64_t d = 0, dv8 = 0;
  std::vector<float> q;   // [kQueryBlock, D], scaled queries
  std::vector<float> kt;  // [D, kKeyTile], the tile's keys transposed
  std::vector<float> vt;  // [kKeyTile, Dv8], the tile's values
  std::vector<float> s;   // [kQueryBlock, kKeyTile], logits, then probabilities
  std::vector<float> o;   // [kQueryBlock, Dv8], the accumulators
  std::vector<float> m, l;  // [kQueryBlock], running max (base 2) and sum
  Scratch(int64_t d_, int64_t dv)
      : d(d_), dv8(round_up8(dv)), q(kQueryBlock * d_), kt(d_ * kKeyTile), vt(kKeyTile * dv8), s(kQueryBlock * kKeyTile),
        o(kQueryBlock * dv8), m(kQueryBlock), l(kQueryBlock) {}
};

// ---- portable micro-kernels -------------------------------------------------------------------------------------

// S[r, j] = sum_d Q[r, d] Kt[d, j] for rows [0, rows), keys [0, n): one fma chain per (r, j), d in order.
inline void qk_portable(const float* q, int64_t d, const float* kt, int rows, int64_t n, float* s) {
  for (int r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc = std::fma(q[r * d + c], kt[c * kKeyTile + j], acc);
      s[r * kKeyTile + j] = acc;
    }
}

// O[r, c] += sum_j P[r, j] V[j, c] for rows [0, rows), keys [0, n), channels [0, dv8): key order.
inline void pv_portable(const float* p, const float* vt, int64_t dv8, int rows, int64_t n, float* o) {
  for (int r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dv8; ++c) {
      float acc = o[r * dv8 + c];
      for (int64_t j = 0; j < n; ++j) acc = std::fma(p[r * kKeyTile + j], vt[j * dv8 + c], acc);
      o[r * dv8 + c] = acc;
    }
}

inline void exp2_rows_portable(float* s, int64_t n, float m) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp2_portable(s[j] - m);
}

// ---- AVX2 + FMA micro-kernels (the same operations per element, in the same order) ---------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#define VD_AVX2 __attribute__((target("avx2,fma")))

template <int R, int C>
VD_AVX2 inline void qk_block_avx2(const float* q, int64_t d, const float* kt, float* s) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t e = 0; e < d; ++e) {
    __m256 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm256_loadu_ps(kt + e * kKeyTile + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * d + e);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(s + r * kKeyTile + 8 * c, acc[r][c]);
}

template <int R>
VD_AVX2 void qk_rows_avx2(const float* q, int64_t d, const float* kt, int64_t n, float* s) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) qk_block_avx2<R, 2>(q, d, kt + j, s + j);
  for (; j < n; j += 8) qk_block_avx2<R, 1>(q, d, kt + j, s + j);  // the tile's keys are zero-padded to 8
}

VD_AVX2 inline void qk_avx2(const float* q, int64_t d, const float* kt, int rows, int64_t n, float* s) {
  switch (rows) {
    case 4: qk_rows_avx2<4>(q, d, kt, n, s); break;
    case 3: qk_rows_avx2<3>(q, d, kt, n, s); break;
    case 2: qk_rows_avx2<2>(q, d, kt, n, s); break;
    default: qk_rows_avx2<1>(q, d, kt, n, s);
  }
}

template <int R, int C>
VD_AVX2 inline void pv_block_avx2(const float* p, const float* vt, int64_t dv8, int64_t n, float* o) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_loadu_ps(o + r * dv8 + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm256_loadu_ps(vt + j * dv8 + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * kKeyTile + j);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + r * dv8 + 8 * c, acc[r][c]);
}

template <int R>
VD_AVX2 void pv_rows_avx2(const float* p, const float* vt, int64_t dv8, int64_t n, float* o) {
  int64_t c = 0;
  for (; c + 16 <= dv8; c += 16) pv_block_avx2<R, 2>(p, vt + c, dv8, n, o + c);
  for (; c < dv8; c += 8) pv_block_avx2<R, 1>(p, vt + c, dv8, n, o + c);
}

VD_AVX2 inline void pv_avx2(const float* p, const float* vt, int64_t dv8, int rows, int64_t n, float* o) {
  switch (rows) {
    case 4: pv_rows_avx2<4>(p, vt, dv8, n, o); break;
    case 3: pv_rows_avx2<3>(p, vt, dv8, n, o); break;
    case 2: pv_rows_avx2<2>(p, vt, dv8, n, o); break;
    default: pv_rows_avx2<1>(p, vt, dv8, n, o);
  }
}

// exp2_portable on 8 lanes: the same operations (the NaN / below -126 select included).
VD_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_blendv_ps(_mm256_set1_ps(0.f), x, keep);  // a safe argument in the dropped lanes
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(xc, magic), magic);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpP5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(_mm256_blendv_ps(_mm256_set1_ps(0.f), r, keep), x, is_nan);
}

VD_AVX2 inline void exp2_rows_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)));
  for (; j < n; ++j) s[j] = exp2_portable(s[j] - m);
}

inline const bool kHaveAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

inline bool use_simd() {
  const char* scalar = std::getenv("VELODIFF_ATTENTION_SCALAR");
  const bool allowed = scalar == nullptr || scalar[0] == '\0' || std::strcmp(scalar, "0") == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  return allowed && kHaveAvx2Fma;
#else
  (void)allowed;
  return false;
#endif
}

// ---- packing ------------------------------------------------------------------------------------------------

// Floats of one packed key tile: K^T [D, kKeyTile] then V [kKeyTile, dv8].
inline int64_t packed_tile_floats(int64_t d, int64_t dv8) { return d * kKeyTile + kKeyTile * dv8; }

// Packs keys [t0, t0 + n) of a key list (n <= kKeyTile; key jj is token keys[jj], or jj when keys is nullptr) of
// (b, h) as fp32: K transposed into kt [D, kKeyTile] (keys n .. round_up8(n) zero: the AVX2 path reads them) and V
// into vt [kKeyTile, dv8] (channels Dv .. dv8 zero).
inline void pack_tile(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t t0, int64_t n,
                      int64_t dv8, float* kt, float* vt) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, n8 = round_up8(n);
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  for (int64_t jj = 0; jj < n; ++jj) {
    const int64_t j = keys != nullptr ? keys[t0 + jj] : t0 + jj;
    const int64_t krow = kbase + j * a.k_stride[2], vrow = vbase + j * a.v_stride[2];
    for (int64_t c = 0; c < D; ++c) kt[c * kKeyTile + jj] = load_as_float(a.dtype, a.k, krow + c * a.k_stride[3]);
    float* vdst = vt + jj * dv8;
    for (int64_t c = 0; c < Dv; ++c) vdst[c] = load_as_float(a.dtype, a.v, vrow + c * a.v_stride[3]);
    for (int64_t c = Dv; c < dv8; ++c) vdst[c] = 0.f;
  }
  for (int64_t c = 0; c < D; ++c)
    for (int64_t jj = n; jj < n8; ++jj) kt[c * kKeyTile + jj] = 0.f;
}

// Packs a whole key list of (b, h): ceil(nkeys / kKeyTile) tiles of packed_tile_floats(D, dv8) floats into dst,
// for flash_rows' `packed` (a caller that runs several query blocks against one key list packs it once).
inline void pack_keys(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t nkeys,
                      int64_t dv8, float* dst) {
  const int64_t tile = packed_tile_floats(a.head_dim, dv8);
  for (int64_t t0 = 0, i = 0; t0 < nkeys; t0 += kKeyTile, ++i) {
    float* kt = dst + i * tile;
    pack_tile(a, b, h, keys, t0, std::min(kKeyTile, nkeys - t0), dv8, kt, kt + a.head_dim * kKeyTile);
  }
}

// ---- one task -----------------------------------------------------------------------------------------------

// One task: `rows` queries of (b, h) against `nkeys` keys. Query row r is token `queries[r]` of q (and of out),
// or token i0 + r when `queries` is nullptr; key jj is token `keys[jj]` of k and v, or token jj when `keys` is
// nullptr. `packed`: the key list already packed by pack_keys (then `keys` is not read), or nullptr to pack each
// tile here; the values, and so the bits, are the same. Writes the rows' outputs (zeros for a row without keys).
// rows <= kQueryBlock.
inline void flash_rows(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* queries, int64_t i0,
                       int64_t rows, const int64_t* keys, int64_t nkeys, bool simd, Scratch& w,
                       const float* packed = nullptr) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, dv8 = w.dv8;
  const float qscale = a.scale * kAttentionLog2e;
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = qbase + (queries != nullptr ? queries[r] : i0 + r) * a.q_stride[2];
    for (int64_t c = 0; c < D; ++c) w.q[r * D + c] = load_as_float(a.dtype, a.q, row + c * a.q_stride[3]) * qscale;
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + rows * dv8, 0.f);
  const int64_t tile_floats = packed_tile_floats(D, dv8);
  for (int64_t t0 = 0; t0 < nkeys; t0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, nkeys - t0), n8 = round_up8(n);
    const float* kt = w.kt.data();
    const float* vt = w.vt.data();
    if (packed != nullptr) {
      kt = packed + (t0 / kKeyTile) * tile_floats;
      vt = kt + D * kKeyTile;
    } else {
      pack_tile(a, b, h, keys, t0, n, dv8, w.kt.data(), w.vt.data());
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int rr = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
      float* s = w.s.data() + r0 * kKeyTile;
      float* o = w.o.data() + r0 * dv8;
#if defined(__x86_64__) && defined(__GNUC__)
      if (simd)
        qk_avx2(w.q.data() + r0 * D, D, kt, rr, n8, s);
      else
#endif
        qk_portable(w.q.data() + r0 * D, D, kt, rr, n, s);
      // Online softmax (header): new max, rescale of the running sum and the accumulator, probabilities.
      for (int r = 0; r < rr; ++r) {
        float* srow = s + r * kKeyTile;
        float mt = srow[0];
        for (int64_t j = 1; j < n; ++j) mt = std::max(mt, srow[j]);
        const float m_old = w.m[r0 + r];
        const float m_new = std::max(m_old, mt);
        const float alpha = exp2_portable(m_old - m_new);  // m_old = -inf: 0 (the sums are still 0)
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd)
          exp2_rows_avx2(srow, n, m_new);
        else
#endif
          exp2_rows_portable(srow, n, m_new);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += srow[j];
        w.l[r0 + r] = w.l[r0 + r] * alpha + sum;
        w.m[r0 + r] = m_new;
        float* orow = o + r * dv8;
        for (int64_t c = 0; c < dv8; ++c) orow[c] *= alpha;
      }
#if defined(__x86_64__) && defined(__GNUC__)
      if (simd)
        pv_avx2(s, vt, dv8, rr, n, o);
      else
#endif
        pv_portable(s, vt, dv8, rr, n, o);
    }
  }
  const int64_t obase = b * a.out_stride[0] + h * a.out_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = obase + (queries != nullptr ? queries[r] : i0 + r) * a.out_stride[2];
    const float l = w.l[r];
    for (int64_t c = 0; c < Dv; ++c)
      store_from_float(a.dtype, a.out, row + c * a.out_stride[3], l > 0.f ? w.o[r * dv8 + c] / l : 0.f);
  }
}

}  // namespace flash_cpu
}  // namespace velodiff
