// CPU bodies of the 2:4 ops: checks, then the kernels of csrc/cpu/semi24_kernels_impl.h (forward,
// dx, dvalues), which read the 2-bit metadata directly: the layer stores only values and 2 bits of
// metadata per kept value, and no op builds an index from them.
// Schemas: registration.cpp. Layout: cpu/kernel_api.h (Semi24View).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernel_api.h"
#include "cpu/parallel.h"
#include "kernel_policy.h"
#include "op_common.h"
#include "structure_checks.h"
#include "ops.h"

namespace sparse_t5 {
namespace {

int64_t check_semi24(const at::Tensor& values, const at::Tensor& meta) {
  check_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, "sparse_t5: 2:4 values must be 2-D [out_features, in_features / 2], got ",
                    values.sizes());
  const int64_t out = values.size(0), in = values.size(1) * 2;
  check_semi24_meta(meta, out, in);
  return in;
}

}  // namespace

at::Tensor semi24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                             const std::optional<at::Tensor>& bias) {
  const int64_t in = check_semi24(values, meta), out = values.size(0);
  const cpu::DType dt = kernel_dtype(values, "values");
  const int64_t tokens = check_activation(x, "x", in, "in_features", values.scalar_type());
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "sparse_t5: bias must have shape [out_features] = [",
                      out, "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "sparse_t5: bias dtype ", bias->scalar_type(),
                     " does not match values dtype ", values.scalar_type());
  }
  at::Tensor y = at::empty(with_last_dim(x.sizes(), out), x.options());
  if (tokens == 0 || out == 0) return y;
  // No inputs: y is the bias (the kernels' panels would be empty, with null data).
  if (in == 0) return bias.has_value() ? y.copy_(*bias) : y.zero_();
  if (choose_method("cpu", PolicyOp::kSemi24Forward, x.scalar_type(), tokens, out, in, 0.5) == Method::kDense)
    return semi24_linear_dense_cpu(x, values, meta, bias);
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int nv = tile_vectors_or_forced(padding_aware_vectors_per_tile(tokens, dt, 1), 4);
  at::Tensor x_panels = panels(tokens, in, nv, dt);
  cpu::Semi24View w{vc.data_ptr(), meta.data_ptr<uint8_t>(), out, in};
  cpu::active_kernels().semi24_forward(w, dt, xc.data_ptr(), tokens, bc.defined() ? bc.data_ptr() : nullptr,
                                       y.data_ptr(), x_panels.data_ptr(), nv, cpu::aten_parallel());
  return y;
}

at::Tensor semi24_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                            const at::Tensor& meta) {
  const int64_t in = check_semi24(values, meta), out = values.size(0);
  const cpu::DType dt = kernel_dtype(values, "values");
  const int64_t tokens = check_activation(grad_out, "grad_out", out, "out_features", values.scalar_type());
  at::Tensor dx = at::empty(with_last_dim(grad_out.sizes(), in), grad_out.options());
  if (tokens == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();  // nothing to sum (and empty panels have null data)
  if (choose_method("cpu", PolicyOp::kSemi24BackwardInput, grad_out.scalar_type(), tokens, out, in, 0.5) ==
      Method::kDense)
    return semi24_linear_backward_input_dense_cpu(grad_out, values, meta);
  const at::Tensor gc = grad_out.contiguous(), vc = values.contiguous();
  // Threads split (token tile, chunk of inputs) items, so one tile of tokens still uses them all,
  // and every padded slot counts (threads = 1).
  const int nv = tile_vectors_or_forced(padding_aware_vectors_per_tile(tokens, dt, 1), 4);
  at::Tensor dy_panels = panels(tokens, out, nv, dt);
  at::Tensor dx_panels = panels(tokens, in, nv, dt);
  cpu::Semi24View w{vc.data_ptr(), meta.data_ptr<uint8_t>(), out, in};
  cpu::active_kernels().semi24_backward_input(w, dt, gc.data_ptr(), tokens, dx.data_ptr(), dy_panels.data_ptr(),
                                              dx_panels.data_ptr(), nv, cpu::aten_parallel());
  return dx;
}

at::Tensor semi24_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(meta.dim() == 2, "sparse_t5: 2:4 meta must be 2-D, got ", meta.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "sparse_t5: x must have at least 1 dimension");
  const int64_t out = meta.size(0), in = x.size(-1);
  check_semi24_meta(meta, out, in);
  const cpu::DType dt = kernel_dtype(x, "x");
  const int64_t tokens = check_activation(x, "x", in, "in_features", x.scalar_type());
  check_activation(grad_out, "grad_out", out, "out_features", x.scalar_type());
  TORCH_CHECK_VALUE(x.sizes().slice(0, x.dim() - 1) == grad_out.sizes().slice(0, grad_out.dim() - 1),
                    "sparse_t5: grad_out and x must have the same leading dimensions, got ", grad_out.sizes(),
                    " and ", x.sizes());
  at::Tensor dvalues = at::empty({out, in / 2}, x.options());
  if (dvalues.numel() == 0) return dvalues;
  if (tokens == 0) return dvalues.zero_();
  if (choose_method("cpu", PolicyOp::kSemi24Sddmm, x.scalar_type(), tokens, out, in, 0.5) == Method::kDense)
    return semi24_sddmm_dense_cpu(grad_out, x, meta);
  const at::Tensor gc = grad_out.contiguous(), xc = x.contiguous();
  // 8 vectors (128 fp32 tokens) per tile from 256 tokens on: each tile ends in a lane reduction
  // per kept value, which longer tiles amortise (measured 0.77-0.81x dense dW at 4, 0.86-0.87x at 8),
  // except where 8-vector tiles pad (narrower_where_wide_pads): on an AMD EPYC (AVX-512, 2 threads,
  // fp32, t5-base FFN and 768x768) 4 vectors took 0.81-0.93x of the 8-vector time at 288, 320 and
  // 400 tokens, and 0.93-1.05x at 256, 384 and 512, where neither pads. Below 256, 2 vectors did
  // not pay where 4 pad (0.98-1.08x at 96 and 160 tokens), so vectors_per_tile stands.
  const int nv = tile_vectors_or_forced(
      tokens >= 256 ? narrower_where_wide_pads(8, tokens, dt, 1) : vectors_per_tile(tokens, dt, 1), 8);
  at::Tensor dy_panels = panels(tokens, out, nv, dt);
  at::Tensor x_panels = panels(tokens, in, nv, dt);
  at::Tensor acc = at::empty({out * (in / 2)}, at::TensorOptions().dtype(compute_dtype(dt)));
  cpu::Semi24View w{nullptr, meta.data_ptr<uint8_t>(), out, in};
  cpu::active_kernels().semi24_sddmm(w, dt, gc.data_ptr(), xc.data_ptr(), tokens, dvalues.data_ptr(),
                                     dy_panels.data_ptr(), x_panels.data_ptr(), acc.data_ptr(), nv,
                                     cpu::aten_parallel());
  return dvalues;
}

}  // namespace sparse_t5

TORCH_LIBRARY_IMPL(sparse_t5, CPU, m) {
  m.impl("semi24_linear", &sparse_t5::semi24_linear_cpu);
  m.impl("semi24_linear_backward_input", &sparse_t5::semi24_linear_backward_input_cpu);
  m.impl("semi24_sddmm", &sparse_t5::semi24_sddmm_cpu);
}
