// velodiff::qgemm on the int8 tensor cores, mma.sync m16n8k32 .s8 (sm_80 and later): every 8-bit GEMM, and
// path (b) of qgemm_device.cuh for 4-bit codes (each nibble unpacked in registers to an s8 byte holding 16 x the
// code; the 1/256 is folded into the activation scale).
#include "qgemm_mma.cuh"

namespace velodiff {
namespace qgemm_detail {

cudaError_t launch_qgemm_mma_s8(const QGemmArgs& a, int sms, cudaStream_t stream) {
  if (a.bits == 8) return launch_mma_path<8, kPathS8>(a, sms, stream);
  return launch_mma_path<4, kPathS8>(a, sms, stream);
}

}  // namespace qgemm_detail
}  // namespace velodiff
