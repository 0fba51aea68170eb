// CPU kernel of velodiff::fp8_attention (semantics in velodiff/fp8.h).
//
// Tasks: (b, h, block of kQueryBlock queries), an OpenMP loop over all of them. A task quantizes the keys of its
// (b, h) (K per row, V per channel; decoded codes kept as float32, exact) and then, per query: its codes, every
// attended key's logit (dot products in 8 fixed partial sums, which the compiler vectorises without reassociating),
// the row max, exp, P's codes, and the P V accumulation (an axpy per key). Two passes over the keys: the logits are
// kept in a row buffer, so the max is the whole row's before any P is quantized. The result of a task depends on
// nothing but its inputs: any thread count gives the same bits.
//
// Simple and correct first: on a CPU, FP8 is only a number format (no FP8 arithmetic units), so this runs slower
// than velodiff::attention; its purpose here is the FP8 backend's exact semantics at any size (the CUDA kernel is
// the one meant to be fast, with tensor cores, once a GPU measures it).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "elem_io.h"
#include "attended_keys.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

constexpr int64_t kQueryBlock = 32;
constexpr float kP = 448.f;  // P's fixed scale is 1 / 448

inline float load(const AttentionArgs& a, const void* base, int64_t i) {
  return elem_io::load_elem(static_cast<QDtype>(a.dtype), base, i);
}

// n elements from base[offset + i * step] quantized as one row (e4m3, the quantize_fp8 rule): decoded codes into
// out[0..n), the scale returned.
float quantize_row(const AttentionArgs& a, const void* base, int64_t offset, int64_t step, int64_t n, float* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(load(a, base, offset + i * step));
    amax = (v > amax || v != v) && amax == amax ? v : amax;  // a NaN, once seen, stays
  }
  const float s = amax / fp8_max(Fp8Format::kE4M3);
  for (int64_t i = 0; i < n; ++i)
    out[i] = s == 0.f ? 0.f : decode_fp8(encode_fp8(load(a, base, offset + i * step) / s, Fp8Format::kE4M3),
                                          Fp8Format::kE4M3);
  return s;
}

inline float dot8(const float* x, const float* y, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[d + l] * y[d + l];
  for (int l = 0; d < n; ++d, ++l) part[l] += x[d] * y[d];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

struct Workspace {
  std::vector<float> k, ks, v, vs, q, t, acc;
  int64_t bh = -1;  // the (b, h) whose keys are quantized in k, ks, v, vs
};

void quantize_keys(const AttentionArgs& a, int64_t b, int64_t h, Workspace& w) {
  const int64_t Lk = a.kv_len, D = a.head_dim, Dv = a.v_head_dim;
  w.k.resize(static_cast<size_t>(Lk * D));
  w.ks.resize(static_cast<size_t>(Lk));
  w.v.resize(static_cast<size_t>(Lk * Dv));
  w.vs.resize(static_cast<size_t>(Dv));
  const int64_t kb = b * a.k_stride[0] + h * a.k_stride[1], vb = b * a.v_stride[0] + h * a.v_stride[1];
  for (int64_t j = 0; j < Lk; ++j)
    w.ks[j] = quantize_row(a, a.k, kb + j * a.k_stride[2], a.k_stride[3], D, w.k.data() + j * D);
  std::vector<float> column(static_cast<size_t>(Lk));
  for (int64_t c = 0; c < Dv; ++c) {
    w.vs[c] = quantize_row(a, a.v, vb + c * a.v_stride[3], a.v_stride[2], Lk, column.data());
    for (int64_t j = 0; j < Lk; ++j) w.v[j * Dv + c] = column[j];
  }
}

// Queries [i0, i0 + rows) of (b, h); `attended`: the key indices (count n), or null for all Lk keys.
void run_queries(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t rows, const int64_t* attended,
                 int64_t n, Workspace& w) {
  const int64_t D = a.head_dim, Dv = a.v_head_dim;
  w.q.resize(static_cast<size_t>(D));
  w.t.resize(static_cast<size_t>(a.kv_len));
  w.acc.resize(static_cast<size_t>(Dv));
  const QDtype dt = static_cast<QDtype>(a.dtype);
  for (int64_t i = i0; i < i0 + rows; ++i) {
    const int64_t ob = b * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
    if (n == 0) {
      for (int64_t c = 0; c < Dv; ++c) elem_io::store_elem(dt, a.out, ob + c * a.out_stride[3], 0.f);
      continue;
    }
    const float sq = quantize_row(a, a.q, b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2], a.q_stride[3], D,
                                  w.q.data());
    float m = -INFINITY;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t j = attended ? attended[r] : r;
      w.t[r] = dot8(w.q.data(), w.k.data() + j * D, D) * (sq * w.ks[j]) * a.scale;
      m = std::max(m, w.t[r]);
    }
    std::fill(w.acc.begin(), w.acc.end(), 0.f);
    float l = 0.f;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t j = attended ? attended[r] : r;
      const float p = std::exp(w.t[r] - m);
      l += p;
      const float pq = decode_fp8(encode_fp8(kP * p, Fp8Format::kE4M3), Fp8Format::kE4M3);
      const float* vj = w.v.data() + j * Dv;
      for (int64_t c = 0; c < Dv; ++c) w.acc[c] += pq * vj[c];
    }
    for (int64_t c = 0; c < Dv; ++c)
      elem_io::store_elem(dt, a.out, ob + c * a.out_stride[3], w.acc[c] * (w.vs[c] / (kP * l)));
  }
}

}  // namespace

bool fp8_attention_cpu(const AttentionArgs& a, char* error) {
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr) {
    std::snprintf(error, 256, "fp8_attention_cpu: q, k, v and out must be non-null");
    return false;
  }
  if (a.batch < 0 || a.heads < 0 || a.q_len < 0 || a.kv_len < 1 || a.head_dim < 1 || a.v_head_dim < 1) {
    std::snprintf(error, 256, "fp8_attention_cpu: sizes out of range");
    return false;
  }
  const int64_t B = a.batch, H = a.heads, Lq = a.q_len, Lk = a.kv_len;
  if (B == 0 || H == 0 || Lq == 0) return true;
  std::vector<int64_t> keys, counts;  // the attended keys of each batch (attended_keys.h)
  attended_keys(a, keys, counts);
  const int64_t qblocks = (Lq + kQueryBlock - 1) / kQueryBlock, tasks = B * H * qblocks;
#pragma omp parallel if (tasks > 1)
  {
    Workspace w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / qblocks, i0 = (t % qblocks) * kQueryBlock, b = bh / H, h = bh % H;
      if (w.bh != bh) {
        quantize_keys(a, b, h, w);
        w.bh = bh;
      }
      run_queries(a, b, h, i0, std::min(kQueryBlock, Lq - i0), keys.empty() ? nullptr : keys.data() + b * Lk,
                  counts[b], w);
    }
  }
  return true;
}

}  // namespace velodiff
