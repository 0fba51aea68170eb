// The flash-attention tile routine of the CPU kernels, shared by exact attention (attention.cpp) and windowed
// attention (window_attention.cpp): one task computes `rows` queries of one (b, h) against a list of keys, in
// tiles, with the online softmax of csrc/include/velodiff/attention.h. Both kernels run these very functions, so
// windowed attention over one unshifted window that is the whole map gives exact attention's bits.
//
// A task packs its queries, then walks the keys in tiles of kKeyTile: it packs the tile's K transposed and V - or
// takes the tile from a key list packed once (KeyCache) -, reading q, k and v through their strides (no copy of
// the inputs), computes the tile's logits S = Q K^T, updates the running max / sum and rescales the accumulator
// (online softmax), then adds P V. Queries and keys are token indices (a list, or a contiguous range), so the
// callers choose which tokens form a task without moving any data. Two operand formats (the template parameter T
// of the packing and the driver):
//   * T = float, for fp32 and fp16 inputs: Q [rows, D] fp32 pre-multiplied by scale * log2(e) (base-2 logits),
//     K^T [D, kKeyTile], V [kKeyTile, dv8] (Dv rounded up to 8 with zeros); P = S in fp32; fp32 multiply-adds.
//   * T = uint32_t, for bf16 inputs: pairs of bf16 (the low half the even element), multiplied as VDPBF16PS does
//     (AVX512-BF16): per pair, acc += odd * odd, then acc += even * even, two fp32 fused multiply-adds that read
//     denormal inputs (the accumulator included) as zero and flush denormal results to zero (pair_fma_portable;
//     the instruction's definition, checked against it on this project's CPU). Q [rows, ceil(D/2)] pairs over
//     channels, unscaled; K^T [ceil(D/2), kKeyTile] pairs over channels; V [kKeyTile/2, dv8] pairs over keys;
//     the logits multiplied by scale * log2(e) in the softmax; P rounded to bf16 (nearest even) in pairs over
//     keys, as SDPA's CPU kernel and the GPU flash kernels round it for their bf16 P V product.
//
// Every path gives the same bits: AVX-512BF16 (the native pair instruction), AVX-512VL and AVX2 + FMA
// (flash_tile_simd.inc, the same 8-lane code compiled for 32 or 16 vector registers: register blocks of up to 24
// or 12 accumulators, rows x key vectors for Q K^T and rows x channel vectors for P V, broadcasting one operand;
// the bf16 pairs emulated with two FMAs under MXCSR flush-to-zero / denormals-are-zero), chosen at run time, and
// a portable path that performs the same IEEE operations in the same order with std::fma. exp2 is our own
// polynomial (Cephes exp2f's coefficients) in all, the softmax's row max and row sum are taken over the same lanes
// in the same order (softmax_row_portable), and every file including this header must be compiled with
// -ffp-contract=off (CMakeLists.txt) so that no multiply-add is fused behind our back. The result of a query
// depends on nothing but its own row, the key list and the tile boundaries (every kKeyTile keys from the list's
// start): any thread count and any grouping of queries into tasks give the same bits. VELODIFF_CPU_ISA caps the
// path (the tests compare them); VELODIFF_ATTENTION_SCALAR=1 is the same as portable.
//
// Torch-free, CPU only; included by csrc/kernels/cpu/*.cpp alone (not part of the public include directory).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "velodiff/attention.h"
#include "velodiff/float16.h"

namespace velodiff {
namespace flash_cpu {

constexpr int64_t kQueryBlock = 64;  // queries per task
constexpr int64_t kKeyTile = 64;     // keys per tile (a multiple of 16)
constexpr int64_t kKeyPairs = kKeyTile / 2;
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

// dst[i * dst_stride] = element offset + i * stride of base, as fp32, for i in [0, n): the dtype switch once per
// run of elements, so that each case is a plain loop.
inline void load_floats(AttnDType dtype, const void* base, int64_t offset, int64_t stride, int64_t n, float* dst,
                        int64_t dst_stride) {
  switch (dtype) {
    case AttnDType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = fp16_to_float(src[i * stride]);
      break;
    }
    case AttnDType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = bf16_to_float(src[i * stride]);
      break;
    }
    default: {
      const float* src = static_cast<const float*>(base) + offset;
      if (stride == 1 && dst_stride == 1) {
        std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = src[i * stride];
      }
    }
  }
}

