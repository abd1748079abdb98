// The "transient dense" method of the CPU ops (kernel_policy.h chooses it per call): the weight is
// decompressed for this call only and the product runs on the vendor GEMM (MKL / oneDNN through
// at::mm), then the dense copy is freed. Nothing dense outlives the call, and nothing is saved for
// backward: each backward op rebuilds what it needs. Exact: the same products as the sparse
// kernels, summed in a different order (the dtype's tolerance).
//
// Load as sparse, compute as dense (Flash-LLM's idea, the CPU analogue): the products work on
// panels of the weight. Each thread decompresses one panel (kPanelBytes, an L2-sized tile) and runs
// the GEMM of that panel, so the dense layer is never written to memory whole. The forward and
// dvalues take panels of output rows; the input gradient dX = dY W takes row panels too, summed into
// a partial dX per thread, or panels of input columns when those partials would not fit the bound
// below (panel_backward_input says when and why).
// Transient peak per call: one panel per worker thread, kept between calls (thread_panel below),
// plus, for dX by row panels, (threads - 1) partial dX of at most one dense copy of the layer in all.
// Decompressing the whole layer for dX (before either) cost one dense copy of it per call, which is
// what kept the t5-base recovery step at 0.2 above the sparse kernels' peak memory.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "cpu/parallel.h"
#include "op_common.h"
#include "ops.h"

namespace sparse_t5 {
namespace {

// ~1 MiB of dense weight per panel at most, and at least 64 rows: a panel stays within L2 (2 MiB per
// core here), and the panel's GEMM is not so skinny that MKL loses efficiency. (512 KiB panels, 32
// rows for in = 3072, ran the t5-base FFN wo forward at 1.21x F.linear; benches/kernel_methods.py.)
constexpr int64_t kPanelBytes = int64_t{1} << 20;
constexpr int64_t kMinPanelRows = 64;
// Panel boundaries fall on multiples of 16 rows (or columns): a 2:4 group never splits.
constexpr int64_t kPanelGranule = 16;

// How `total` rows of row_len elements split into panels: `count` panels, panel p covering the
// granules [p * granules / count, (p + 1) * granules / count). The count is a multiple of the
// thread count, so each thread runs as many panels as the others, of the same size to within one
// granule. With panels of a fixed size the last one was short, and on 2 threads a t5-base layer
// split 5 : 4.1 panels, one thread idle for a tenth of the call (balancing: 3-8% off the forward
// and dvalues at 256 tokens). A thread that is held back still hands its panels to the others
// (the dynamic schedule, parallel.h).
struct Panels {
  int64_t total, granules, count;
  int64_t begin(int64_t p) const { return std::min(total, p * granules / count * kPanelGranule); }
};

Panels panels_of(int64_t total, int64_t row_len, int64_t elem_size) {
  const int64_t max_rows = std::max(kMinPanelRows, kPanelBytes / std::max<int64_t>(1, row_len * elem_size));
  const int64_t threads = cpu::worker_threads(), granules = (total + kPanelGranule - 1) / kPanelGranule;
  int64_t count = (total + max_rows - 1) / max_rows;
  count = (count + threads - 1) / threads * threads;
  return {total, granules, std::max<int64_t>(1, std::min(count, granules))};
}

// The panel of the calling worker thread, kept between calls: one per thread, about 1 MiB (at least
// 64 rows). The forward and dvalues of every layer reuse it, so they allocate nothing and fault no
// pages. Allocating it per call raised the peak: glibc raises its mmap threshold to each large block
// freed, after which freed panels stayed resident in the heap (t5-small recovery step at 0.2, peak
// RSS: 1648-1666 MB per-call malloc, 1624-1627 MB kept per thread). Mapping each panel from the
// kernel per call (mmap / munmap) kept the memory down too, but the page faults cost 20% of the step.
at::Tensor thread_panel(int64_t rows, int64_t in, const at::TensorOptions& opts) {
  thread_local at::Tensor storage;  // bytes; freed when the thread exits
  const int64_t bytes = rows * in * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (!storage.defined() || storage.numel() < bytes) storage = at::empty({bytes}, opts.dtype(at::kByte));
  return at::from_blob(storage.data_ptr(), {rows, in}, opts);  // a view of it, valid for this call
}

// ---- decompression of rows [r0, r1) into dst [r1 - r0, in] (row-major) ------------------------------
template <typename S, typename I>
void csr_rows_to_dense(const S* values, const int32_t* row_ptr, const I* col, int64_t r0, int64_t r1, int64_t in,
                       S* dst) {
  std::memset(static_cast<void*>(dst), 0, sizeof(S) * (r1 - r0) * in);
  for (int64_t r = r0; r < r1; ++r) {
    S* row = dst + (r - r0) * in;
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) row[col[k]] = values[k];
  }
}

// Columns [c0, c1) of every row into dst [out, c1 - c0] (row-major): the panel of W that dX[:, c0:c1]
// needs. Columns are strictly increasing within a row (formats.py checks it), so a binary search
// finds each row's first column >= c0.
template <typename S, typename I>
void csr_cols_to_dense(const S* values, const int32_t* row_ptr, const I* col, int64_t out, int64_t c0, int64_t c1,
                       S* dst) {
  const int64_t width = c1 - c0;
  std::memset(static_cast<void*>(dst), 0, sizeof(S) * out * width);
  for (int64_t r = 0; r < out; ++r) {
    S* row = dst + r * width;
    const I* end = col + row_ptr[r + 1];
    for (const I* k = std::lower_bound(col + row_ptr[r], end, static_cast<I>(c0)); k != end && *k < c1; ++k)
      row[*k - c0] = values[k - col];
  }
}

// dvalues[k] = G[row(k) - r0, col(k)] for the nonzeros of rows [r0, r1).
template <typename S, typename I>
void csr_rows_gather(const S* g, const int32_t* row_ptr, const I* col, int64_t r0, int64_t r1, int64_t in,
                     S* dvalues) {
  for (int64_t r = r0; r < r1; ++r) {
    const S* row = g + (r - r0) * in;
    for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) dvalues[k] = row[col[k]];
  }
}

