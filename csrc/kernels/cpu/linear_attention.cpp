// CPU kernel of non-causal linear attention. Semantics: csrc/include/velodiff/linear_attention.h.
//
// Two passes over one OpenMP team, following the factorisation both papers use (LinFusion, arXiv 2409.02097, its
// generalized linear attention; SANA, arXiv 2410.10629, its ReLU linear attention): o_i = phi(q_i) (sum_j phi(k_j)
// v_j^T) / (phi(q_i) sum_j phi(k_j) + eps'), the sums over keys computed once per (b, h):
//   1. state: tasks (b, h, key chunk), chunks from linear_attention_cpu_chunks (the keys are split only when B * H
//      is small, so that the one or two (b, h) of a batch-1 call still fill the threads). A task walks its keys in
//      tiles of kTokenTile: it packs phi(K) ([keys, D], fp32, phi applied on the packed tile) and V' = [V, 1, 0..]
//      ([keys, W], W = Dv + 1 rounded up to 8) through the strides, then adds phi(K)^T V' to its partial state
//      [D, W]: one fp32 fma chain per state element, in key order. Column Dv of the state is z' = sum_j phi(k_j).
//      The partials of a (b, h) are then added in chunk order (a loop over (b, h, row)).
//   2. output: tasks (b, h, block of kQueryBlock queries). A task packs phi(Q) ([rows, D]), computes
//      [num | den] = phi(Q) [S' | z'] (one fma chain over d per element) and writes num / (den + eps').
//
// Two paths, the same bits: AVX2 + FMA (chosen at run time; register blocks of kRows rows x 16 columns,
// broadcasting the left operand) and a portable path that performs the same IEEE operations in the same order with
// fmaf; phi's exp is linear_attention_exp in both (the header), and this file is compiled with -ffp-contract=off so
// that no multiply-add is fused behind our back. Tasks and chunks depend on the sizes only: any thread count gives
// the same bits. VELODIFF_LINEAR_ATTENTION_SCALAR=1 forces the portable path (the tests compare the two).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "velodiff/float16.h"
#include "velodiff/kernels.h"
#include "velodiff/linear_attention.h"

namespace velodiff {
namespace {

constexpr int64_t kTokenTile = 128;        // keys per packed tile of the state pass
constexpr int64_t kQueryBlock = 64;        // queries per task of the output pass
constexpr int kRows = 6;                   // rows per register block (6 x 16 columns: 12 accumulators)
constexpr double kParallelMin = 1 << 18;   // below this many multiply-adds, threads cost more than they save

// ---- loads and stores through the strides -------------------------------------------------------------------

template <AttnDType DT>
inline float load_one(const void* base, int64_t offset) {
  if constexpr (DT == AttnDType::kFloat16)
    return fp16_to_float(static_cast<const uint16_t*>(base)[offset]);
  else if constexpr (DT == AttnDType::kBFloat16)
    return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
  else
    return static_cast<const float*>(base)[offset];
}

// dst[c] = float(src[offset + c * stride]) for c < n (exact: fp16 / bf16 widen without rounding). Rows with stride 1
// (the usual case) take a loop the compiler vectorises (fp16 through the branchless conversion, the same value).
template <AttnDType DT>
void load_row_t(const void* base, int64_t offset, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    if constexpr (DT == AttnDType::kFloat16) {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = fp16_to_float_branchless(src[c]);
    } else if constexpr (DT == AttnDType::kBFloat16) {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = bf16_to_float(src[c]);
    } else {
      std::memcpy(dst, static_cast<const float*>(base) + offset, static_cast<size_t>(n) * sizeof(float));
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) dst[c] = load_one<DT>(base, offset + c * stride);
}

void load_row(AttnDType dtype, const void* base, int64_t offset, int64_t stride, int64_t n, float* dst) {
  switch (dtype) {
    case AttnDType::kFloat16: load_row_t<AttnDType::kFloat16>(base, offset, stride, n, dst); break;
    case AttnDType::kBFloat16: load_row_t<AttnDType::kBFloat16>(base, offset, stride, n, dst); break;
    default: load_row_t<AttnDType::kFloat32>(base, offset, stride, n, dst);
  }
}

// dst[offset + c * stride] = src[c] rounded to the dtype (round to nearest even), c < n.
template <AttnDType DT>
void store_row_t(const float* src, int64_t n, void* base, int64_t offset, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) {
    if constexpr (DT == AttnDType::kFloat16)
      static_cast<uint16_t*>(base)[offset + c * stride] = attention_float_to_fp16(src[c]);
    else if constexpr (DT == AttnDType::kBFloat16)
      static_cast<uint16_t*>(base)[offset + c * stride] = attention_float_to_bf16(src[c]);
    else
      static_cast<float*>(base)[offset + c * stride] = src[c];
  }
}

void store_row(AttnDType dtype, const float* src, int64_t n, void* base, int64_t offset, int64_t stride) {
  switch (dtype) {
    case AttnDType::kFloat16: store_row_t<AttnDType::kFloat16>(src, n, base, offset, stride); break;
    case AttnDType::kBFloat16: store_row_t<AttnDType::kBFloat16>(src, n, base, offset, stride); break;
    default: store_row_t<AttnDType::kFloat32>(src, n, base, offset, stride);
  }
}

// ---- portable path -------------------------------------------------------------------------------------------

void phi_portable(LinearAttentionKind kind, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = linear_attention_phi(kind, x[i]);
}

// C[r, c] += sum_{j < n} A(r, j) B[j, c] for r < rows, c < width: one fma chain per (r, c), j in order, starting
// from C's value. A(r, j) = a[r * ars + j * ajs] (the state pass reads phi(K) [keys, D] as its transpose).
void gemm_acc_portable(const float* a, int64_t ars, int64_t ajs, const float* b, int64_t ldb, int64_t n, int64_t rows,
                       int64_t width, float* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < width; ++col) {
      float acc = c[r * ldc + col];
      for (int64_t j = 0; j < n; ++j) acc = std::fma(a[r * ars + j * ajs], b[j * ldb + col], acc);
      c[r * ldc + col] = acc;
    }
}