// Element offset + i * stride of base = src[i] in the output dtype (round to nearest even), for i in [0, n).
inline void store_floats(AttnDType dtype, void* base, int64_t offset, int64_t stride, int64_t n, const float* src) {
  switch (dtype) {
    case AttnDType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i * stride] = attention_float_to_fp16(src[i]);
      break;
    }
    case AttnDType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i * stride] = attention_float_to_bf16(src[i]);
      break;
    }
    default: {
      float* dst = static_cast<float*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
    }
  }
}

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }
inline int64_t half_up(int64_t n) { return (n + 1) / 2; }

// ---- bf16 pairs ---------------------------------------------------------------------------------------------

constexpr float kMinNormal = 1.17549435e-38f;  // 2^-126

// x, or a zero of x's sign when x is denormal: the instruction's flush of denormal inputs and results.
inline float flush_denormal(float x) { return std::fabs(x) < kMinNormal ? std::copysign(0.f, x) : x; }

inline float bf16_high(uint32_t pair) { return flush_denormal(bits_to_float(pair & 0xffff0000u)); }
inline float bf16_low(uint32_t pair) { return flush_denormal(bits_to_float(pair << 16)); }

// VDPBF16PS on one lane: acc + a.odd * b.odd, then + a.even * b.even, each an fp32 fma of flushed inputs with a
// flushed result.
inline float pair_fma_portable(float acc, uint32_t a, uint32_t b) {
  acc = flush_denormal(std::fma(bf16_high(a), bf16_high(b), flush_denormal(acc)));
  return flush_denormal(std::fma(bf16_low(a), bf16_low(b), acc));
}

inline uint32_t bf16_pair(uint16_t even, uint16_t odd) { return static_cast<uint32_t>(even) | (uint32_t{odd} << 16); }

// The per-thread scratch of one task (T: the operand format, header).
template <class T>
struct Scratch {
  int64_t dv8 = 0;
  std::vector<T> q;       // [kQueryBlock, D] (float) or [kQueryBlock, ceil(D/2)] (pairs)
  std::vector<T> kt, vt;  // one tile, packed (packed_tile_words)
  std::vector<float> s;   // [kQueryBlock, kKeyTile], logits, then probabilities
  std::vector<T> p;       // pairs: [kQueryBlock, kKeyPairs], P in bf16 pairs (unused for float)
  std::vector<float> o;   // [kQueryBlock, dv8], the accumulators
  std::vector<float> m, l;  // [kQueryBlock], running max (base 2) and sum
  Scratch(int64_t d, int64_t dv);
};

// ---- packing ------------------------------------------------------------------------------------------------

// Words (T) of one packed key tile: K^T, then V (layouts in the header).
template <class T>
int64_t packed_k_words(int64_t d) {
  return (std::is_same_v<T, float> ? d : half_up(d)) * kKeyTile;
}
template <class T>
int64_t packed_tile_words(int64_t d, int64_t dv8) {
  return packed_k_words<T>(d) + (std::is_same_v<T, float> ? kKeyTile : kKeyPairs) * dv8;
}

template <class T>
Scratch<T>::Scratch(int64_t d, int64_t dv)
    : dv8(round_up8(dv)), q(kQueryBlock * (std::is_same_v<T, float> ? d : half_up(d))), kt(packed_k_words<T>(d)),
      vt(kKeyTile * dv8), s(kQueryBlock * kKeyTile), p(std::is_same_v<T, float> ? 0 : kQueryBlock * kKeyPairs),
      o(kQueryBlock * dv8), m(kQueryBlock), l(kQueryBlock) {}

