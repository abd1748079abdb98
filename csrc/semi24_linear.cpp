// CPU bodies of the 2:4 ops: checks, then the kernels of csrc/cpu/semi24_kernels_impl.h (forward,
// dx, dvalues), which read the 2-bit metadata directly: the layer stores only values and 2 bits of
// metadata per kept value, and no op builds an index from them.
// Schemas: registration.cpp. Layout: cpu/kernel_api.h (Semi24View).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/kernel_api.h"
#include "cpu/parallel.h"
#include "kernel_policy.h"
#include "op_common.h"
#include "ops.h"

namespace sparse_t5 {
namespace {

// Checks values [out, in/2] and meta [out, ceil(in/8)] and returns in_features. Every nibble must
// name two distinct positions in increasing order; the unused high nibble of an odd last group
// must be zero.
void check_meta(const at::Tensor& meta, int64_t out, int64_t in) {
  check_cpu(meta, "meta");
  TORCH_CHECK_VALUE(in % 4 == 0, "sparse_t5: 2:4 needs in_features divisible by 4, got in_features = ", in);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "sparse_t5: 2:4 meta must be uint8, got ",
                   meta.scalar_type());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == out && meta.size(1) == cpu::semi24_meta_width(in),
                    "sparse_t5: 2:4 meta must have shape [out_features, ceil(in_features / 8)] = [", out, ", ",
                    cpu::semi24_meta_width(in), "], got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.is_contiguous(), "sparse_t5: 2:4 meta must be contiguous");
  const uint8_t* m = meta.data_ptr<uint8_t>();
  const int64_t groups = in / 4, width = cpu::semi24_meta_width(in);
  // Fast path on every call: branch-free byte arithmetic that GCC vectorises (16 bytes per SSE2
  // op), rows split across threads. (A nibble-by-nibble loop with a check per group cost ~0.5 ms
  // per call on a t5-small FFN weight; a 256-entry table ~0.2 ms, as long as the kernel itself
  // at one token.) Only a weight that fails is walked again to name the fault.
  const bool odd = groups % 2 == 1;
  const int64_t full = odd ? width - 1 : width;  // bytes holding two groups
  std::atomic<bool> bad{false};
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    uint8_t fault = 0;
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* row = m + r * width;
      for (int64_t i = 0; i < full; ++i) {
        const uint8_t v = row[i];
        fault |= static_cast<uint8_t>(((v & 3) >= ((v >> 2) & 3)) | (((v >> 4) & 3) >= (v >> 6)));
      }
      if (odd) {
        const uint8_t v = row[width - 1];
        fault |= static_cast<uint8_t>(((v & 3) >= ((v >> 2) & 3)) | ((v >> 4) != 0));
      }
    }
    if (fault) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned nib = (m[r * width + g / 2] >> ((g & 1) * 4)) & 0xFu;
      TORCH_CHECK_VALUE((nib & 3u) < (nib >> 2), "sparse_t5: malformed 2:4 meta at row ", r, ", group ", g,
                        ": positions ", nib & 3u, " and ", nib >> 2, " must be distinct and increasing");
    }
    if (odd) {
      TORCH_CHECK_VALUE((m[r * width + width - 1] >> 4) == 0, "sparse_t5: malformed 2:4 meta at row ", r,
                        ": the unused high nibble of the last byte must be 0");
    }
  }
}

int64_t check_semi24(const at::Tensor& values, const at::Tensor& meta) {
  check_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 2, "sparse_t5: 2:4 values must be 2-D [out_features, in_features / 2], got ",
                    values.sizes());
  const int64_t out = values.size(0), in = values.size(1) * 2;
  check_meta(meta, out, in);
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
  if (choose_method("cpu", PolicyOp::kSemi24Forward, x.scalar_type(), tokens, out, in, 0.5) == Method::kDense)
    return semi24_linear_dense_cpu(x, values, meta, bias);
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int nv = vectors_per_tile(tokens, dt, 1);  // 64-token tiles from 33 tokens on (see the kernel)
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
  if (choose_method("cpu", PolicyOp::kSemi24BackwardInput, grad_out.scalar_type(), tokens, out, in, 0.5) ==
      Method::kDense)
    return semi24_linear_backward_input_dense_cpu(grad_out, values, meta);
  const at::Tensor gc = grad_out.contiguous(), vc = values.contiguous();
  // Threads split (token tile, chunk of inputs) items, so one tile of tokens still uses them all.
  const int nv = vectors_per_tile(tokens, dt, 1);
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
  check_meta(meta, out, in);
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
  // per kept value, which longer tiles amortise (measured 0.77-0.81x dense dW at 4, 0.86-0.87x at 8).
  const int nv = tokens >= 256 ? 8 : vectors_per_tile(tokens, dt, 1);
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