// 2:4, rows [r0, r1) x columns [c0, c1) into dst [r1 - r0, c1 - c0] (c0 and c1 multiples of 4):
// the forward's row panels take every column, dX's column panels every row. Every group of 4 is
// written whole (its two kept values and two zeros), so no memset.
template <typename S>
void semi24_block_to_dense(const S* values, const uint8_t* meta, int64_t in, int64_t r0, int64_t r1, int64_t c0,
                           int64_t c1, S* dst) {
  const int64_t width = c1 - c0, meta_width = (in / 4 + 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const S* v = values + r * (in / 2);
    const uint8_t* m = meta + r * meta_width;
    S* row = dst + (r - r0) * width;
    for (int64_t g = c0 / 4; g < c1 / 4; ++g) {
      const unsigned nib = (m[g / 2] >> ((g & 1) * 4)) & 0xFu;
      S* out = row + (4 * g - c0);
      out[0] = out[1] = out[2] = out[3] = S(0);
      out[nib & 3u] = v[2 * g];
      out[nib >> 2] = v[2 * g + 1];
    }
  }
}

template <typename S>
void semi24_rows_gather(const S* g, const uint8_t* meta, int64_t r0, int64_t r1, int64_t in, S* dvalues) {
  const int64_t groups = in / 4, width = (groups + 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const S* row = g + (r - r0) * in;
    const uint8_t* m = meta + r * width;
    S* dv = dvalues + r * (in / 2);
    for (int64_t j = 0; j < groups; ++j) {
      const unsigned nib = (m[j / 2] >> ((j & 1) * 4)) & 0xFu;
      dv[2 * j] = row[4 * j + (nib & 3u)];
      dv[2 * j + 1] = row[4 * j + (nib >> 2)];
    }
  }
}