// The bf16 bits of element i (stride `stride`) of a row; 0 past n (pair padding).
inline uint16_t bf16_at(const uint16_t* row, int64_t stride, int64_t i, int64_t n) { return i < n ? row[i * stride] : 0; }

// Packs keys [t0, t0 + n) of a key list (n <= kKeyTile; key jj is token keys[jj], or jj when keys is nullptr) of
// (b, h): K^T into kt (keys n .. round_up8(n) zero: the vector paths read them) and V into vt (channels Dv .. dv8
// zero; pairs: the odd key of the last pair zero when n is odd).
template <class T>
void pack_tile(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t t0, int64_t n,
               int64_t dv8, T* kt, T* vt) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, n8 = round_up8(n);
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  auto token = [&](int64_t jj) { return keys != nullptr ? keys[t0 + jj] : t0 + jj; };
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t jj = 0; jj < n; ++jj) {
      load_floats(a.dtype, a.k, kbase + token(jj) * a.k_stride[2], a.k_stride[3], D, kt + jj, kKeyTile);
      float* vdst = vt + jj * dv8;
      load_floats(a.dtype, a.v, vbase + token(jj) * a.v_stride[2], a.v_stride[3], Dv, vdst, 1);
      for (int64_t c = Dv; c < dv8; ++c) vdst[c] = 0.f;
    }
    for (int64_t c = 0; c < D; ++c)
      for (int64_t jj = n; jj < n8; ++jj) kt[c * kKeyTile + jj] = 0.f;
  } else {
    const uint16_t* k = static_cast<const uint16_t*>(a.k);
    const uint16_t* v = static_cast<const uint16_t*>(a.v);
    const int64_t d2 = half_up(D), ks = a.k_stride[3], vs = a.v_stride[3];
    for (int64_t jj = 0; jj < n; ++jj) {
      const uint16_t* krow = k + kbase + token(jj) * a.k_stride[2];
      for (int64_t i = 0; i < d2; ++i)
        kt[i * kKeyTile + jj] = bf16_pair(krow[2 * i * ks], bf16_at(krow, ks, 2 * i + 1, D));
    }
    for (int64_t i = 0; i < d2; ++i)
      for (int64_t jj = n; jj < n8; ++jj) kt[i * kKeyTile + jj] = 0u;
    for (int64_t jp = 0; jp < half_up(n); ++jp) {
      const uint16_t* even = v + vbase + token(2 * jp) * a.v_stride[2];
      const uint16_t* odd = 2 * jp + 1 < n ? v + vbase + token(2 * jp + 1) * a.v_stride[2] : nullptr;
      uint32_t* vdst = vt + jp * dv8;
      for (int64_t c = 0; c < Dv; ++c) vdst[c] = bf16_pair(even[c * vs], odd != nullptr ? odd[c * vs] : 0);
      for (int64_t c = Dv; c < dv8; ++c) vdst[c] = 0u;
    }
  }
}

// Packs a whole key list of (b, h): ceil(nkeys / kKeyTile) tiles of packed_tile_words(D, dv8) words into dst.
template <class T>
void pack_keys(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t nkeys, int64_t dv8,
               T* dst) {
  const int64_t tile = packed_tile_words<T>(a.head_dim, dv8);
  for (int64_t t0 = 0, i = 0; t0 < nkeys; t0 += kKeyTile, ++i) {
    T* kt = dst + i * tile;
    pack_tile(a, b, h, keys, t0, std::min(kKeyTile, nkeys - t0), dv8, kt, kt + packed_k_words<T>(a.head_dim));
  }
}

// A thread's packed copy of one key list, reused by the query blocks of that list that the thread runs (tasks of
// one list run back to back): the keys are read and converted about once per thread instead of once per query
// block. get() returns the packed list of `id` (packing it when the thread last packed another list), or nullptr
// when it would exceed kMaxPackedWords (the caller then packs tile by tile; the values are the same either way).
template <class T>
class KeyCache {
 public:
  static constexpr int64_t kMaxPackedWords = int64_t{1} << 22;  // 16 MiB per thread at most

