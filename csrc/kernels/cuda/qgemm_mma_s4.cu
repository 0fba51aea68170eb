// velodiff::qgemm, path (a) of qgemm_device.cuh: 4-bit codes on the int4 tensor cores, mma.sync m16n8k64 .s4
// (sm_80..sm_89; Hopper has none, there the kernel traps and qgemm_cuda never picks it).
#include "qgemm_mma.cuh"

namespace velodiff {
namespace qgemm_detail {

cudaError_t launch_qgemm_mma_s4(const QGemmArgs& a, int sms, cudaStream_t stream) {
  return launch_mma_path<4, kPathS4>(a, sms, stream);
}

}  // namespace qgemm_detail
}  // namespace velodiff
