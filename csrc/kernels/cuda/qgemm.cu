// Host entry point of velodiff::qgemm's CUDA kernels (format and semantics: csrc/include/velodiff/qgemm.h):
// argument checks, the tensor-core path for the device at hand (QTensorPath in qgemm.h; the paths are described
// in qgemm_device.cuh), and the dispatch to the launcher of the kernel file that runs it. Torch-free.
#include "qgemm_device.cuh"

namespace velodiff {
namespace qgemm_detail {
namespace {

cudaError_t device_info(int& major, int& minor, int& sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

// The 4-bit path for a device of compute capability cc (major * 10 + minor), or 0 when it cannot run there.
int resolve_path(QTensorPath requested, int cc) {
  switch (requested) {
    case QTensorPath::kAuto: return cc < 90 ? kPathS4 : kPathS8;
    case QTensorPath::kS4: return cc < 90 ? kPathS4 : 0;
    case QTensorPath::kS8: return kPathS8;
    case QTensorPath::kE4M3: return cc >= 89 ? kPathE4M3 : 0;
    case QTensorPath::kWgmmaS8: return cc == 90 ? kPathWgmmaS8 : 0;
    case QTensorPath::kWgmmaE4M3: return cc == 90 ? kPathWgmmaE4M3 : 0;
  }
  return 0;
}

// The launcher of the kernel that runs `path` (kPath*, as resolved above) on `a`.
cudaError_t launch_gemm(const QGemmArgs& a, int path, int sms, cudaStream_t stream) {
  if (a.bits == 8) return launch_qgemm_mma_s8(a, sms, stream);
  switch (path) {
    case kPathS4: return launch_qgemm_mma_s4(a, sms, stream);
    case kPathE4M3: return launch_qgemm_mma_e4m3(a, sms, stream);
    case kPathWgmmaS8: return launch_qgemm_wgmma(a, false, stream);
    case kPathWgmmaE4M3: return launch_qgemm_wgmma(a, true, stream);
    default: return launch_qgemm_mma_s8(a, sms, stream);
  }
}

}  // namespace
}  // namespace qgemm_detail

int qgemm_cuda(const QGemmArgs& a, void* stream) {
  using namespace qgemm_detail;
  if (a.bits != 4 && a.bits != 8) return cudaErrorInvalidValue;
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.R < 0 || a.K % kQGroup != 0) return cudaErrorInvalidValue;
  const int act = static_cast<int>(a.activation);
  if (act < 0 || act > 3) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.y == nullptr || a.wscales == nullptr) return cudaErrorInvalidValue;
  if (a.K > 0 && (a.qx == nullptr || a.qw == nullptr || a.ascales == nullptr)) return cudaErrorInvalidValue;
  if (a.R > 0 && (a.lora_act == nullptr || a.lora_up == nullptr)) return cudaErrorInvalidValue;
  if (!aligned(a.qx, 16) || !aligned(a.qw, 16)) return cudaErrorInvalidValue;  // 16-byte cp.async
  if (a.M / 32 >= (int64_t{1} << 31) || a.N / kBN >= 65535) return cudaErrorInvalidValue;
  int major = 0, minor = 0, sms = 0;
  cudaError_t err = device_info(major, minor, sms);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;  // mma.sync integer shapes and cp.async need sm_80
  const int path = a.bits == 4 ? resolve_path(a.tensor_path, major * 10 + minor) : kPathS8;
  if (path == 0) return cudaErrorNotSupported;
  if (path == kPathWgmmaS8 || path == kPathWgmmaE4M3) {  // those kernels trap in an image without sm_90a code
    bool built = false;
    err = static_cast<cudaError_t>(qgemm_cuda_wgmma_built(built));
    if (err != cudaSuccess) return err;
    if (!built) return cudaErrorNotSupported;
  }
  return launch_gemm(a, path, sms, static_cast<cudaStream_t>(stream));
}

}  // namespace velodiff
