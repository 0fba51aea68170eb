// Torch glue shared by the CPU and CUDA implementations of velodiff::window_attention: checks every argument
// (naming it in the error: TypeError for a wrong dtype, ValueError otherwise; q, k, v and scale through
// velodiff::attention's checks), allocates the output and fills the torch-free WindowAttentionArgs (format in
// csrc/include/velodiff/window_attention.h).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

#include "attention_args.h"
#include "velodiff/window_attention.h"

namespace velodiff {

// Checks all arguments, allocates `out` ([B, H, L, Dv] in q's dtype, [B, L, H, Dv] memory) and returns the args,
// the shift reduced mod (h, w).
inline WindowAttentionArgs prepare_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    c10::IntArrayRef size, c10::IntArrayRef window,
                                                    c10::IntArrayRef shift, std::optional<double> scale,
                                                    at::Tensor& out) {
  WindowAttentionArgs wa;
  wa.attn = prepare_attention(q, k, v, std::nullopt, scale, out, "window_attention");
  const int64_t L = q.size(2);
  TORCH_CHECK_VALUE(k.size(2) == L, "window_attention: k and v must have q's L = ", L,
                    " tokens (self-attention over one map), got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(size.size() == 2, "window_attention: size must be (h, w), got ", size);
  TORCH_CHECK_VALUE(size[0] >= 1 && size[1] >= 1 && size[0] * size[1] == L, "window_attention: size ", size,
                    " must be positive with h * w = L = ", L, " tokens");
  TORCH_CHECK_VALUE(window.size() == 2, "window_attention: window must be (Wh, Ww), got ", window);
  TORCH_CHECK_VALUE(window[0] >= 1 && window[1] >= 1, "window_attention: window ", window,
                    " must have at least one row and one column");
  TORCH_CHECK_VALUE(window[0] <= size[0] && window[1] <= size[1], "window_attention: window ", window,
                    " is larger than the image: size (h, w) = ", size, " (need Wh <= h and Ww <= w)");
  TORCH_CHECK_VALUE(shift.size() == 2, "window_attention: shift must be (sy, sx), got ", shift);
  TORCH_CHECK_VALUE(shift[0] >= 0 && shift[1] >= 0, "window_attention: shift ", shift,
                    " must be >= 0 (a cyclic shift, taken mod h, w)");
  wa.height = size[0];
  wa.width = size[1];
  wa.window_h = window[0];
  wa.window_w = window[1];
  wa.shift_y = shift[0] % size[0];
  wa.shift_x = shift[1] % size[1];
  return wa;
}

}  // namespace velodiff