  const T* get(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t nkeys, int64_t dv8,
               int64_t id) {
    const int64_t words = (nkeys + kKeyTile - 1) / kKeyTile * packed_tile_words<T>(a.head_dim, dv8);
    if (words > kMaxPackedWords) return nullptr;
    if (id != id_) {
      if (static_cast<int64_t>(data_.size()) < words) data_.resize(static_cast<size_t>(words));
      pack_keys(a, b, h, keys, nkeys, dv8, data_.data());
      id_ = id;
    }
    return data_.data();
  }

 private:
  std::vector<T> data_;
  int64_t id_ = -1;
};

// ---- portable micro-kernels -------------------------------------------------------------------------------------

// The multiply-add of one operand format: fp32 fma, or pair_fma_portable.
inline float madd_portable(float acc, float a, float b) { return std::fma(a, b, acc); }
inline float madd_portable(float acc, uint32_t a, uint32_t b) { return pair_fma_portable(acc, a, b); }

// S[r, j] = sum_i Q[r, i] Kt[i, j] for rows [0, rows), keys [0, n), words i in [0, dw): one chain per (r, j).
template <class T>
void qk_portable(const T* q, int64_t dw, const T* kt, int64_t rows, int64_t n, float* s) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < dw; ++i) acc = madd_portable(acc, q[r * dw + i], kt[i * kKeyTile + j]);
      s[r * kKeyTile + j] = acc;
    }
}

// O[r, c] += sum_j P[r, j] V[j, c] for rows [0, rows), key words j in [0, nw) (keys, or pairs of keys), channels
// [0, dv8): key order. P's rows are pstride words apart.
template <class T>
void pv_portable(const T* p, int64_t pstride, const T* vt, int64_t dv8, int64_t rows, int64_t nw, float* o) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < dv8; ++c) {
      float acc = o[r * dv8 + c];
      for (int64_t j = 0; j < nw; ++j) acc = madd_portable(acc, p[r * pstride + j], vt[j * dv8 + c]);
      o[r * dv8 + c] = acc;
    }
}

// The lane reductions of the softmax, shared by every path. max_lanes8: the maximum of 8 lanes by the tree
// (i, i + 4), (i, i + 2), (0, 1) with the vector max's rule a > b ? a : b. sum_lanes16: the sum of 16 lanes by the
// tree (i, i + 8), (i, i + 4), (i, i + 2), (0, 1).
inline float max_lanes8(const float* x) {
  float t[4];
  for (int i = 0; i < 4; ++i) t[i] = x[i] > x[i + 4] ? x[i] : x[i + 4];
  for (int i = 0; i < 2; ++i) t[i] = t[i] > t[i + 2] ? t[i] : t[i + 2];
  return t[0] > t[1] ? t[0] : t[1];
}

inline float sum_lanes16(const float* x) {
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = x[i] + x[i + 8];
  for (int i = 0; i < 4; ++i) t[i] = t[i] + t[i + 4];
  for (int i = 0; i < 2; ++i) t[i] = t[i] + t[i + 2];
  return t[0] + t[1];
}

