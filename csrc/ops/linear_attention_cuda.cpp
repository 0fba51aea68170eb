// CUDA implementation of velodiff::linear_attention (torch glue over csrc/kernels/cuda/linear_attention.cu). No host
// sync: the fp32 workspace for the partial and summed states comes from torch's caching allocator.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "linear_attention_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

at::Tensor linear_attention_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    c10::string_view kind, std::optional<double> eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out;
  const LinearAttentionArgs a = prepare_linear_attention(q, k, v, std::string(kind), eps, out);
  if (out.numel() == 0) return out;
  const int64_t floats = linear_attention_cuda_workspace_floats(a.batch * a.heads, a.kv_len, a.head_dim, a.v_head_dim);
  at::Tensor workspace = at::empty({floats}, q.options().dtype(at::kFloat));
  const int err = linear_attention_cuda(a, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "linear_attention: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) { m.impl("linear_attention", &linear_attention_cuda_op); }

}  // namespace velodiff