// ---- the three products, generic over how rows are decompressed / gathered ---------------------------
// body(start, n) for each panel, scheduled dynamically over the worker threads (each runs its
// panels below autograd: the guard is thread-local).
template <typename Body>
void for_each_panel(const Panels& panels, const Body& body) {
  cpu::dynamic_parallel_for(panels.count, 1, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = b; p < e; ++p) body(panels.begin(p), panels.begin(p + 1) - panels.begin(p));
  });
}

// y2 [T, out] = x2 [T, in] @ W^T (+ bias), panel by panel of output rows.
template <typename ToDense>
at::Tensor panel_forward(const at::Tensor& x2, int64_t out, int64_t in, const ToDense& to_dense) {
  at::Tensor y2 = at::empty({x2.size(0), out}, x2.options());
  for_each_panel(panels_of(out, in, x2.element_size()), [&](int64_t r0, int64_t n) {
    at::Tensor panel = thread_panel(n, in, x2.options());  // [n, in]
    to_dense(r0, r0 + n, panel.data_ptr());
    at::Tensor y_cols = y2.narrow(1, r0, n);  // strided [T, n] view: the GEMM writes it in place (ldc = out)
    at::mm_out(y_cols, x2, panel.t());
  });
  return y2;
}

// dvalues = (dY^T X) at the kept positions, panel by panel of output rows: G_p = dY[:, p]^T X.
template <typename Gather>
void panel_sddmm(const at::Tensor& g2, const at::Tensor& x2, int64_t out, int64_t in, const Gather& gather) {
  const at::Tensor g2t = g2.t();  // [out, T] view
  for_each_panel(panels_of(out, in, x2.element_size()), [&](int64_t r0, int64_t n) {
    at::Tensor gp = thread_panel(n, in, x2.options());  // [n, in]
    at::mm_out(gp, g2t.narrow(0, r0, n), x2);
    gather(r0, r0 + n, gp.data_ptr());
  });
}

// dX [T, in] = dY [T, out] @ W. Two ways to cut it into L2-sized panels of W, both exact:
//
// - by output rows, W[r0:r1, :] (the forward's panels): dX = sum over panels of dY[:, r0:r1] W[r0:r1, :].
//   Each thread accumulates its panels into its own partial dX, and the partials are added at the
//   end. Each panel's GEMM reads only its slice of dY.
// - by input columns: dX[:, c0:c1] = dY W[:, c0:c1], each an [out, c1 - c0] tile decompressed from
//   the CSR rows (a binary search per row finds c0; columns are sorted). Nothing to add up, but
//   every panel's GEMM reads all of dY again.
//
// Row panels were faster in 5 of the 6 t5-base FFN cases measured (3072 x 768 at density 0.8:
// 1.46x -> 1.16x of the dense GEMM at 256 tokens, 1.90x -> 1.51x at 64; 768 x 3072 at 1024 tokens
// the same), so they run whenever their extra memory, (threads - 1) partial dX, is at most one
// dense copy of the layer, which keeps the transient peak inside its stated bound (two dense copies):
// (threads - 1) * tokens <= out. Past that (many tokens, many threads) the column panels run. In
// bf16 and fp16 the partial sums would round at every panel, so those take the column panels, whose
// GEMM rounds each element once.
template <typename RowsToDense, typename ColsToDense>
at::Tensor panel_backward_input(const at::Tensor& g2, int64_t out, int64_t in, const RowsToDense& rows_to_dense,
                                const ColsToDense& cols_to_dense) {
  const int64_t tokens = g2.size(0), threads = cpu::worker_threads();
  const bool exact_partials = g2.scalar_type() == at::kFloat || g2.scalar_type() == at::kDouble;
  if (exact_partials && (threads - 1) * tokens <= out) {
    at::Tensor dx2 = at::zeros({tokens, in}, g2.options());
    at::Tensor partials = threads > 1 ? at::zeros({threads - 1, tokens, in}, g2.options()) : at::Tensor();
    for_each_panel(panels_of(out, in, g2.element_size()), [&](int64_t r0, int64_t n) {
      at::Tensor panel = thread_panel(n, in, g2.options());  // [n, in]
      rows_to_dense(r0, r0 + n, panel.data_ptr());
      const int64_t t = threads > 1 ? at::get_thread_num() : 0;
      at::Tensor acc = t == 0 ? dx2 : partials.select(0, t - 1);
      acc.addmm_(g2.narrow(1, r0, n), panel);  // dY[:, r0:r1] is a strided view (ld = out)
    });
    for (int64_t t = 0; t + 1 < threads; ++t) dx2.add_(partials.select(0, t));
    return dx2;
  }
  at::Tensor dx2 = at::empty({tokens, in}, g2.options());
  for_each_panel(panels_of(in, out, g2.element_size()), [&](int64_t c0, int64_t n) {
    at::Tensor panel = thread_panel(out, n, g2.options());  // [out, n]
    cols_to_dense(c0, c0 + n, panel.data_ptr());
    at::Tensor dx_cols = dx2.narrow(1, c0, n);  // strided [T, n] view: the GEMM writes it in place
    at::mm_out(dx_cols, g2, panel);
  });
  return dx2;
}

