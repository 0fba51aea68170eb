// CUDA implementation of velodiff::quantize_fp8, velodiff::fp8_gemm and velodiff::fp8_attention (torch glue over
// csrc/kernels/cuda/fp8.cu and fp8_attention.cu). Argument checks and output allocation are shared with the CPU glue
// (fp8_args.h, attention_args.h); fp8_attention's workspace comes from torch's caching allocator.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

#include "attention_args.h"
#include "fp8_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda_op(const at::Tensor& x, c10::string_view format) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes, scales;
  const QuantizeFp8Args a = prepare_quantize_fp8(x, std::string(format), codes, scales);
  check_launch("quantize_fp8", quantize_fp8_cuda(a, c10::cuda::getCurrentCUDAStream().stream()));
  return {codes, scales};
}

at::Tensor fp8_gemm_cuda_op(const at::Tensor& a, const at::Tensor& ascales, const at::Tensor& w,
                            const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype, int64_t activation,
                            const std::optional<at::Tensor>& w_table) {
  TORCH_CHECK_VALUE(a.is_cuda(), "fp8_gemm: a is on ", a.device(), " but other arguments are on CUDA");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor y;
  const Fp8GemmArgs g = prepare_fp8_gemm(a, ascales, w, wscales, bias, out_dtype, activation, w_table, y);
  check_launch("fp8_gemm", fp8_gemm_cuda(g, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor fp8_attention_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_padding_mask, std::optional<double> scale) {
  TORCH_CHECK_VALUE(q.is_cuda(), "fp8_attention: q is on ", q.device(), " but other arguments are on CUDA");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out;
  const AttentionArgs a = prepare_attention(q, k, v, key_padding_mask, scale, out, "fp8_attention");
  if (out.numel() == 0) return out;
  at::Tensor workspace = at::empty({fp8_attention_cuda_workspace_floats(a.batch * a.heads, a.q_len, a.kv_len,
                                                                        a.head_dim, a.v_head_dim)},
                                   q.options().dtype(at::kFloat));
  check_launch("fp8_attention",
               fp8_attention_cuda(a, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) {
  m.impl("fp8_attention", &fp8_attention_cuda_op);
  m.impl("quantize_fp8", &quantize_fp8_cuda_op);
  m.impl("fp8_gemm", &fp8_gemm_cuda_op);
}

}  // namespace velodiff
