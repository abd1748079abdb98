// AVX2 + FMA build of the CPU kernels (CSR and 2:4) (x86-64 only; chosen at run time, see dispatch.cpp).
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
// 2:4 forward: output rows per register block (4 rows x 2 vectors of 2 ymm = 16 ymm, all of AVX2's registers; fewer rows reuse x less).
#define SPARSE_T5_24_ROWS 4
#include <immintrin.h>
#include "kernel_table_impl.h"
#pragma GCC pop_options
#else
namespace sparse_t5 { namespace cpu {
const KernelTable& avx2_kernels() { return baseline_kernels(); }
}}
#endif
