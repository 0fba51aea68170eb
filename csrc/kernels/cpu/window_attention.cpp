// CPU kernel of windowed attention (MSW-MSA). Semantics: csrc/include/velodiff/window_attention.h.
//
// The windows are index arithmetic: the kernel lists, once per call, the token of every real window slot (window-
// major, each window's real tokens in local row-major order: L int64 indices in all, every token once), and the
// tasks read q, k and v at those tokens through their strides and write out at the same tokens. No partition or
// reverse copy of the data is made, and padding slots never enter a list.
//
// Tasks: (b, h, window, block of kQueryBlock of the window's queries), an OpenMP loop over them in that order. Each
// task runs the tile routine of exact attention, flash_rows (csrc/kernels/cpu/flash_tile.h: online softmax, the
// vector paths and the bit-identical portable one), with the window's real tokens as the key list. A thread packs a
// window's keys (fp32 tiles, KeyCache) when it first meets the window and reuses them for the window's next query
// blocks that it takes (the tasks of one window run back to back): the window's K and V, read through the input's
// strides (the models' [B, L, H, D] views scatter a window over the whole map), are read about once per thread
// instead of once per query block. Either way the values and so the bits are the same, for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "flash_tile.h"
#include "velodiff/kernels.h"
#include "velodiff/window_attention.h"

namespace velodiff {
namespace {

bool check(const WindowAttentionArgs& wa, char* error) {
  const AttentionArgs& a = wa.attn;
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr) {
    std::snprintf(error, 256, "window_attention_cpu: q, k, v and out must be non-null");
    return false;
  }
  if (a.batch < 0 || a.heads < 0 || a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.v_head_dim < 1 ||
      a.v_head_dim > kAttentionMaxHeadDim) {
    std::snprintf(error, 256, "window_attention_cpu: sizes out of range (D and Dv must be in 1..%lld)",
                  static_cast<long long>(kAttentionMaxHeadDim));
    return false;
  }
  if (wa.height < 1 || wa.width < 1 || a.q_len != wa.height * wa.width || a.kv_len != a.q_len) {
    std::snprintf(error, 256, "window_attention_cpu: size must be h, w >= 1 with h * w = L = q_len = kv_len");
    return false;
  }
  if (wa.window_h < 1 || wa.window_h > wa.height || wa.window_w < 1 || wa.window_w > wa.width) {
    std::snprintf(error, 256, "window_attention_cpu: window must be 1 <= Wh <= h and 1 <= Ww <= w");
    return false;
  }
  if (wa.shift_y < 0 || wa.shift_y >= wa.height || wa.shift_x < 0 || wa.shift_x >= wa.width) {
    std::snprintf(error, 256, "window_attention_cpu: shift must be reduced: 0 <= sy < h and 0 <= sx < w");
    return false;
  }
  if (a.mask != nullptr) {
    std::snprintf(error, 256, "window_attention_cpu: takes no key-padding mask");
    return false;
  }
  if (!(a.scale > 0.f) || !std::isfinite(a.scale)) {
    std::snprintf(error, 256, "window_attention_cpu: scale must be finite and > 0");
    return false;
  }
  return true;
}

// The windows' token lists (window_attention_cpu).
struct Windows {
  const std::vector<int64_t>& tokens;       // the real tokens of window n: tokens[start[n] .. start[n + 1])
  const std::vector<int64_t>& start;
  const std::vector<int64_t>& first_block;  // the index of window n's first query block among a (b, h)'s blocks
  int64_t count;
};

// Every (b, h, window, query block) task, operand format T.
template <class T>
void run_tasks(const AttentionArgs& a, const Windows& wl, double work, flash_cpu::Isa isa) {
  using namespace flash_cpu;
  const int64_t H = a.heads, windows = wl.count;
  const int64_t blocks = wl.first_block[windows];  // query blocks per (b, h)
  const int64_t tasks = a.batch * H * blocks;
#pragma omp parallel if (work >= kParallelMin && tasks > 1)
  {
    Scratch<T> w(a.head_dim, a.v_head_dim);
    KeyCache<T> cache;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / blocks, block = t % blocks;
      const int64_t b = bh / H, h = bh % H;
      // the window holding this block: the last n with first_block[n] <= block
      const int64_t n =
          std::upper_bound(wl.first_block.begin(), wl.first_block.end(), block) - wl.first_block.begin() - 1;
      const int64_t* win = wl.tokens.data() + wl.start[n];
      const int64_t count = wl.start[n + 1] - wl.start[n];
      const int64_t i0 = (block - wl.first_block[n]) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, count - i0);
      // one query block: pack tile by tile; more: the thread packs the window's keys once
      const T* packed = count > kQueryBlock ? cache.get(a, b, h, win, count, w.dv8, bh * windows + n) : nullptr;
      flash_rows<T>(a, b, h, win + i0, 0, rows, win, count, isa, w, packed);
    }
  }
}

}  // namespace

bool window_attention_cpu(const WindowAttentionArgs& wa, char* error) {
  if (!check(wa, error)) return false;
  using namespace flash_cpu;
  const AttentionArgs& a = wa.attn;
  const int64_t B = a.batch, H = a.heads;
  if (B == 0 || H == 0) return true;
  const int64_t nh = window_grid(wa.height, wa.window_h), nw = window_grid(wa.width, wa.window_w);
  const int64_t windows = nh * nw;
  // tokens[start[n] .. start[n + 1]): the real tokens of window n = wy * nw + wx, in local row-major order;
  // first_block[n]: the index of its first query block among the (b, h)'s blocks.
  std::vector<int64_t> tokens(static_cast<size_t>(a.q_len)), start(static_cast<size_t>(windows + 1), 0),
      first_block(static_cast<size_t>(windows + 1), 0);
  double work = 0.0;
  for (int64_t n = 0, t = 0; n < windows; ++n) {
    const int64_t wy = n / nw, wx = n % nw;
    const int64_t rows = window_real(wy, wa.window_h, wa.height), cols = window_real(wx, wa.window_w, wa.width);
    for (int64_t ly = 0; ly < rows; ++ly)
      for (int64_t lx = 0; lx < cols; ++lx) tokens[t++] = window_token(wa, wy, wx, ly, lx);
    start[n + 1] = t;
    first_block[n + 1] = first_block[n] + (rows * cols + kQueryBlock - 1) / kQueryBlock;
    work += static_cast<double>(rows * cols) * (rows * cols + 1);
  }
  work *= static_cast<double>(B * H) * (a.head_dim + a.v_head_dim);
  Isa isa;
  if (!select_attention_isa(isa, error)) return false;
  const Windows layout{tokens, start, first_block, windows};
  if (a.dtype == AttnDType::kBFloat16)
    run_tasks<uint32_t>(a, layout, work, isa);  // bf16 pairs (flash_tile.h)
  else
    run_tasks<float>(a, layout, work, isa);
  return true;
}

}  // namespace velodiff