// x[c] = x[c] / den for c < n (IEEE division, correctly rounded: any vector width gives the same bits).
void divide_portable(float* x, int64_t n, float den) {
  for (int64_t c = 0; c < n; ++c) x[c] = x[c] / den;
}

// ---- AVX2 + FMA path (the same operations per element, in the same order) -------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#define VD_AVX2 __attribute__((target("avx2,fma")))

VD_AVX2 void divide_avx2(float* x, int64_t n, float den) {
  const __m256 d = _mm256_set1_ps(den);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, _mm256_div_ps(_mm256_loadu_ps(x + c), d));
  for (; c < n; ++c) x[c] = x[c] / den;
}

// linear_attention_exp on 8 lanes (x <= 0 where it is used; other lanes are computed on a safe argument).
VD_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kLinAttnExpMin), _CMP_GE_OQ);
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_blendv_ps(zero, x, keep);
  const __m256 magic = _mm256_set1_ps(kLinAttnRoundMagic);
  const __m256 t = _mm256_mul_ps(xc, _mm256_set1_ps(kLinAttnLog2e));
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(t, magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLinAttnLn2Hi), xc);  // -(n hi) + x, one rounding: fma(-n, hi, x)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLinAttnLn2Lo), r);
  __m256 p = _mm256_set1_ps(kLinAttnExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kLinAttnExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kLinAttnExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kLinAttnExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kLinAttnExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kLinAttnExpP5));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(_mm256_blendv_ps(zero, res, keep), x, is_nan);
}

VD_AVX2 void phi_avx2(LinearAttentionKind kind, float* x, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  if (kind == LinearAttentionKind::kRelu) {
    // max(0, x) returns x when x is NaN and -0 for -0, as u < 0 ? 0 : u does
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_max_ps(zero, _mm256_loadu_ps(x + i)));
  } else {
    for (; i + 8 <= n; i += 8) {
      const __m256 u = _mm256_loadu_ps(x + i);
      const __m256 pos = _mm256_cmp_ps(u, zero, _CMP_GT_OQ);                // false for NaN: the exp lane, NaN
      const __m256 e = exp_avx2(_mm256_min_ps(zero, u));                     // min(0, NaN) = NaN
      _mm256_storeu_ps(x + i, _mm256_blendv_ps(e, _mm256_add_ps(u, _mm256_set1_ps(1.f)), pos));
    }
  }
  for (; i < n; ++i) x[i] = linear_attention_phi(kind, x[i]);
}

// `#pragma GCC unroll` on the loops over rows and vectors keeps acc in registers (without it GCC stored the array
// to the stack every iteration: 25-40 % slower).
template <int R, int C>
VD_AVX2 inline void gemm_block_avx2(const float* a, int64_t ars, int64_t ajs, const float* b, int64_t ldb, int64_t n,
                                    float* c, int64_t ldc) {
  __m256 acc[R][C];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int q = 0; q < C; ++q) acc[r][q] = _mm256_loadu_ps(c + r * ldc + 8 * q);
  for (int64_t j = 0; j < n; ++j) {
    __m256 bv[C];
    #pragma GCC unroll 8
    for (int q = 0; q < C; ++q) bv[q] = _mm256_loadu_ps(b + j * ldb + 8 * q);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * ars + j * ajs);
      #pragma GCC unroll 8
      for (int q = 0; q < C; ++q) acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int q = 0; q < C; ++q) _mm256_storeu_ps(c + r * ldc + 8 * q, acc[r][q]);
}

