// Baseline (x86-64 SSE2 or any other architecture) build of the CPU kernels (CSR and 2:4).
#define SPARSE_T5_ISA_NS baseline
#define SPARSE_T5_ISA_NAME "baseline"
#define SPARSE_T5_TABLE_FN baseline_kernels
#define SPARSE_T5_ACC_SETS 1
// 2:4 forward: output rows per register block (2 rows x 2 vectors of 4 xmm = 16 xmm of accumulators).
#define SPARSE_T5_24_ROWS 2
#include "kernel_table_impl.h"