// [tokens, features] view of a [..., features] tensor; tokens from the leading sizes, since -1 is
// ambiguous for an empty tensor with no features (found by tests/test_ops_fuzz.py).
at::Tensor flat(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.contiguous().view({rows, t.size(-1)});
}

// The GEMMs below are this op's implementation, not part of the user's autograd graph (the op's
// autograd formula is registered in sparse_t5/ops/).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

#define SPARSE_T5_DENSE_DISPATCH(dtype, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "sparse_t5_transient_dense", __VA_ARGS__)

#define SPARSE_T5_CSR_DISPATCH(values_dtype, col_idx, ...)                                   \
  SPARSE_T5_DENSE_DISPATCH(values_dtype, [&] {                                             \
    if (is_16bit_index(col_idx)) {                                                         \
      using index_t = uint16_t;                                                            \
      __VA_ARGS__();                                                                       \
    } else {                                                                               \
      using index_t = int32_t;                                                             \
      __VA_ARGS__();                                                                       \
    }                                                                                      \
  })

}  // namespace

// Callers (csr_linear.cpp, semi24_linear.cpp) have checked every argument, as for the sparse kernels.
at::Tensor csr_linear_dense_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, int64_t out, int64_t in,
                                const std::optional<at::Tensor>& bias) {
  BelowAutograd below_autograd;
  const at::Tensor x2 = flat(x), vc = values.contiguous();
  at::Tensor y2;
  SPARSE_T5_CSR_DISPATCH(values.scalar_type(), col_idx, [&] {
    const scalar_t* v = vc.data_ptr<scalar_t>();
    const index_t* c = static_cast<const index_t*>(col_idx.data_ptr());
    const int32_t* rp = row_ptr.data_ptr<int32_t>();
    y2 = panel_forward(x2, out, in, [&](int64_t r0, int64_t r1, void* dst) {
      csr_rows_to_dense(v, rp, c, r0, r1, in, static_cast<scalar_t*>(dst));
    });
  });
  if (bias.has_value()) y2.add_(*bias);
  return y2.view(with_last_dim(x.sizes(), out));
}

at::Tensor csr_linear_backward_input_dense_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                               const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t out,
                                               int64_t in) {
  BelowAutograd below_autograd;
  const at::Tensor vc = values.contiguous(), g2 = flat(grad_out);
  at::Tensor dx2;
  SPARSE_T5_CSR_DISPATCH(values.scalar_type(), col_idx, [&] {
    const scalar_t* v = vc.data_ptr<scalar_t>();
    const index_t* c = static_cast<const index_t*>(col_idx.data_ptr());
    const int32_t* rp = row_ptr.data_ptr<int32_t>();
    dx2 = panel_backward_input(
        g2, out, in,
        [&](int64_t r0, int64_t r1, void* dst) { csr_rows_to_dense(v, rp, c, r0, r1, in, static_cast<scalar_t*>(dst)); },
        [&](int64_t c0, int64_t c1, void* dst) {
          csr_cols_to_dense(v, rp, c, out, c0, c1, static_cast<scalar_t*>(dst));
        });
  });
  return dx2.view(with_last_dim(grad_out.sizes(), in));
}

