// Run-time choice of the CPU kernel variant. The default build has no -march flag, so the
// fast variants are compiled per translation unit and picked here by CPUID.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernel_api.h"

namespace sparse_t5 {
namespace cpu {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable& choose() {
  const char* requested = std::getenv("SPARSE_T5_CPU_ISA");
  if (requested != nullptr && requested[0] != '\0') {
    const std::string name(requested);
    if (name == "baseline") return baseline_kernels();
    if (name == "avx2" && cpu_has_avx2()) return avx2_kernels();
    if (name == "avx512" && cpu_has_avx512()) return avx512_kernels();
    throw std::invalid_argument("SPARSE_T5_CPU_ISA=" + name +
                                " is not one of baseline|avx2|avx512 supported by this CPU");
  }
  if (cpu_has_avx512()) return avx512_kernels();
  if (cpu_has_avx2()) return avx2_kernels();
  return baseline_kernels();
}

}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace cpu
}  // namespace sparse_t5
