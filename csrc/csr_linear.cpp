// CPU bodies of the CSR ops: argument checks, workspace, and the call into the kernel variant
// chosen for this CPU (csrc/cpu/csr_kernels_impl.h). Schemas: registration.cpp.
//
// Every assumption the kernels make is checked here with TORCH_CHECK_* so that bad input raises a
// Python exception (ValueError for shapes and CSR structure, TypeError for dtypes) and never
// reaches a kernel. The CSR structure's contents (row pointers, sorted in-range columns) are
// checked once per structure, not per call (structure_checks.h says why that is safe).
#include "ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/kernel_api.h"
#include "cpu/parallel.h"
#include "kernel_policy.h"
#include "op_common.h"
#include "structure_checks.h"

namespace sparse_t5 {
namespace {
double density(int64_t nnz, int64_t out, int64_t in) {
  return out * in > 0 ? static_cast<double>(nnz) / (static_cast<double>(out) * static_cast<double>(in)) : 1.0;
}

bool use_dense(PolicyOp op, at::ScalarType dtype, int64_t tokens, int64_t nnz, int64_t out, int64_t in) {
  return choose_method("cpu", op, dtype, tokens, out, in, density(nnz, out, in)) == Method::kDense;
}

// The "mkl" method of the forward: torch's sparse CSR x dense product (MKL's CSR GEMM on x86 builds)
// on a CSR tensor viewing our values. Its indices must be one integer type, int32 here (a T5 layer
// has far fewer than 2^31 nonzeros): 16-bit columns and int64 row pointers are converted per call,
// 4 bytes per nonzero, which the tables' timings include. The structure was validated once
// (structure_checks.h), so the unchecked constructor is safe. y = (W xᵀ)ᵀ: torch returns [out, tokens].
at::Tensor csr_linear_mkl_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, int64_t tokens, int64_t out_features, int64_t in_features,
                              const at::Tensor& bias, at::Tensor& y) {
  const auto i32 = [](const at::Tensor& t) { return t.scalar_type() == at::kInt ? t : t.to(at::kInt); };
  // The CSR tensor is internal to this call: torch's once-per-process "Sparse CSR tensor support is
  // in beta state" notice, raised when one is made, would tell the user about an API they never called.
  const at::Tensor w = [&] {
    struct Quiet : c10::WarningHandler {
      void process(const c10::Warning&) override {}
    } quiet;
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    return at::_sparse_csr_tensor_unsafe(i32(row_ptr), i32(col_idx), values, {out_features, in_features},
                                         values.options().layout(at::kSparseCsr));
  }();
  const at::Tensor wx = at::mm(w, x.reshape({tokens, in_features}).t());  // [out, tokens]
  at::Tensor y2 = y.view({tokens, out_features});
  y2.copy_(wx.t());
  if (bias.defined()) y2.add_(bias);
  return y;
}

// MKL's sparse BLAS takes fp32 and fp64; torch runs other dtypes through a slow generic loop.
bool mkl_applies(at::ScalarType dtype, int64_t nnz) {
  return (dtype == at::kFloat || dtype == at::kDouble) && nnz < (int64_t{1} << 31);
}

}  // namespace

