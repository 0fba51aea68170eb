// Run-time choice of the x86 instruction set for the CPU kernels (attention, windowed attention, qgemm). The
// library is compiled for baseline x86-64; the vector code carries target attributes and runs only where the CPU
// reports the features (__builtin_cpu_supports), so one wheel runs everywhere.
//
// VELODIFF_CPU_ISA caps the choice: portable | avx2 | avx512 | avx512bf16 (the tests compare the paths; each
// kernel family documents that they give the same bits). Unset or empty: the best this CPU has.
//
// Torch-free, CPU only; included by csrc/kernels/cpu/*.cpp alone.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace velodiff {
namespace cpu_isa {

// Tiers, each including the one below: AVX2 + FMA; + AVX-512F/VL; + AVX-512BF16.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline const char* isa_name(Isa isa) {
  static const char* const names[] = {"portable", "avx2", "avx512", "avx512bf16"};
  return names[static_cast<int>(isa)];
}

inline Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa best = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kPortable;
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512vl")) return Isa::kAvx2;
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }();
  return best;
#else
  return Isa::kPortable;
#endif
}

// The best tier capped by VELODIFF_CPU_ISA, and by `scalar_switch` (an older per-kernel variable, e.g.
// VELODIFF_ATTENTION_SCALAR: set and not "0" means portable) when given. False (and a message in error, at least
// 256 bytes) for a VELODIFF_CPU_ISA that is none of the names.
inline bool select_isa(Isa& isa, char* error, const char* scalar_switch = nullptr) {
  isa = best_isa();
  const char* scalar = scalar_switch != nullptr ? std::getenv(scalar_switch) : nullptr;
  if (scalar != nullptr && scalar[0] != '\0' && std::strcmp(scalar, "0") != 0) isa = Isa::kPortable;
  const char* cap = std::getenv("VELODIFF_CPU_ISA");
  if (cap == nullptr || cap[0] == '\0') return true;
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(cap, isa_name(static_cast<Isa>(i))) == 0) {
      isa = std::min(isa, static_cast<Isa>(i));
      return true;
    }
  std::snprintf(error, 256, "VELODIFF_CPU_ISA must be portable, avx2, avx512 or avx512bf16 (or unset), not '%.80s'",
                cap);
  return false;
}

}  // namespace cpu_isa
}  // namespace velodiff
