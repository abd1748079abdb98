// Every sparse_t5:: op schema, defined in exactly one place (extension-cpp's rule: never define a
// schema twice, and never in Python too). CPU bodies are registered next to their kernels
// (csr_linear.cpp, semi24_linear.cpp); CUDA bodies are Triton kernels registered from Python
// (triton_kernels/, sparse_t5/ops/); fake (meta) and autograd rules are in sparse_t5/ops/.
#include <torch/library.h>

#include "cpu/kernel_api.h"
#include "kernel_policy.h"
#include "structure_checks.h"

namespace sparse_t5 {
namespace {
std::string cpu_isa() { return cpu::active_kernels().name; }
}  // namespace
}  // namespace sparse_t5

TORCH_LIBRARY(sparse_t5, m) {
  // y[..., out] = x[..., in] @ W^T + bias, W given as CSR (values, row_ptr, col_idx).
  m.def(
      "csr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, int out_features, "
      "int in_features, Tensor? bias=None) -> Tensor");
  // dx[..., in] = grad_out[..., out] @ W  (the transposed product, for the input gradient).
  m.def(
      "csr_linear_backward_input(Tensor grad_out, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "int out_features, int in_features) -> Tensor");
  // dvalues[k] = sum over tokens of grad_out[t, row(k)] * x[t, col(k)]  (dW at the nonzeros only).
  m.def(
      "csr_sddmm(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, int out_features, "
      "int in_features) -> Tensor");
  // y[..., out] = x[..., in] @ W^T + bias, W 2:4 sparse: values [out, in/2], meta [out, ceil(in/8)] uint8.
  m.def("semi24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // dx[..., in] = grad_out[..., out] @ W for a 2:4 W.
  m.def("semi24_linear_backward_input(Tensor grad_out, Tensor values, Tensor meta) -> Tensor");
  // dvalues[r, j] = sum over tokens of grad_out[t, r] * x[t, col(r, j)], shaped like values.
  m.def("semi24_sddmm(Tensor grad_out, Tensor x, Tensor meta) -> Tensor");
  // y[..., out] = x[..., in] @ W^T for a dense W and at most 16 tokens, W read once (the lm_head at
  // decoding steps; CPU, no autograd: csrc/dense_few_tokens.cpp).
  m.def("dense_linear_few_tokens(Tensor x, Tensor weight) -> Tensor");
  // Name of the CPU kernel variant in use: baseline | avx2 | avx512 (SPARSE_T5_CPU_ISA overrides).
  m.def("cpu_isa() -> str", &sparse_t5::cpu_isa);
  // Whether the O(nnz) structure checks run once per structure (default) or on every call
  // (structure_checks.h).
  m.def("set_structure_checks(str mode) -> ()", &sparse_t5::set_structure_checks);
  m.def("get_structure_checks() -> str", &sparse_t5::get_structure_checks);
  m.def("clear_validated_structures() -> ()", &sparse_t5::clear_validated_structures);
  // Which exact method each op call runs (kernel_policy.h; Python: sparse_t5.kernel_policy).
  m.def("set_kernel_policy(str policy) -> ()", &sparse_t5::set_kernel_policy);
  m.def("get_kernel_policy() -> str", &sparse_t5::get_kernel_policy);
  m.def("set_method_table(str device_class, Tensor table) -> ()", &sparse_t5::set_method_table);
  // Token counts up to which the CPU CSR forward takes its few-token path; 0: off.
  m.def("set_csr_few_tokens(int tokens) -> ()", &sparse_t5::set_csr_few_tokens);
  m.def("get_csr_few_tokens() -> int", &sparse_t5::csr_few_tokens);
  m.def("set_csr_few_tokens_kernel(str kernel) -> ()", &sparse_t5::set_csr_few_tokens_kernel);
  m.def("get_csr_few_tokens_kernel() -> str", &sparse_t5::csr_few_tokens_kernel);
  // Token counts from which the CPU CSR dx runs as the forward over a transient transpose; 0: off.
  m.def("set_csr_dx_transpose_tokens(int tokens) -> ()", &sparse_t5::set_csr_dx_transpose_tokens);
  m.def("get_csr_dx_transpose_tokens() -> int", &sparse_t5::csr_dx_transpose_tokens);
  m.def("set_tile_vectors(int vectors) -> ()", &sparse_t5::set_tile_vectors);
  m.def("get_tile_vectors() -> int", &sparse_t5::tile_vectors);
  m.def("csr_forward_tiling(int tokens, ScalarType dtype, int nnz, int out_features, int in_features, "
        "str method=\"sparse\") -> (int, int)",
        &sparse_t5::csr_forward_tiling);
  m.def("choose_method(str device_class, str op, ScalarType dtype, int tokens, int out_features, "
        "int in_features, float density) -> str",
        &sparse_t5::choose_method_op);
}
