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
// Three paths, the same bits: AVX2 + FMA and AVX-512VL (flash_tile_simd.inc, the same 8-lane code compiled for
// 16 or 32 vector registers: register blocks of up to 12 or 24 accumulators, rows x key vectors for Q K^T and
// rows x channel vectors for P V, broadcasting one operand), chosen at run time, and a portable path that
// performs the same IEEE operations in the same order with std::fma. exp2 is our own polynomial (Cephes exp2f's
// coefficients) in all, the softmax's row max and row sum are taken over the same lanes in the same order
// (softmax_row_portable), and every file including this header must be compiled with -ffp-contract=off
// (CMakeLists.txt) so that no multiply-add is fused behind our back. The result of a query depends on nothing but
// its own row, the key list and the tile boundaries (every kKeyTile keys from the list's start): any thread count
// and any grouping of queries into tasks give the same bits. VELODIFF_CPU_ISA=portable|avx2 caps the path (the
// tests compare them); VELODIFF_ATTENTION_SCALAR=1 is the same as portable.
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
// [0, n) and n8 - n padding slots (n8 = round_up8(n)). The new max m_new = max(m, max of the row), the row's max
// taken over 8 lanes (lane j % 8, padding = -inf, each lane's running max as a > b ? a : b) then max_lanes8;
// probabilities 2^(s - m_new) written back (0 in the padding); their sum over 16 lanes (lane j % 16, keys in
// order) then sum_lanes16; l = l * alpha + sum. Returns alpha = 2^(m_old - m_new), the accumulator's rescale.
// The vector paths do exactly this, eight lanes at a time.
inline float softmax_row_portable(float* srow, int64_t n, int64_t n8, float& m, float& l) {
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

// ---- vector micro-kernels: flash_tile_simd.inc, compiled for AVX2 + FMA and for AVX-512VL ---------------------
#if defined(__x86_64__) && defined(__GNUC__)
namespace avx2 {
#define VD_SIMD_TARGET __attribute__((target("avx2,fma")))
constexpr int kMaxAcc = 12;     // accumulators per register block (16 registers)
constexpr int kMaxPvCols = 4;   // channel vectors per P V block
#include "flash_tile_simd.inc"
#undef VD_SIMD_TARGET
}  // namespace avx2

namespace avx512 {
#define VD_SIMD_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl")))
constexpr int kMaxAcc = 24;     // accumulators per register block (32 registers)
constexpr int kMaxPvCols = 6;
#include "flash_tile_simd.inc"
#undef VD_SIMD_TARGET
}  // namespace avx512
#endif

// The instruction set the tile routine runs: the best this CPU has, capped by the environment variable
// VELODIFF_CPU_ISA (portable | avx2 | avx512; the tests compare them) or VELODIFF_ATTENTION_SCALAR=1 (portable).
// Every choice gives the same bits.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")        ? Isa::kAvx2
                                                                                                   : Isa::kPortable;
  return best;
#else
  return Isa::kPortable;
#endif
}

// False (and a message in error) for a VELODIFF_CPU_ISA that is none of the names.
inline bool select_isa(Isa& isa, char* error) {
  isa = best_isa();
  const char* scalar = std::getenv("VELODIFF_ATTENTION_SCALAR");
  if (scalar != nullptr && scalar[0] != '\0' && std::strcmp(scalar, "0") != 0) isa = Isa::kPortable;
  const char* cap = std::getenv("VELODIFF_CPU_ISA");
  if (cap == nullptr || cap[0] == '\0' || std::strcmp(cap, "avx512") == 0) return true;
  if (std::strcmp(cap, "avx2") == 0) {
    isa = std::min(isa, Isa::kAvx2);
  } else if (std::strcmp(cap, "portable") == 0) {
    isa = Isa::kPortable;
  } else {
    std::snprintf(error, 256, "VELODIFF_CPU_ISA must be portable, avx2 or avx512 (or unset), not '%.100s'", cap);
    return false;
  }
  return true;
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
    load_floats(a.dtype, a.k, krow, a.k_stride[3], D, kt + jj, kKeyTile);
    float* vdst = vt + jj * dv8;
    load_floats(a.dtype, a.v, vrow, a.v_stride[3], Dv, vdst, 1);
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

// A thread's packed copy of one key list, reused by the query blocks of that list that the thread runs (tasks of
// one list run back to back): the keys are read and converted about once per thread instead of once per query
// block. get() returns the packed list of `id` (packing it when the thread last packed another list), or nullptr
// when it would exceed kMaxPackedFloats (the caller then packs tile by tile; the values are the same either way).
class KeyCache {
 public:
  static constexpr int64_t kMaxPackedFloats = int64_t{1} << 22;  // 16 MiB per thread at most

  const float* get(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* keys, int64_t nkeys, int64_t dv8,
                   int64_t id) {
    const int64_t floats = (nkeys + kKeyTile - 1) / kKeyTile * packed_tile_floats(a.head_dim, dv8);
    if (floats > kMaxPackedFloats) return nullptr;
    if (id != id_) {
      if (static_cast<int64_t>(data_.size()) < floats) data_.resize(static_cast<size_t>(floats));
      pack_keys(a, b, h, keys, nkeys, dv8, data_.data());
      id_ = id;
    }
    return data_.data();
  }

 private:
  std::vector<float> data_;
  int64_t id_ = -1;
};

// ---- one task -----------------------------------------------------------------------------------------------

// One task: `rows` queries of (b, h) against `nkeys` keys. Query row r is token `queries[r]` of q (and of out),
// or token i0 + r when `queries` is nullptr; key jj is token `keys[jj]` of k and v, or token jj when `keys` is
// nullptr. `packed`: the key list already packed by pack_keys (then `keys` is not read), or nullptr to pack each
// tile here; the values, and so the bits, are the same. Writes the rows' outputs (zeros for a row without keys).
// rows <= kQueryBlock.
inline void flash_rows(const AttentionArgs& a, int64_t b, int64_t h, const int64_t* queries, int64_t i0,
                       int64_t rows, const int64_t* keys, int64_t nkeys, Isa isa, Scratch& w,
                       const float* packed = nullptr) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim, dv8 = w.dv8;
  const float qscale = a.scale * kAttentionLog2e;
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = qbase + (queries != nullptr ? queries[r] : i0 + r) * a.q_stride[2];
    float* qrow = w.q.data() + r * D;
    load_floats(a.dtype, a.q, row, a.q_stride[3], D, qrow, 1);
    for (int64_t c = 0; c < D; ++c) qrow[c] *= qscale;
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
    float* s = w.s.data();
    float* o = w.o.data();
    switch (isa) {
#if defined(__x86_64__) && defined(__GNUC__)
      case Isa::kAvx512: avx512::tile_step(w.q.data(), D, kt, vt, dv8, rows, n, s, w.m.data(), w.l.data(), o); break;
      case Isa::kAvx2: avx2::tile_step(w.q.data(), D, kt, vt, dv8, rows, n, s, w.m.data(), w.l.data(), o); break;
#endif
      default:
        qk_portable(w.q.data(), D, kt, static_cast<int>(rows), n, s);
        for (int64_t r = 0; r < rows; ++r) {
          const float alpha = softmax_row_portable(s + r * kKeyTile, n, n8, w.m[r], w.l[r]);
          for (int64_t c = 0; c < dv8; ++c) o[r * dv8 + c] *= alpha;
        }
        pv_portable(s, vt, dv8, static_cast<int>(rows), n, o);
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
