// CPU kernel of exact attention. Semantics: csrc/include/velodiff/attention.h.
//
// Tasks: (b, h, block of kQueryBlock queries), an OpenMP loop over B * H * ceil(Lq / kQueryBlock); each task runs
// the shared tile routine flash_rows (csrc/kernels/cpu/flash_tile.h: packing, Q K^T, online softmax, P V, the
// AVX-512 / AVX2 and the bit-identical portable paths) on a contiguous range of queries. A thread packs the keys
// of a (b, h) once (KeyCache) for the query blocks of that (b, h) it runs. Masked keys are left out of the key
// list (the attended key list of each batch is built once), so a fully masked row sees no key and gives zeros.
// The result of a task depends on nothing but its inputs: any thread count gives the same bits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "flash_tile.h"
#include "velodiff/attention.h"
#include "attended_keys.h"
#include "velodiff/kernels.h"

namespace velodiff {
namespace {

// Every (b, h, query block) task, operand format T; keys / counts: the attended key list of each batch (empty
// keys: all Lk keys).
template <class T>
void run_tasks(const AttentionArgs& a, const std::vector<int64_t>& keys, const std::vector<int64_t>& counts,
               flash_cpu::Isa isa) {
  using namespace flash_cpu;
  const int64_t H = a.heads, Lq = a.q_len, Lk = a.kv_len;
  const int64_t qblocks = (Lq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = a.batch * H * qblocks;
  const double work = static_cast<double>(a.batch * H) * Lq * (Lk + 1) * (a.head_dim + a.v_head_dim);
#pragma omp parallel if (work >= kParallelMin && tasks > 1)
  {
    Scratch<T> w(a.head_dim, a.v_head_dim);
    KeyCache<T> cache;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / qblocks, i0 = (t % qblocks) * kQueryBlock;
      const int64_t b = bh / H, h = bh % H;
      const int64_t* attended = keys.empty() ? nullptr : keys.data() + b * Lk;
      const T* packed = qblocks > 1 ? cache.get(a, b, h, attended, counts[b], w.dv8, bh) : nullptr;
      flash_rows<T>(a, b, h, nullptr, i0, std::min(kQueryBlock, Lq - i0), attended, counts[b], isa, w, packed);
    }
  }
}

}  // namespace

bool attention_cpu(const AttentionArgs& a, char* error) {
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr) {
    std::snprintf(error, 256, "attention_cpu: q, k, v and out must be non-null");
    return false;
  }
  if (a.batch < 0 || a.heads < 0 || a.q_len < 0 || a.kv_len < 0 || a.head_dim < 1 ||
      a.head_dim > kAttentionMaxHeadDim || a.v_head_dim < 1 || a.v_head_dim > kAttentionMaxHeadDim) {
    std::snprintf(error, 256, "attention_cpu: sizes out of range (D and Dv must be in 1..%lld)",
                  static_cast<long long>(kAttentionMaxHeadDim));
    return false;
  }
  if (!(a.scale > 0.f) || !std::isfinite(a.scale)) {
    std::snprintf(error, 256, "attention_cpu: scale must be finite and > 0");
    return false;
  }
  const int64_t B = a.batch, H = a.heads, Lq = a.q_len, Lk = a.kv_len;
  if (B == 0 || H == 0 || Lq == 0) return true;
  std::vector<int64_t> keys, counts;  // the attended keys of each batch (attended_keys.h)
  attended_keys(a, keys, counts);
  flash_cpu::Isa isa;
  if (!flash_cpu::select_attention_isa(isa, error)) return false;
  if (a.dtype == AttnDType::kBFloat16)
    run_tasks<uint32_t>(a, keys, counts, isa);  // bf16 pairs (flash_tile.h)
  else
    run_tasks<float>(a, keys, counts, isa);
  return true;
}

const char* attention_cpu_path() {
  flash_cpu::Isa isa;
  char error[256];
  if (!flash_cpu::select_attention_isa(isa, error)) return "invalid VELODIFF_CPU_ISA";
  return cpu_isa::isa_name(isa);
}

}  // namespace velodiff