std::tuple<int64_t, int64_t> csr_forward_tiling(int64_t tokens, at::ScalarType dtype, int64_t nnz,
                                                int64_t out_features, int64_t in_features,
                                                const std::string& method) {
  TORCH_CHECK(tokens > 0 && nnz >= 0 && out_features > 0 && in_features > 0,
              "csr_forward_tiling: tokens, out_features and in_features must be positive and nnz >= 0");
  TORCH_CHECK_VALUE(method == "sparse" || method == "sparse_narrow",
                    "csr_forward_tiling: method must be 'sparse' or 'sparse_narrow', got '", method, "'");
  const cpu::DType dt = kernel_dtype(at::empty({0}, at::TensorOptions().dtype(dtype)), "dtype");
  const int nv =
      csr_forward_method_vectors(method == "sparse_narrow", tokens, dt, nnz, out_features, in_features);
  const int64_t tile = nv * cpu::lanes_for(dt);
  const int64_t chunk = cpu::csr_forward_chunk_columns(nv, (tokens + tile - 1) / tile, nnz, out_features, in_features);
  return {nv, (in_features + chunk - 1) / chunk};
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t out_features, int64_t in_features,
                          const std::optional<at::Tensor>& bias) {
  check_values(values);
  check_csr_structure(values.size(0), row_ptr, col_idx, out_features, in_features);
  const cpu::DType dt = kernel_dtype(values, "values");
  const int64_t tokens = check_activation(x, "x", in_features, "in_features", values.scalar_type());
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features,
                      "sparse_t5: bias must have shape [out_features] = [", out_features, "], got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "sparse_t5: bias dtype ",
                     bias->scalar_type(), " does not match values dtype ", values.scalar_type());
  }
  at::Tensor y = at::empty(with_last_dim(x.sizes(), out_features), x.options());
  if (tokens == 0 || out_features == 0) return y;
  // No inputs: y is the bias (the kernels' panels would be empty, with null data).
  if (in_features == 0) return bias.has_value() ? y.copy_(*bias) : y.zero_();
  const Method method = choose_method("cpu", PolicyOp::kCsrForward, x.scalar_type(), tokens, out_features,
                                      in_features, density(values.size(0), out_features, in_features));
  if (method == Method::kDense)
    return csr_linear_dense_cpu(x, values, row_ptr, col_idx, out_features, in_features, bias);

  const at::Tensor xc = x.contiguous();
  const at::Tensor vc = values.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (method == Method::kMkl && mkl_applies(x.scalar_type(), values.size(0)))
    return csr_linear_mkl_cpu(xc, vc, row_ptr, col_idx, tokens, out_features, in_features, bc, y);
  const auto& kernels = cpu::active_kernels();
  if (tokens <= csr_few_tokens() && dt != cpu::DType::kFloat64) {
    at::Tensor xbuf = dt == cpu::DType::kFloat32 ? at::Tensor() : at::empty({tokens * in_features}, at::kFloat);
    const auto few = csr_few_tokens_gather() && kernels.csr_forward_few_gather ? kernels.csr_forward_few_gather
                                                                                : kernels.csr_forward_few;
    few(csr_view(vc, row_ptr, col_idx, out_features, in_features), dt, xc.data_ptr(), tokens,
                            bc.defined() ? bc.data_ptr() : nullptr, y.data_ptr(),
                            xbuf.defined() ? xbuf.data_ptr() : nullptr, cpu::aten_parallel());
    return y;
  }
  const int nv = csr_forward_method_vectors(method == Method::kSparseNarrow, tokens, dt, values.size(0), out_features,
                                            in_features);
  at::Tensor x_panels = panels(tokens, in_features, nv, dt);
  kernels.csr_forward(csr_view(vc, row_ptr, col_idx, out_features, in_features), dt,
                                    xc.data_ptr(), tokens, bc.defined() ? bc.data_ptr() : nullptr,
                                    y.data_ptr(), x_panels.data_ptr(), nv, cpu::aten_parallel());
  return y;
}