// The online softmax of one row (csrc/include/velodiff/attention.h) for one tile: srow holds the logits of keys
// [0, n) and n8 - n padding slots (n8 = round_up8(n)); kScale: they are first multiplied by `scale` (the pairs
// format's unscaled logits). The new max m_new = max(m, max of the row), the row's max taken over 8 lanes (lane
// j % 8, padding = -inf, each lane's running max as a > b ? a : b) then max_lanes8; probabilities 2^(s - m_new)
// written back (0 in the padding); their sum over 16 lanes (lane j % 16, keys in order) then sum_lanes16;
// l = l * alpha + sum. Returns alpha = 2^(m_old - m_new), the accumulator's rescale. The vector paths do exactly
// this, eight lanes at a time.
template <bool kScale>
float softmax_row_portable(float* srow, int64_t n, int64_t n8, float scale, float& m, float& l) {
  if constexpr (kScale)
    for (int64_t j = 0; j < n; ++j) srow[j] *= scale;
  for (int64_t j = n; j < n8; ++j) srow[j] = -std::numeric_limits<float>::infinity();
  float lanes[16];
  for (int i = 0; i < 8; ++i) lanes[i] = srow[i];
  for (int64_t j = 8; j < n8; ++j) lanes[j % 8] = srow[j] > lanes[j % 8] ? srow[j] : lanes[j % 8];
  const float m_new = std::max(m, max_lanes8(lanes));
  const float alpha = exp2_portable(m - m_new);  // m = -inf (first tile): 0 (the sums are still 0)
  for (int i = 0; i < 16; ++i) lanes[i] = 0.f;
  for (int64_t j = 0; j < n8; ++j) {
    srow[j] = exp2_portable(srow[j] - m_new);
    lanes[j % 16] += srow[j];
  }
  l = l * alpha + sum_lanes16(lanes);
  m = m_new;
  return alpha;
}

// One key tile for `rows` queries, portable: S = Q K^T over keys [0, n), the online softmax of each row, O = alpha
// O + P V (pairs: P rounded to bf16 pairs into p first).
template <class T>
void tile_step_portable(const T* q, int64_t dw, const T* kt, const T* vt, int64_t dv8, int64_t rows, int64_t n,
                        float scale, float* s, T* p, float* m, float* l, float* o) {
  constexpr bool kPairs = std::is_same_v<T, uint32_t>;
  const int64_t n8 = round_up8(n);
  qk_portable(q, dw, kt, rows, n, s);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = s + r * kKeyTile;
    const float alpha = softmax_row_portable<kPairs>(srow, n, n8, scale, m[r], l[r]);
    for (int64_t c = 0; c < dv8; ++c) o[r * dv8 + c] *= alpha;
    if constexpr (kPairs)
      for (int64_t jp = 0; jp < n8 / 2; ++jp)
        p[r * kKeyPairs + jp] = bf16_pair(attention_float_to_bf16(srow[2 * jp]), attention_float_to_bf16(srow[2 * jp + 1]));
  }
  if constexpr (kPairs)
    pv_portable(p, kKeyPairs, vt, dv8, rows, half_up(n), o);
  else
    pv_portable(s, kKeyTile, vt, dv8, rows, n, o);
}

// ---- vector micro-kernels: flash_tile_simd.inc, compiled for AVX2 + FMA, AVX-512VL and AVX-512BF16 -----------
#if defined(__x86_64__) && defined(__GNUC__)
namespace avx2 {
#define VD_SIMD_TARGET __attribute__((target("avx2,fma")))
constexpr int kMaxAcc = 12;     // accumulators per register block (16 registers)
constexpr int kMaxPvCols = 4;   // channel vectors per P V block
constexpr bool kNativeBf16 = false;
#include "flash_tile_simd.inc"
#undef VD_SIMD_TARGET
}  // namespace avx2

namespace avx512 {
#define VD_SIMD_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl")))
constexpr int kMaxAcc = 24;     // accumulators per register block (32 registers)
constexpr int kMaxPvCols = 6;
constexpr bool kNativeBf16 = false;
#include "flash_tile_simd.inc"
#undef VD_SIMD_TARGET
}  // namespace avx512

namespace avx512bf16 {
#define VD_SIMD_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bf16")))
constexpr int kMaxAcc = 24;
constexpr int kMaxPvCols = 6;
constexpr bool kNativeBf16 = true;
#include "flash_tile_simd.inc"
#undef VD_SIMD_TARGET
}  // namespace avx512bf16
#endif

// The instruction set the tile routine runs (cpu_isa.h): the best this CPU has, capped by VELODIFF_CPU_ISA or
// VELODIFF_ATTENTION_SCALAR=1 (portable). Every choice gives the same bits.
using cpu_isa::Isa;
inline bool select_attention_isa(Isa& isa, char* error) {
  return cpu_isa::select_isa(isa, error, "VELODIFF_ATTENTION_SCALAR");
}

