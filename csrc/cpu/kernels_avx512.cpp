// AVX-512 build of the CPU kernels (CSR and 2:4) (x86-64 only; chosen at run time, see dispatch.cpp).
#include "kernel_api.h"
#if defined(__x86_64__)
#include <cstdint>
#include <cstring>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define SPARSE_T5_ISA_NS avx512
#define SPARSE_T5_ISA_NAME "avx512"
#define SPARSE_T5_TABLE_FN avx512_kernels
// Two accumulator sets: 8 independent zmm FMA chains cover the FMA latency x throughput.
#define SPARSE_T5_ACC_SETS 2
// 2:4 forward: output rows per register block (8 rows x 2 zmm = 16 of the 32 zmm registers as accumulators).
#define SPARSE_T5_24_ROWS 8
// Two-source permutes are one instruction (vpermt2ps): enables the few-token 2:4 forward.
#define SPARSE_T5_HAS_PERMUTE2 1
// 16-lane gathers (vgatherdps zmm): the gather few-token CSR forward (csr_kernels_impl.h).
#define SPARSE_T5_HAS_GATHER512 1
#include <immintrin.h>
#include "kernel_table_impl.h"
#pragma GCC pop_options
#else
namespace sparse_t5 { namespace cpu {
const KernelTable& avx512_kernels() { return baseline_kernels(); }
}}
#endif
