// Baseline (x86-64 SSE2 or any other architecture) build of the CSR kernels.
#define SPARSE_T5_ISA_NS baseline
#define SPARSE_T5_ISA_NAME "baseline"
#define SPARSE_T5_TABLE_FN baseline_kernels
#define SPARSE_T5_ACC_SETS 1
#include "csr_kernels_impl.h"