at::Tensor csr_sddmm_dense_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, int64_t out, int64_t in) {
  BelowAutograd below_autograd;
  at::Tensor dvalues = at::empty({col_idx.size(0)}, x.options());
  SPARSE_T5_CSR_DISPATCH(x.scalar_type(), col_idx, [&] {
    const index_t* c = static_cast<const index_t*>(col_idx.data_ptr());
    const int32_t* rp = row_ptr.data_ptr<int32_t>();
    scalar_t* dv = dvalues.data_ptr<scalar_t>();
    panel_sddmm(flat(grad_out), flat(x), out, in, [&](int64_t r0, int64_t r1, const void* g) {
      csr_rows_gather(static_cast<const scalar_t*>(g), rp, c, r0, r1, in, dv);
    });
  });
  return dvalues;
}

at::Tensor semi24_linear_dense_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                   const std::optional<at::Tensor>& bias) {
  BelowAutograd below_autograd;
  const int64_t out = values.size(0), in = values.size(1) * 2;
  const at::Tensor x2 = flat(x), vc = values.contiguous();
  const uint8_t* m = meta.data_ptr<uint8_t>();
  at::Tensor y2;
  SPARSE_T5_DENSE_DISPATCH(values.scalar_type(), [&] {
    const scalar_t* v = vc.data_ptr<scalar_t>();
    y2 = panel_forward(x2, out, in, [&](int64_t r0, int64_t r1, void* dst) {
      semi24_block_to_dense(v, m, in, r0, r1, int64_t{0}, in, static_cast<scalar_t*>(dst));
    });
  });
  if (bias.has_value()) y2.add_(*bias);
  return y2.view(with_last_dim(x.sizes(), out));
}

at::Tensor semi24_linear_backward_input_dense_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                  const at::Tensor& meta) {
  BelowAutograd below_autograd;
  const int64_t out = values.size(0), in = values.size(1) * 2;
  const at::Tensor vc = values.contiguous(), g2 = flat(grad_out);
  const uint8_t* m = meta.data_ptr<uint8_t>();
  at::Tensor dx2;
  SPARSE_T5_DENSE_DISPATCH(values.scalar_type(), [&] {
    const scalar_t* v = vc.data_ptr<scalar_t>();
    dx2 = panel_backward_input(
        g2, out, in,
        [&](int64_t r0, int64_t r1, void* dst) {
          semi24_block_to_dense(v, m, in, r0, r1, int64_t{0}, in, static_cast<scalar_t*>(dst));
        },
        [&](int64_t c0, int64_t c1, void* dst) {
          semi24_block_to_dense(v, m, in, int64_t{0}, out, c0, c1, static_cast<scalar_t*>(dst));
        });
  });
  return dx2.view(with_last_dim(grad_out.sizes(), in));
}

at::Tensor semi24_sddmm_dense_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& meta) {
  BelowAutograd below_autograd;
  const int64_t out = meta.size(0), in = x.size(-1);
  at::Tensor dvalues = at::empty({out, in / 2}, x.options());
  const uint8_t* m = meta.data_ptr<uint8_t>();
  SPARSE_T5_DENSE_DISPATCH(x.scalar_type(), [&] {
    scalar_t* dv = dvalues.data_ptr<scalar_t>();
    panel_sddmm(flat(grad_out), flat(x), out, in, [&](int64_t r0, int64_t r1, const void* g) {
      semi24_rows_gather(static_cast<const scalar_t*>(g), m, r0, r1, in, dv);
    });
  });
  return dvalues;
}

}  // namespace sparse_t5
