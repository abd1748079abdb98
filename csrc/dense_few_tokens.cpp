// CPU body of dense_linear_few_tokens: y = x W^T for a dense W and 1-16 tokens, W read once (the
// kernel and why: csrc/cpu/dense_kernels_impl.h). The model's lm_head takes it at decoding steps
// without autograd (sparse_t5/modeling_t5.py, LMHead). Schema: registration.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/kernel_api.h"
#include "cpu/parallel.h"
#include "op_common.h"
#include "ops.h"

namespace sparse_t5 {

at::Tensor dense_linear_few_tokens_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "sparse_t5: weight must be 2-D [out_features, in_features], got shape ",
                    weight.sizes());
  const cpu::DType dt = kernel_dtype(weight, "weight");
  TORCH_CHECK_TYPE(dt != cpu::DType::kFloat64, "sparse_t5: dense_linear_few_tokens takes float32 or bfloat16, got ",
                   weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t tokens = check_activation(x, "x", in, "in_features", weight.scalar_type());
  TORCH_CHECK_VALUE(tokens <= cpu::kDenseFewMaxTokens, "sparse_t5: dense_linear_few_tokens takes at most ",
                    cpu::kDenseFewMaxTokens, " tokens, got ", tokens, " (x shape ", x.sizes(), ")");
  at::Tensor y = at::empty(with_last_dim(x.sizes(), out), x.options());
  if (tokens == 0 || out == 0) return y;
  if (in == 0) return y.zero_();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor xbuf = dt == cpu::DType::kFloat32 ? at::Tensor() : at::empty({tokens * in}, at::kFloat);
  cpu::active_kernels().dense_forward_few(wc.data_ptr(), dt, xc.data_ptr(), tokens, out, in, y.data_ptr(),
                                          xbuf.defined() ? xbuf.data_ptr() : nullptr, cpu::aten_parallel());
  return y;
}

}  // namespace sparse_t5

TORCH_LIBRARY_IMPL(sparse_t5, CPU, m) { m.impl("dense_linear_few_tokens", &sparse_t5::dense_linear_few_tokens_cpu); }
