// The attended keys of each batch under velodiff::attention's key-padding mask (velodiff/attention.h), shared by the
// CPU attention kernels (attention.cpp, fp8_attention.cpp). Torch-free, CPU only.
#pragma once

#include <cstdint>
#include <vector>

#include "velodiff/attention.h"

namespace velodiff {

// keys: [B, Lk] indices, the first counts[b] of row b the attended keys of batch b in order; without a mask keys
// stays empty and every count is Lk (all keys).
inline void attended_keys(const AttentionArgs& a, std::vector<int64_t>& keys, std::vector<int64_t>& counts) {
  const int64_t B = a.batch, Lk = a.kv_len;
  counts.assign(static_cast<size_t>(B), Lk);
  keys.clear();
  if (a.mask == nullptr) return;
  keys.resize(static_cast<size_t>(B * Lk));
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t j = 0; j < Lk; ++j)
      if (a.mask[b * a.mask_stride[0] + j * a.mask_stride[1]] != 0) keys[b * Lk + n++] = j;
    counts[b] = n;
  }
}

}  // namespace velodiff
