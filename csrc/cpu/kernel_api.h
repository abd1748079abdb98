// Torch-free interface between the op bindings (csrc/*.cpp) and the CPU kernels (csrc/cpu/*).
//
// Why torch-free: the kernels are compiled once per instruction set (baseline SSE2, AVX2, AVX-512)
// with `#pragma GCC target`, and chosen at run time. Any inline function from a shared header that
// such a file instantiates could be emitted with AVX-512 code and then picked by the linker for
// every caller (an ODR clash that crashes older CPUs). So the ISA files see only this header and
// their own code, all inside an ISA-specific namespace.
#pragma once

#include <cstdint>

namespace sparse_t5 {
namespace cpu {

// Storage dtype of activations, values and bias. Compute is fp32 for fp32/bf16 and fp64 for fp64.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// A row-compressed (CSR) weight of shape [out_features, in_features].
struct CsrView {
  const void* values;      // [nnz], dtype `dtype`
  const int32_t* row_ptr;  // [out_features + 1]
  const void* col_idx;     // [nnz], read as uint16 when col_idx_is_16bit, else int32
  bool col_idx_is_16bit;
  int64_t out_features;
  int64_t in_features;
  int64_t nnz;
};

// A 2:4 semi-structured weight of shape [out_features, in_features] (in_features % 4 == 0): in
// every group of 4 consecutive inputs of a row, 2 are kept. values is [out_features,
// in_features / 2]; meta is [out_features, ceil(in_features / 8)] bytes, one nibble per group
// (group g in byte g / 2, low nibble for even g): bits 0-1 the first kept position, bits 2-3 the
// second, first < second. 2 bits per kept value.
// Bytes of 2:4 metadata per row: one nibble per group of 4 inputs, two groups per byte. Internal
// linkage, so an ISA file's copy can never be picked by the linker for another (the ODR note above).
static inline int64_t semi24_meta_width(int64_t in_features) { return (in_features / 4 + 1) / 2; }

struct Semi24View {
  const void* values;
  const uint8_t* meta;
  int64_t out_features;
  int64_t in_features;
};

// Parallel loop provided by the binding layer (at::parallel_for, so torch.set_num_threads holds).
// run(n, ctx, body) calls body(ctx, begin, end) over disjoint chunks covering [0, n).
struct Parallel {
  void (*run)(int64_t n, void* ctx, void (*body)(void* ctx, int64_t begin, int64_t end));
  int num_threads;
};

// Token-tile panels: a [T, F] activation is repacked as [ceil(T / tile)][F][tile] in the compute
// dtype, zero-padded past T, so that a feature's tokens within a tile are contiguous.
// Workspace pointers below are panels of that shape; tile = vectors_per_tile * lanes, where lanes
// is 16 for fp32 compute and 8 for fp64 compute (one 64-byte vector).
inline int64_t lanes_for(DType dt) { return dt == DType::kFloat64 ? 8 : 16; }
inline int64_t panel_elements(int64_t tokens, int64_t features, int64_t tile) {
  return (tokens + tile - 1) / tile * tile * features;
}

// Panel chunks of the tiled CSR forward (csr_kernels_impl.h, README "How the CSR kernels work").
// A block of rows walks the x panel in chunks of kPanelChunkBytes (L1-sized) instead of whole, when
// a row takes at least kMinChunkNonzeros nonzeros per chunk on average: each (row, chunk) costs a
// reload of the row's partial sums, a cursor and a loop exit, and below that it cost more than
// L1 saved. Measured split against unsplit (Intel Xeon, AVX-512, 2 threads, fp32, 2-vector tiles,
// 3072x768 and 768x3072 at 256-1024 tokens, alternating processes): 1.2-1.9x the unsplit time at
// density 0.05-0.1, 0.93-1.44x at 0.2, 0.87-1.16x at 0.3 (77 a chunk), 0.83-0.91x at 0.5 (128).
// Never split: 1-vector tiles (9-16 fp32 tokens; 512-column chunks), which split took 1.02-1.48x
// (median 1.13x) the unsplit time at in_features 768-3072 and density 0.3-0.7, and calls of one
// token tile (up to 32 fp32 tokens at 2 vectors: decoding at batch 32), 1.02-1.08x at density 0.5.
constexpr int64_t kPanelChunkBytes = 32 * 1024;
constexpr double kMinChunkNonzeros = 100;
// Columns per chunk for `tiles` token tiles of `vectors` 64-byte vectors; `in` when not split.
inline int64_t csr_forward_chunk_columns(int vectors, int64_t tiles, int64_t nnz, int64_t out, int64_t in) {
  const int64_t chunk = kPanelChunkBytes / (64 * static_cast<int64_t>(vectors));
  if (vectors < 2 || tiles < 2 || in <= chunk || out == 0) return in > 0 ? in : 1;
  const double per_chunk = static_cast<double>(nnz) / static_cast<double>(out) * static_cast<double>(chunk) /
                           static_cast<double>(in);
  return per_chunk < kMinChunkNonzeros ? in : chunk;
}

// Most tokens the dense few-token forward takes: a row's per-token sums fill one fp32 vector.
constexpr int64_t kDenseFewMaxTokens = 16;

// One table of entry points per instruction set.
struct KernelTable {
  const char* name;
  // y[T, out] = x[T, in] @ W^T (+ bias[out]).  x_panels: workspace for x.
  void (*csr_forward)(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias,
                      void* y, void* x_panels, int vectors_per_tile, const Parallel& par);
  // The same for 1 <= T <= 8 tokens (decoding), row by row, four nonzeros a load (csr_kernels_impl.h);
  // fp32 and bf16. xbuf: tokens * in floats (bf16 input is converted into it).
  void (*csr_forward_few)(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias,
                          void* y, void* xbuf, const Parallel& par);
  // The same with hardware gathers across each row's nonzeros (csr_kernels_impl.h says when it wins);
  // nullptr where the ISA variant has no 16-lane gather (all but AVX-512).
  void (*csr_forward_few_gather)(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias,
                                 void* y, void* xbuf, const Parallel& par);
  // dx[T, in] = dy[T, out] @ W.  Each thread owns whole token tiles of dx: no atomics.
  void (*csr_backward_input)(const CsrView& w, DType dt, const void* dy, int64_t tokens, void* dx,
                             void* dy_panels, void* dx_panels, int vectors_per_tile,
                             const Parallel& par);
  // dvalues[k] = sum_t dy[t, row(k)] * x[t, col(k)]  (dW sampled at the nonzeros).
  void (*csr_sddmm)(const CsrView& w, DType dt, const void* dy, const void* x, int64_t tokens,
                    void* dvalues, void* dy_panels, void* x_panels, void* dvalues_acc,
                    int vectors_per_tile, const Parallel& par);
  // Wᵀ as CSR [in, out]: t_values [nnz] (dtype dt), t_ptr [in + 1], t_rows [nnz] (uint16 when
  // out <= 65536, else int32; ascending within a column). counts: parts * in int32 of workspace.
  // dx = dy W then runs as csr_forward over Wᵀ (csr_kernels_impl.h says when and why).
  void (*csr_transpose)(const CsrView& w, DType dt, void* t_values, int32_t* t_ptr, void* t_rows,
                        int32_t* counts, int64_t parts, const Parallel& par);
  // y[T, out] = x[T, in] @ W^T (+ bias[out]) for a 2:4 weight. vectors_per_tile is 1, 2 or 4.
  void (*semi24_forward)(const Semi24View& w, DType dt, const void* x, int64_t tokens, const void* bias,
                         void* y, void* x_panels, int vectors_per_tile, const Parallel& par);
  // dx[T, in] = dy[T, out] @ W for a 2:4 weight. vectors_per_tile is 1, 2 or 4.
  void (*semi24_backward_input)(const Semi24View& w, DType dt, const void* dy, int64_t tokens, void* dx,
                                void* dy_panels, void* dx_panels, int vectors_per_tile, const Parallel& par);
  // dvalues[r, k] = sum_t dy[t, r] * x[t, col(r, k)] at the kept positions (w.values unused);
  // dvalues_acc: [out, in / 2] in the compute dtype. vectors_per_tile is 1, 2, 4 or 8.
  void (*semi24_sddmm)(const Semi24View& w, DType dt, const void* dy, const void* x, int64_t tokens,
                       void* dvalues, void* dy_panels, void* x_panels, void* dvalues_acc, int vectors_per_tile,
                       const Parallel& par);
  // y[T, out] = x[T, in] @ W^T for a dense W [out, in] row-major and 1 <= T <= kDenseFewMaxTokens,
  // fp32 or bf16 (dense_kernels_impl.h: the lm_head at decoding steps). xbuf: tokens * in floats
  // (bf16 input is converted into it).
  void (*dense_forward_few)(const void* w, DType dt, const void* x, int64_t tokens, int64_t out, int64_t in,
                            void* y, void* xbuf, const Parallel& par);
};

const KernelTable& baseline_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

// The best table this CPU supports, or the one named by SPARSE_T5_CPU_ISA
// (baseline | avx2 | avx512), which lets tests run every variant on one machine.
const KernelTable& active_kernels();

}  // namespace cpu
}  // namespace sparse_t5
