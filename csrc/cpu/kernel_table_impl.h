// The entry-point table of one instruction-set variant; included last by kernels_<isa>.cpp.
#pragma once
#include "csr_kernels_impl.h"
#include "semi24_kernels_impl.h"
#include "dense_kernels_impl.h"

#if !defined(SPARSE_T5_ISA_NAME) || !defined(SPARSE_T5_TABLE_FN)
#error "define SPARSE_T5_ISA_NAME and SPARSE_T5_TABLE_FN (see kernels_<isa>.cpp)"
#endif

namespace sparse_t5 {
namespace cpu {

const KernelTable& SPARSE_T5_TABLE_FN() {
  static const KernelTable table = {SPARSE_T5_ISA_NAME, &SPARSE_T5_ISA_NS::csr_forward,
                                    &SPARSE_T5_ISA_NS::csr_forward_few_dispatch<false>,
#if defined(SPARSE_T5_HAS_GATHER512)
                                    &SPARSE_T5_ISA_NS::csr_forward_few_dispatch<true>,
#else
                                    nullptr,
#endif
                                    &SPARSE_T5_ISA_NS::csr_backward_input, &SPARSE_T5_ISA_NS::csr_sddmm,
                                    &SPARSE_T5_ISA_NS::csr_transpose,
                                    &SPARSE_T5_ISA_NS::semi24_forward, &SPARSE_T5_ISA_NS::semi24_backward_input,
                                    &SPARSE_T5_ISA_NS::semi24_sddmm, &SPARSE_T5_ISA_NS::dense_forward_few};
  return table;
}

}  // namespace cpu
}  // namespace sparse_t5
