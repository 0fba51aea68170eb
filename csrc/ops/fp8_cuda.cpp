// CUDA implementation of velodiff::quantize_fp8 and velodiff::fp8_gemm (torch glue over
// csrc/kernels/cuda/fp8.cu). Argument checks and output allocation are shared with the CPU glue (fp8_args.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

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

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) {
  m.impl("quantize_fp8", &quantize_fp8_cuda_op);
  m.impl("fp8_gemm", &fp8_gemm_cuda_op);
}

}  // namespace velodiff
