// CPU bodies of the sparse-linear ops (schemas in registration.cpp). Exposed for the C++ unit tests.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace sparse_t5 {

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t out_features, int64_t in_features,
                          const std::optional<at::Tensor>& bias);

at::Tensor csr_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         int64_t out_features, int64_t in_features);

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t out_features, int64_t in_features);

// y = x W^T for a dense W and 1-16 tokens (dense_few_tokens.cpp).
at::Tensor dense_linear_few_tokens_cpu(const at::Tensor& x, const at::Tensor& weight);

// 2:4 ops (semi24_linear.cpp).
at::Tensor semi24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& bias);
at::Tensor semi24_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                            const at::Tensor& meta);
at::Tensor semi24_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& meta);

// The transient-dense method of the same ops (transient_dense.cpp), for arguments already checked.
at::Tensor csr_linear_dense_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, int64_t out, int64_t in,
                                const std::optional<at::Tensor>& bias);
at::Tensor csr_linear_backward_input_dense_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                               const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t out,
                                               int64_t in);
at::Tensor csr_sddmm_dense_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, int64_t out, int64_t in);
at::Tensor semi24_linear_dense_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                   const std::optional<at::Tensor>& bias);
at::Tensor semi24_linear_backward_input_dense_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                  const at::Tensor& meta);
at::Tensor semi24_sddmm_dense_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& meta);

}  // namespace sparse_t5
