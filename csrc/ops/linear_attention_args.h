// Torch glue shared by the CPU and CUDA implementations of velodiff::linear_attention: checks every argument (naming
// it in the error: TypeError for a wrong dtype, ValueError otherwise), allocates the output and fills the torch-free
// LinearAttentionArgs (format in csrc/include/velodiff/linear_attention.h).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "velodiff/linear_attention.h"
#include "qkv_args.h"

namespace velodiff {

// The defaults of eps per kind (the Python wrapper documents them): LinFusion's 1e-4 on the mean-normalised
// denominator; 1e-8, what SANA's SanaMSBlock passes to LiteLA.
constexpr double kLinFusionDefaultEps = 1e-4;
constexpr double kReluDefaultEps = 1e-8;

inline LinearAttentionKind linear_attention_kind_of(const std::string& kind) {
  if (kind == "linfusion") return LinearAttentionKind::kLinFusion;
  if (kind == "relu") return LinearAttentionKind::kRelu;
  TORCH_CHECK_VALUE(false, "linear_attention: kind must be 'linfusion' or 'relu', got '", kind, "'");
  return LinearAttentionKind::kLinFusion;
}

// Checks all arguments, allocates `out` ([B, H, Nq, Dv] in q's dtype, [B, Nq, H, Dv] memory) and returns the args.
inline LinearAttentionArgs prepare_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::string& kind, std::optional<double> eps,
                                                    at::Tensor& out) {
  AttnDType dtype = AttnDType::kFloat32;
  switch (q.scalar_type()) {
    case at::kFloat: dtype = AttnDType::kFloat32; break;
    case at::kHalf: dtype = AttnDType::kFloat16; break;
    case at::kBFloat16: dtype = AttnDType::kBFloat16; break;
    default:
      TORCH_CHECK_TYPE(false, "linear_attention: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "linear_attention: k must have q's dtype ", q.scalar_type(),
                   ", got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "linear_attention: v must have q's dtype ", q.scalar_type(),
                   ", got ", v.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4, "linear_attention: q must be [B, H, Nq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "linear_attention: k must be [B, H, Nk, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "linear_attention: v must be [B, H, Nk, Dv], got shape ", v.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), "linear_attention: k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), "linear_attention: v is on ", v.device(), " but q is on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2), Dv = v.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kLinearAttentionMaxHeadDim, "linear_attention: q's head dim ", D,
                    " is not supported: the kernel takes any head dim from 1 to ", kLinearAttentionMaxHeadDim);
  TORCH_CHECK_VALUE(Nq >= 1, "linear_attention: q must have at least one query (Nq >= 1), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == D,
                    "linear_attention: k must be [B, H, Nk, D] = [", B, ", ", H, ", Nk, ", D,
                    "] (q's batch, heads and head dim), got ", k.sizes());
  TORCH_CHECK_VALUE(Nk >= 1, "linear_attention: k must have at least one key (Nk >= 1), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == H && v.size(2) == Nk,
                    "linear_attention: v must be [B, H, Nk, Dv] = [", B, ", ", H, ", ", Nk,
                    ", Dv] (k's batch, heads and keys), got ", v.sizes());
  TORCH_CHECK_VALUE(Dv >= 1 && Dv <= kLinearAttentionMaxHeadDim, "linear_attention: v's head dim ", Dv,
                    " is not supported: the kernel takes any head dim from 1 to ", kLinearAttentionMaxHeadDim);
  const LinearAttentionKind k_kind = linear_attention_kind_of(kind);
  const double e = eps.has_value() ? *eps
                                   : (k_kind == LinearAttentionKind::kLinFusion ? kLinFusionDefaultEps : kReluDefaultEps);
  const double e_sum = k_kind == LinearAttentionKind::kLinFusion ? e * static_cast<double>(Nk) : e;
  TORCH_CHECK_VALUE(std::isfinite(e) && e > 0.0 && static_cast<float>(e) > 0.f &&
                        std::isfinite(static_cast<float>(e)) && std::isfinite(static_cast<float>(e_sum)),
                    "linear_attention: eps must be a finite number > 0 (in float32 range, Nk * eps too for "
                    "'linfusion'), got ", e);

  out = at::empty({B, Nq, H, Dv}, q.options()).permute({0, 2, 1, 3});
  LinearAttentionArgs a;
  fill_qkv_out(a, q, k, v, out);
  a.dtype = dtype;
  a.kind = k_kind;
  a.batch = B;
  a.heads = H;
  a.q_len = Nq;
  a.kv_len = Nk;
  a.head_dim = D;
  a.v_head_dim = Dv;
  a.eps = static_cast<float>(e);
  return a;
}

}  // namespace velodiff
