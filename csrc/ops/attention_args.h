// Torch glue shared by the CPU and CUDA implementations of velodiff::attention: checks every argument (naming it
// in the error: TypeError for a wrong dtype, ValueError otherwise), allocates the output and fills the torch-free
// AttentionArgs (format in csrc/include/velodiff/attention.h).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "velodiff/attention.h"
#include "qkv_args.h"

namespace velodiff {

inline AttnDType attn_dtype_of(const at::Tensor& q, const char* op = "attention") {
  switch (q.scalar_type()) {
    case at::kFloat: return AttnDType::kFloat32;
    case at::kHalf: return AttnDType::kFloat16;
    case at::kBFloat16: return AttnDType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return AttnDType::kFloat32;
}

// Checks all arguments, allocates `out` ([B, H, Lq, Dv] in q's dtype, [B, Lq, H, Dv] memory) and returns the args.
// `op` starts every error message (velodiff::window_attention checks its q, k, v and scale here too).
inline AttentionArgs prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& mask, std::optional<double> scale,
                                       at::Tensor& out, const char* op = "attention") {
  const AttnDType dtype = attn_dtype_of(q, op);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(),
                   ", got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype ", q.scalar_type(),
                   ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, H, Lq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be [B, H, Lk, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": v must be [B, H, Lk, Dv], got shape ", v.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), op, ": v is on ", v.device(), " but q is on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kAttentionMaxHeadDim, op, ": q's head dim ", D,
                    " is not supported: the kernel takes any head dim from 1 to ", kAttentionMaxHeadDim,
                    " (e.g. 40, 64, 72, 80, 96, 128, 160)");
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == D, op, ": k must be [B, H, Lk, D] = [",
                    B, ", ", H, ", Lk, ", D, "] (q's batch, heads and head dim), got ", k.sizes());
  TORCH_CHECK_VALUE(Lk >= 1, op, ": k must have at least one key (Lk >= 1), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == H && v.size(2) == Lk, op, ": v must be [B, H, Lk, Dv] = [",
                    B, ", ", H, ", ", Lk, ", Dv] (k's batch, heads and keys), got ", v.sizes());
  TORCH_CHECK_VALUE(Dv >= 1 && Dv <= kAttentionMaxHeadDim, op, ": v's head dim ", Dv,
                    " is not supported: the kernel takes any head dim from 1 to ", kAttentionMaxHeadDim);
  const uint8_t* mask_ptr = nullptr;
  int64_t mask_stride[2] = {0, 0};
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = attend), got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                      op, ": key_padding_mask must be [B, Lk] = [", B, ", ", Lk, "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": key_padding_mask is on ", m.device(), " but q is on ",
                      q.device());
    mask_ptr = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    mask_stride[0] = m.stride(0);
    mask_stride[1] = m.stride(1);
  }
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0 && std::isfinite(static_cast<float>(s)) &&
                        static_cast<float>(s) > 0.f,
                    op, ": scale must be a finite number > 0 (in float32 range), got ", s);

  out = at::empty({B, Lq, H, Dv}, q.options()).permute({0, 2, 1, 3});
  AttentionArgs a;
  fill_qkv_out(a, q, k, v, out);
  a.mask = mask_ptr;
  a.dtype = dtype;
  a.batch = B;
  a.heads = H;
  a.q_len = Lq;
  a.kv_len = Lk;
  a.head_dim = D;
  a.v_head_dim = Dv;
  a.mask_stride[0] = mask_stride[0];
  a.mask_stride[1] = mask_stride[1];
  a.scale = static_cast<float>(s);
  return a;
}

}  // namespace velodiff