// ---- one task -----------------------------------------------------------------------------------------------

// One task: `rows` queries of (b, h) against `nkeys` keys, operand format T (header; pairs for bf16 inputs). Query
// row r is token `queries[r]` of q (and of out), or token i0 + r when `queries` is nullptr; key jj is token
// `keys[jj]` of k and v, or token jj when `keys` is nullptr. `packed`: the key list already packed (KeyCache; then
// `keys` is not read), or nullptr to pack each tile here; the values, and so the bits, are the same. Writes the
// rows' outputs (zeros for a row without keys). rows <= kQueryBlock.
template <class T>
void flash_rows(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* queries, int64_t i0, int64_t rows,
                const int64_t* keys, int64_t nkeys, Isa isa, Scratch<T>& w, const T* packed = nullptr) {
  constexpr bool kPairs = std::is_same_v<T, uint32_t>;
  const int64_t D = a.head_dim, Dv = a.v_head_dim, dv8 = w.dv8, dw = kPairs ? half_up(D) : D;
  const float qscale = a.scale * kAttentionLog2e;
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = qbase + (queries != nullptr ? queries[r] : i0 + r) * a.q_stride[2];
    T* qrow = w.q.data() + r * dw;
    if constexpr (kPairs) {
      const uint16_t* src = static_cast<const uint16_t*>(a.q) + row;
      const int64_t qs = a.q_stride[3];
      for (int64_t i = 0; i < dw; ++i) qrow[i] = bf16_pair(src[2 * i * qs], bf16_at(src, qs, 2 * i + 1, D));
    } else {
      load_floats(a.dtype, a.q, row, a.q_stride[3], D, qrow, 1);
      for (int64_t c = 0; c < D; ++c) qrow[c] *= qscale;
    }
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.f;
  }
  std::fill(w.o.begin(), w.o.begin() + rows * dv8, 0.f);
  const int64_t tile_words = packed_tile_words<T>(D, dv8);
  // the pairs format scales the logits in the softmax; the float format's queries carry the scale already
  const float scale = kPairs ? qscale : 1.f;
  for (int64_t t0 = 0; t0 < nkeys; t0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, nkeys - t0);
    const T* kt = w.kt.data();
    const T* vt = w.vt.data();
    if (packed != nullptr) {
      kt = packed + (t0 / kKeyTile) * tile_words;
      vt = kt + packed_k_words<T>(D);
    } else {
      pack_tile(a, b, h, keys, t0, n, dv8, w.kt.data(), w.vt.data());
    }
    const T* q = w.q.data();
    float *s = w.s.data(), *o = w.o.data(), *m = w.m.data(), *l = w.l.data();
    T* p = w.p.data();
    switch (isa) {
#if defined(__x86_64__) && defined(__GNUC__)
      case Isa::kAvx512Bf16: avx512bf16::tile_step(q, dw, kt, vt, dv8, rows, n, scale, s, p, m, l, o); break;
      case Isa::kAvx512: avx512::tile_step(q, dw, kt, vt, dv8, rows, n, scale, s, p, m, l, o); break;
      case Isa::kAvx2: avx2::tile_step(q, dw, kt, vt, dv8, rows, n, scale, s, p, m, l, o); break;
#endif
      default: tile_step_portable(q, dw, kt, vt, dv8, rows, n, scale, s, p, m, l, o);
    }
  }
  const int64_t obase = b * a.out_stride[0] + h * a.out_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = obase + (queries != nullptr ? queries[r] : i0 + r) * a.out_stride[2];
    const float l = w.l[r];
    float* orow = w.o.data() + r * dv8;
    for (int64_t c = 0; c < Dv; ++c) orow[c] = l > 0.f ? orow[c] / l : 0.f;
    store_floats(a.dtype, a.out, row, a.out_stride[3], Dv, orow);
  }
}

}  // namespace flash_cpu
}  // namespace velodiff
