// velodiff windowed attention (HiDiffusion's MSW-MSA, Zhang et al., ECCV 2024, arXiv 2311.17528, section 3.3): the
// one format shared by the reference (python/velodiff/ops/reference.py window_attention), the CPU kernel
// (csrc/kernels/cpu/window_attention.cpp) and the CUDA kernel (csrc/kernels/cuda/window_attention.cu).
//
//   inputs (any strides, in elements; B batch, H heads, L = h * w tokens of an h x w map in row-major order)
//     q     [B, H, L, D]     fp32 | fp16 | bf16
//     k     [B, H, L, D]     q's dtype
//     v     [B, H, L, Dv]    q's dtype
//     size   (h, w)          h, w >= 1, h * w = L
//     window (Wh, Ww)        1 <= Wh <= h, 1 <= Ww <= w: window rows and columns
//     shift  (sy, sx)        0 <= sy < h, 0 <= sx < w: the cyclic shift (the glue reduces any shift >= 0 mod h, w)
//     scale                  finite float > 0 (the wrapper's default is 1 / sqrt(D))
//   output
//     out   [B, H, L, Dv]    q's dtype, stored as [B, L, H, Dv] memory (as velodiff::attention's)
//
//   windows: a grid of nh x nw windows, nh = ceil(h / Wh), nw = ceil(w / Ww). Window slot (wy, wx, ly, lx),
//   0 <= ly < Wh, 0 <= lx < Ww, holds token
//       T(wy, wx, ly, lx) = ((wy*Wh + ly + sy) mod h) * w + ((wx*Ww + lx + sx) mod w)
//   (the map rolled by -shift, then cut into windows: the paper's section 3.3, with no Swin mask, so wrapped border
//   tokens share a window). A slot with wy*Wh + ly >= h or wx*Ww + lx >= w lies past the map's edge: it is padding,
//   neither a key nor a query. So window (wy, wx) holds the R x C real tokens ly < R = min(Wh, h - wy*Wh),
//   lx < C = min(Ww, w - wx*Ww), every token lies in exactly one window, and
//
//   semantics, per (b, h, window W, query token i in W):
//     out_i = sum_{j in W} exp(s_j - max_W s) v_j / sum_{j in W} exp(s_j - max_W s),   s_j = scale * (q_i . k_j)
//
//   i.e. exact attention (velodiff/attention.h) of each window's real tokens among themselves. Both kernels compute
//   it flash-style with the arithmetic of velodiff::attention (same online softmax, fp32 accumulation, one rounding
//   of the output), walking each window's real tokens in local row-major order (ly, then lx) as the key list. A
//   window that is the whole map with no shift is therefore exact attention over the tokens in their own order:
//   the CPU kernel gives velodiff::attention's bits there.
//
//   Supported: 1 <= D, Dv <= 512 (kAttentionMaxHeadDim), any B, H >= 0 and h, w >= 1.
#pragma once

#include <cstdint>

#include "velodiff/attention.h"  // AttentionArgs, AttnDType, kAttentionMaxHeadDim, the CUDA block layout

namespace velodiff {

// One call. `attn` holds the tensors, dtype, sizes, strides and scale in velodiff::attention's format with
// q_len = kv_len = height * width and mask = nullptr; the fields below give the windows.
struct WindowAttentionArgs {
  AttentionArgs attn;
  int64_t height = 0, width = 0;        // the token map (h, w)
  int64_t window_h = 0, window_w = 0;   // (Wh, Ww)
  int64_t shift_y = 0, shift_x = 0;     // (sy, sx), already reduced: 0 <= sy < h, 0 <= sx < w
};

// ceil(extent / window): windows along one axis.
VELODIFF_HD int64_t window_grid(int64_t extent, int64_t window) { return (extent + window - 1) / window; }

// Real rows (or columns) of window row (column) `index`: min(window, extent - index * window).
VELODIFF_HD int64_t window_real(int64_t index, int64_t window, int64_t extent) {
  const int64_t left = extent - index * window;
  return left < window ? left : window;
}

// Map coordinate of slot coordinate `slot` = wy*Wh + ly (< extent) under shift 0 <= shift < extent:
// (slot + shift) mod extent, without a division.
VELODIFF_HD int64_t window_source(int64_t slot, int64_t shift, int64_t extent) {
  const int64_t s = slot + shift;
  return s >= extent ? s - extent : s;
}

// The token T(wy, wx, ly, lx) of the header (for a real slot).
VELODIFF_HD int64_t window_token(const WindowAttentionArgs& a, int64_t wy, int64_t wx, int64_t ly, int64_t lx) {
  return window_source(wy * a.window_h + ly, a.shift_y, a.height) * a.width +
         window_source(wx * a.window_w + lx, a.shift_x, a.width);
}

}  // namespace velodiff