template <int C>
VD_AVX2 void gemm_rows_avx2(const float* a, int64_t ars, int64_t ajs, const float* b, int64_t ldb, int64_t n,
                            int64_t rows, float* c, int64_t ldc) {
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) gemm_block_avx2<kRows, C>(a + r0 * ars, ars, ajs, b, ldb, n, c + r0 * ldc, ldc);
  const float* ar = a + r0 * ars;
  float* cr = c + r0 * ldc;
  switch (rows - r0) {
    case 5: gemm_block_avx2<5, C>(ar, ars, ajs, b, ldb, n, cr, ldc); break;
    case 4: gemm_block_avx2<4, C>(ar, ars, ajs, b, ldb, n, cr, ldc); break;
    case 3: gemm_block_avx2<3, C>(ar, ars, ajs, b, ldb, n, cr, ldc); break;
    case 2: gemm_block_avx2<2, C>(ar, ars, ajs, b, ldb, n, cr, ldc); break;
    case 1: gemm_block_avx2<1, C>(ar, ars, ajs, b, ldb, n, cr, ldc); break;
    default: break;
  }
}

// gemm_acc_portable's result, width a multiple of 8: column strips of 16 (then 8) outside, rows inside, so that a
// strip of B stays in L1 while every row block passes over it.
VD_AVX2 void gemm_acc_avx2(const float* a, int64_t ars, int64_t ajs, const float* b, int64_t ldb, int64_t n,
                           int64_t rows, int64_t width, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 16 <= width; col += 16) gemm_rows_avx2<2>(a, ars, ajs, b + col, ldb, n, rows, c + col, ldc);
  for (; col < width; col += 8) gemm_rows_avx2<1>(a, ars, ajs, b + col, ldb, n, rows, c + col, ldc);
}

const bool kHaveAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

bool use_simd() {
  const char* scalar = std::getenv("VELODIFF_LINEAR_ATTENTION_SCALAR");
  const bool allowed = scalar == nullptr || scalar[0] == '\0' || std::strcmp(scalar, "0") == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  return allowed && kHaveAvx2Fma;
#else
  (void)allowed;
  return false;
#endif
}

void phi(bool simd, LinearAttentionKind kind, float* x, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd) return phi_avx2(kind, x, n);
#endif
  (void)simd;
  phi_portable(kind, x, n);
}

void divide(bool simd, float* x, int64_t n, float den) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd) return divide_avx2(x, n, den);
#endif
  (void)simd;
  divide_portable(x, n, den);
}

void gemm_acc(bool simd, const float* a, int64_t ars, int64_t ajs, const float* b, int64_t ldb, int64_t n,
              int64_t rows, int64_t width, float* c, int64_t ldc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd) return gemm_acc_avx2(a, ars, ajs, b, ldb, n, rows, width, c, ldc);
#endif
  (void)simd;
  gemm_acc_portable(a, ars, ajs, b, ldb, n, rows, width, c, ldc);
}

// ---- the two passes ------------------------------------------------------------------------------------------

struct Scratch {
  std::vector<float> k;  // [kTokenTile, D]  phi(K) of a tile
  std::vector<float> v;  // [kTokenTile, W]  [V, 1, 0...] of a tile
  std::vector<float> q;  // [kQueryBlock, D] phi(Q) of a block
  std::vector<float> o;  // [kQueryBlock, W] [num, den, ...]
  Scratch(int64_t d, int64_t w) : k(kTokenTile * d), v(kTokenTile * w), q(kQueryBlock * d), o(kQueryBlock * w) {}
};

// Pass 1: the partial state [D, W] of keys [j0, j1) of (b, h), from zero.
void state_task(const LinearAttentionArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, int64_t W, bool simd,
                Scratch& w, float* state) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim;
  std::fill(state, state + D * W, 0.f);
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  for (int64_t t0 = j0; t0 < j1; t0 += kTokenTile) {
    const int64_t n = std::min(kTokenTile, j1 - t0);
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = t0 + jj;
      load_row(a.dtype, a.k, kbase + j * a.k_stride[2], a.k_stride[3], D, w.k.data() + jj * D);
      float* vrow = w.v.data() + jj * W;
      load_row(a.dtype, a.v, vbase + j * a.v_stride[2], a.v_stride[3], Dv, vrow);
      vrow[Dv] = 1.f;  // the column of z' = sum_j phi(k_j)
      std::fill(vrow + Dv + 1, vrow + W, 0.f);
    }
    phi(simd, a.kind, w.k.data(), n * D);
    // state[d, c] += sum_jj phi(K)[jj, d] V'[jj, c]: A(d, jj) = k[jj * D + d]
    gemm_acc(simd, w.k.data(), 1, D, w.v.data(), W, n, D, W, state, W);
  }
}

