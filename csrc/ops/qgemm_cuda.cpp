// CUDA implementation of velodiff::quantize_act and velodiff::qgemm (torch glue over csrc/kernels/cuda/qgemm.cu).
// Argument checks and output allocation are shared with the CPU glue (qgemm_args.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>

#include "qgemm_args.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

// The GEMM loads the packed operands with 16-byte cp.async; fresh CUDA allocations always qualify, a view of a
// byte buffer at an odd offset gets an aligned copy.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda_op(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& smooth,
                                                                    const std::optional<at::Tensor>& lora_down,
                                                                    int64_t bits) {
  TORCH_CHECK_VALUE(x.is_cuda(), "quantize_act: x is on ", x.device(), " but other arguments are on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor qx, ascales, lora_act;
  // lora_act is zero-filled: the kernel adds partial down projections over K blocks atomically.
  const QuantizeActArgs a =
      prepare_quantize_act(x, smooth, lora_down, bits, /*zero_lora_act=*/true, qx, ascales, lora_act);
  check_launch("quantize_act", quantize_act_cuda(a, c10::cuda::getCurrentCUDAStream().stream()));
  return {qx, ascales, lora_act};
}

at::Tensor qgemm_cuda_op(const at::Tensor& qx, const at::Tensor& ascales, const at::Tensor& qw,
                         const at::Tensor& wscales, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& lora_act, const std::optional<at::Tensor>& lora_up,
                         const std::optional<at::Tensor>& lora_scales, int64_t bits, int64_t activation) {
  TORCH_CHECK_VALUE(qx.is_cuda(), "qgemm: qx is on ", qx.device(), " but other arguments are on CUDA");
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Tensor qx16 = aligned16(qx), qw16 = aligned16(qw);
  at::Tensor y;
  const QGemmArgs a =
      prepare_qgemm(qx16, ascales, qw16, wscales, bias, lora_act, lora_up, lora_scales, bits, activation, y);
  check_launch("qgemm", qgemm_cuda(a, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) {
  m.impl("quantize_act", &quantize_act_cuda_op);
  m.impl("qgemm", &qgemm_cuda_op);
}

}  // namespace velodiff
