// velodiff::qgemm, path (c) of qgemm_device.cuh: 4-bit codes unpacked in registers to e4m3 bytes (code x 2^-9,
// exact) for mma.sync m16n8k32 .e4m3 with fp32 accumulation (sm_89 and later; below, the kernel traps and
// qgemm_cuda never picks it).
#include "qgemm_mma.cuh"

namespace velodiff {
namespace qgemm_detail {

cudaError_t launch_qgemm_mma_e4m3(const QGemmArgs& a, int sms, cudaStream_t stream) {
  return launch_mma_path<4, kPathE4M3>(a, sms, stream);
}

}  // namespace qgemm_detail
}  // namespace velodiff