// Pass 2: queries [i0, i0 + rows) of (b, h) against the summed state [D, W].
void output_task(const LinearAttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t W, float eps_sum,
                 bool simd, Scratch& w, const float* state) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim;
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r)
    load_row(a.dtype, a.q, qbase + (i0 + r) * a.q_stride[2], a.q_stride[3], D, w.q.data() + r * D);
  phi(simd, a.kind, w.q.data(), rows * D);
  std::fill(w.o.begin(), w.o.begin() + rows * W, 0.f);
  gemm_acc(simd, w.q.data(), D, 1, state, W, D, rows, W, w.o.data(), W);
  const int64_t obase = b * a.out_stride[0] + h * a.out_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = w.o.data() + r * W;
    divide(simd, orow, Dv, orow[Dv] + eps_sum);  // num / (den + eps'), den + eps' >= eps' > 0
    store_row(a.dtype, orow, Dv, a.out, obase + (i0 + r) * a.out_stride[2], a.out_stride[3]);
  }
}

}  // namespace

bool linear_attention_cpu(const LinearAttentionArgs& a, char* error) {
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr) {
    std::snprintf(error, 256, "linear_attention_cpu: q, k, v and out must be non-null");
    return false;
  }
  if (a.batch < 0 || a.heads < 0 || a.q_len < 1 || a.kv_len < 1 || a.head_dim < 1 ||
      a.head_dim > kLinearAttentionMaxHeadDim || a.v_head_dim < 1 || a.v_head_dim > kLinearAttentionMaxHeadDim) {
    std::snprintf(error, 256, "linear_attention_cpu: sizes out of range (Nq, Nk >= 1; D and Dv in 1..%lld)",
                  static_cast<long long>(kLinearAttentionMaxHeadDim));
    return false;
  }
  if (a.kind != LinearAttentionKind::kLinFusion && a.kind != LinearAttentionKind::kRelu) {
    std::snprintf(error, 256, "linear_attention_cpu: unknown kind %d", static_cast<int>(a.kind));
    return false;
  }
  const float eps_sum = linear_attention_eps_sum(a);
  if (!(a.eps > 0.f) || !std::isfinite(a.eps) || !(eps_sum > 0.f) || !std::isfinite(eps_sum)) {
    std::snprintf(error, 256, "linear_attention_cpu: eps must be finite and > 0 (and Nk * eps finite in float32)");
    return false;
  }
  const int64_t BH = a.batch * a.heads, D = a.head_dim, Dv = a.v_head_dim, Nq = a.q_len, Nk = a.kv_len;
  if (BH == 0) return true;
  const int64_t W = linear_attention_cpu_width(Dv);
  const int64_t P = linear_attention_cpu_chunks(BH, Nk, D, Dv);
  const int64_t chunk = (Nk + P - 1) / P;
  const int64_t qblocks = (Nq + kQueryBlock - 1) / kQueryBlock;
  std::vector<float> states(static_cast<size_t>(BH * P * D * W));
  const bool simd = use_simd();
  const double work = static_cast<double>(BH) * static_cast<double>(Nk + Nq) * static_cast<double>(D * W);
#pragma omp parallel if (work >= kParallelMin)
  {
    Scratch w(D, W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < BH * P; ++t) {
      const int64_t bh = t / P, p = t % P;
      const int64_t j0 = std::min(Nk, p * chunk), j1 = std::min(Nk, j0 + chunk);
      state_task(a, bh / a.heads, bh % a.heads, j0, j1, W, simd, w, states.data() + t * D * W);
    }
    if (P > 1) {
      // the partials of (b, h) in chunk order, into the first: S = ((S_0 + S_1) + S_2) + ...
#pragma omp for schedule(static)
      for (int64_t t = 0; t < BH * D; ++t) {
        const int64_t bh = t / D, d = t % D;
        float* dst = states.data() + (bh * P * D + d) * W;
        for (int64_t p = 1; p < P; ++p) {
          const float* src = dst + p * D * W;
          for (int64_t c = 0; c < W; ++c) dst[c] = dst[c] + src[c];
        }
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < BH * qblocks; ++t) {
      const int64_t bh = t / qblocks, i0 = (t % qblocks) * kQueryBlock;
      output_task(a, bh / a.heads, bh % a.heads, i0, std::min(kQueryBlock, Nq - i0), W, eps_sum, simd, w,
                  states.data() + bh * P * D * W);
    }
  }
  return true;
}

const char* linear_attention_cpu_path() { return use_simd() ? "avx2" : "portable"; }

}  // namespace velodiff