at::Tensor csr_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         int64_t out_features, int64_t in_features) {
  check_values(values);
  check_csr_structure(values.size(0), row_ptr, col_idx, out_features, in_features);
  const cpu::DType dt = kernel_dtype(values, "values");
  const int64_t tokens =
      check_activation(grad_out, "grad_out", out_features, "out_features", values.scalar_type());
  at::Tensor dx = at::empty(with_last_dim(grad_out.sizes(), in_features), grad_out.options());
  if (tokens == 0 || in_features == 0) return dx;
  if (out_features == 0) return dx.zero_();  // nothing to sum (and empty panels have null data)
  if (use_dense(PolicyOp::kCsrBackwardInput, grad_out.scalar_type(), tokens, values.size(0), out_features,
                in_features))
    return csr_linear_backward_input_dense_cpu(grad_out, values, row_ptr, col_idx, out_features, in_features);

  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor vc = values.contiguous();
  const cpu::CsrView w = csr_view(vc, row_ptr, col_idx, out_features, in_features);
  const auto& kernels = cpu::active_kernels();
  const int64_t from = csr_dx_transpose_tokens();
  if (from > 0 && tokens >= from) {
    // dx = dy W as the forward over a transient Wᵀ (csr_kernels_impl.h, csr_transpose_t says why).
    const int64_t nnz = values.size(0), parts = at::get_num_threads();
    const bool rows16 = out_features <= 65536;
    at::Tensor t_values = at::empty({nnz}, values.options());
    at::Tensor t_ptr = at::empty({in_features + 1}, at::kInt);
    at::Tensor t_rows = at::empty({nnz}, rows16 ? at::kShort : at::kInt);
    at::Tensor counts = at::empty({parts * in_features}, at::kInt);
    kernels.csr_transpose(w, dt, t_values.data_ptr(), t_ptr.data_ptr<int32_t>(), t_rows.data_ptr(),
                          counts.data_ptr<int32_t>(), parts, cpu::aten_parallel());
    counts.reset();
    cpu::CsrView wt;
    wt.values = t_values.data_ptr();
    wt.row_ptr = t_ptr.data_ptr<int32_t>();
    wt.col_idx = t_rows.data_ptr();
    wt.col_idx_is_16bit = rows16;
    wt.out_features = in_features;
    wt.in_features = out_features;
    wt.nnz = nnz;
    const int nv = csr_forward_method_vectors(false, tokens, dt, nnz, in_features, out_features);
    at::Tensor dy_panels = panels(tokens, out_features, nv, dt);
    kernels.csr_forward(wt, dt, gc.data_ptr(), tokens, nullptr, dx.data_ptr(), dy_panels.data_ptr(), nv,
                        cpu::aten_parallel());
    return dx;
  }
  // Threads split the token tiles, so the tile that pads is the one that loads the busiest thread.
  const int nv = tile_vectors_or_forced(padding_aware_vectors_per_tile(tokens, dt, at::get_num_threads()), 4);
  at::Tensor dy_panels = panels(tokens, out_features, nv, dt);
  at::Tensor dx_panels = panels(tokens, in_features, nv, dt);
  kernels.csr_backward_input(
      w, dt, gc.data_ptr(), tokens,
      dx.data_ptr(), dy_panels.data_ptr(), dx_panels.data_ptr(), nv, cpu::aten_parallel());
  return dx;
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t out_features, int64_t in_features) {
  TORCH_CHECK_VALUE(col_idx.dim() == 1, "sparse_t5: col_idx must be 1-D, got shape ",
                    col_idx.sizes());
  check_csr_structure(col_idx.size(0), row_ptr, col_idx, out_features, in_features);
  const cpu::DType dt = kernel_dtype(x, "x");
  const int64_t tokens = check_activation(x, "x", in_features, "in_features", x.scalar_type());
  check_activation(grad_out, "grad_out", out_features, "out_features", x.scalar_type());
  TORCH_CHECK_VALUE(x.sizes().slice(0, x.dim() - 1) == grad_out.sizes().slice(0, grad_out.dim() - 1),
                    "sparse_t5: grad_out and x must have the same leading dimensions, got ",
                    grad_out.sizes(), " and ", x.sizes());
  const int64_t nnz = col_idx.size(0);
  at::Tensor dvalues = at::empty({nnz}, x.options());
  if (nnz == 0) return dvalues;
  if (tokens == 0) return dvalues.zero_();
  if (use_dense(PolicyOp::kCsrSddmm, x.scalar_type(), tokens, nnz, out_features, in_features))
    return csr_sddmm_dense_cpu(grad_out, x, row_ptr, col_idx, out_features, in_features);

  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  // Narrower tiles repeat the lane folds, so they must save 20% of the slots (op_common.h).
  const int nv = tile_vectors_or_forced(padding_aware_vectors_per_tile(tokens, dt, 1, 20), 4);
  at::Tensor dy_panels = panels(tokens, out_features, nv, dt);
  at::Tensor x_panels = panels(tokens, in_features, nv, dt);
  at::Tensor acc = at::empty({nnz}, at::TensorOptions().dtype(compute_dtype(dt)));
  cpu::active_kernels().csr_sddmm(
      csr_view(at::Tensor(), row_ptr, col_idx, out_features, in_features), dt, gc.data_ptr(),
      xc.data_ptr(), tokens, dvalues.data_ptr(), dy_panels.data_ptr(), x_panels.data_ptr(),
      acc.data_ptr(), nv, cpu::aten_parallel());
  return dvalues;
}

}  // namespace sparse_t5

TORCH_LIBRARY_IMPL(sparse_t5, CPU, m) {
  m.impl("csr_linear", &sparse_t5::csr_linear_cpu);
  m.impl("csr_linear_backward_input", &sparse_t5::csr_linear_backward_input_cpu);
  m.impl("csr_sddmm", &sparse_t5::csr_sddmm_cpu);
}
