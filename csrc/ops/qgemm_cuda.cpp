// CUDA implementation of velodiff::quantize_act and velodiff::qgemm (torch glue over the kernels of
// csrc/kernels/cuda/quantize_act.cu and qgemm*.cu, listed in qgemm_device.cuh).
// Argument checks and output allocation are shared with the CPU glue (qgemm_args.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
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

// The tensor-core path of 4-bit GEMMs from VELODIFF_QGEMM_TC (auto, s4, s8, e4m3, wgmma-s8, wgmma-e4m3; see
// QTensorPath in velodiff/qgemm.h), checked against the current device and the build. Read on every call so a
// benchmark can switch it.
QTensorPath tensor_path_from_env(int& wgmma_rows) {
  const char* e = std::getenv("VELODIFF_QGEMM_TC");
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return QTensorPath::kAuto;
  int device = 0, major = 0, minor = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess,
              "qgemm: cannot read the compute capability of the current CUDA device");
  const int cc = major * 10 + minor;
  if (std::strcmp(e, "s8") == 0) return QTensorPath::kS8;
  if (std::strcmp(e, "s4") == 0) {
    TORCH_CHECK_VALUE(cc < 90, "VELODIFF_QGEMM_TC=s4: this GPU (sm_", cc,
                      ") has no int4 tensor cores; use s8 or e4m3, or unset it");
    return QTensorPath::kS4;
  }
  if (std::strcmp(e, "e4m3") == 0) {
    TORCH_CHECK_VALUE(cc >= 89, "VELODIFF_QGEMM_TC=e4m3 needs FP8 tensor cores (sm_89 or later); this GPU is sm_",
                      cc, "; use s4 or s8, or unset it");
    return QTensorPath::kE4M3;
  }
  // wgmma-s8 / wgmma-e4m3, optionally with the CTA rows: -64 (the default) or -128.
  const bool wg_s8 = std::strncmp(e, "wgmma-s8", 8) == 0, wg_e4m3 = std::strncmp(e, "wgmma-e4m3", 10) == 0;
  const char* rows = e + (wg_s8 ? 8 : wg_e4m3 ? 10 : 0);
  const bool rows_ok = *rows == 0 || std::strcmp(rows, "-64") == 0 || std::strcmp(rows, "-128") == 0;
  if ((wg_s8 || wg_e4m3) && rows_ok) {
    wgmma_rows = std::strcmp(rows, "-128") == 0 ? 128 : 64;
    const char* others = cc < 89 ? "s4 or s8" : cc < 90 ? "s4, s8 or e4m3" : "s8 or e4m3";
    TORCH_CHECK_VALUE(cc == 90, "VELODIFF_QGEMM_TC=", e, " needs Hopper's warpgroup MMA (sm_90); this GPU is sm_",
                      cc, "; use ", others, ", or unset it");
    bool built = false;
    TORCH_CHECK(qgemm_cuda_wgmma_built(built) == 0, "qgemm: cannot query the loaded CUDA kernels");
    TORCH_CHECK_VALUE(built, "VELODIFF_QGEMM_TC=", e, ": this build of velodiff has no sm_90a code; rebuild with "
                      "VELODIFF_CUDA_ARCHS=90a (pip install --no-build-isolation .), or unset it");
    return wg_s8 ? QTensorPath::kWgmmaS8 : QTensorPath::kWgmmaE4M3;
  }
  TORCH_CHECK_VALUE(false, "VELODIFF_QGEMM_TC=", e,
                    ": expected auto, s4, s8, e4m3, wgmma-s8 or wgmma-e4m3 (the last two optionally with -64 or -128)");
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
                         const std::optional<at::Tensor>& lora_scales, int64_t bits, int64_t activation,
                         const std::optional<at::Tensor>& packed) {
  TORCH_CHECK_VALUE(qx.is_cuda(), "qgemm: qx is on ", qx.device(), " but other arguments are on CUDA");
  TORCH_CHECK_VALUE(!packed.has_value(), "qgemm: packed weights (qgemm_pack) are a CPU format; pass packed=None "
                    "on CUDA");
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Tensor qx16 = aligned16(qx), qw16 = aligned16(qw);
  at::Tensor y;
  QGemmArgs a =
      prepare_qgemm(qx16, ascales, qw16, wscales, bias, lora_act, lora_up, lora_scales, bits, activation, y);
  if (bits == 4) a.tensor_path = tensor_path_from_env(a.wgmma_rows);
  check_launch("qgemm", qgemm_cuda(a, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(velodiff, CUDA, m) {
  m.impl("quantize_act", &quantize_act_cuda_op);
  m.impl("qgemm", &qgemm_cuda_op);
}

}  // namespace velodiff
