// AVX2 + FMA build of the CSR kernels (x86-64 only; chosen at run time, see dispatch.cpp).
#include "kernel_api.h"
#if defined(__x86_64__)
#include <cstdint>
#include <cstring>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSE_T5_ISA_NS avx2
#define SPARSE_T5_ISA_NAME "avx2"
#define SPARSE_T5_TABLE_FN avx2_kernels
// One accumulator set: a second set of 4 x 2 ymm would spill AVX2's 16 registers.
#define SPARSE_T5_ACC_SETS 1
#include "csr_kernels_impl.h"
#pragma GCC pop_options
#else
namespace sparse_t5 { namespace cpu {
const KernelTable& avx2_kernels() { return baseline_kernels(); }
}}
#endif
