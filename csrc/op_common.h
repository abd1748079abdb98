// Argument checks and workspace helpers shared by the CPU op bindings (csr_linear.cpp,
// semi24_linear.cpp). Bad input raises through TORCH_CHECK_VALUE (Python ValueError) or
// TORCH_CHECK_TYPE (TypeError); nothing unchecked reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "cpu/kernel_api.h"
#include "kernel_policy.h"

namespace sparse_t5 {

inline cpu::DType kernel_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kDouble: return cpu::DType::kFloat64;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "sparse_t5: ", what, " must be float32, float64 or bfloat16, got ",
                       t.scalar_type());
  }
  return cpu::DType::kFloat32;  // unreachable
}

inline at::ScalarType compute_dtype(cpu::DType dt) {
  return dt == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
}

inline void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparse_t5: ", what,
                    " must be on the CPU for the CPU kernel, got device ", t.device());
}

// Checks the CSR structure the kernels rely on. Column order within a row is not needed for
// memory safety and is validated by sparse_t5.formats.CSRWeight.validate instead.
inline void check_values(const at::Tensor& values) {
  check_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 1, "sparse_t5: values must be 1-D, got shape ",
                    values.sizes());
}

// Checks a [..., features] activation and returns its number of tokens (product of leading dims).
inline int64_t check_activation(const at::Tensor& t, const char* what, int64_t features,
                         const char* feature_name, at::ScalarType values_dtype) {
  check_cpu(t, what);
  TORCH_CHECK_VALUE(t.dim() >= 1, "sparse_t5: ", what, " must have at least 1 dimension");
  TORCH_CHECK_VALUE(t.size(-1) == features, "sparse_t5: ", what, " has ", t.size(-1),
                    " features in its last dimension but the weight's ", feature_name, " is ",
                    features, " (", what, " shape ", t.sizes(), ")");
  TORCH_CHECK_TYPE(t.scalar_type() == values_dtype, "sparse_t5: ", what, " dtype ",
                   t.scalar_type(), " does not match values dtype ", values_dtype);
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) tokens *= t.size(d);
  return tokens;
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// Vectors (of 64 bytes) per token tile. Wider tiles amortise the per-nonzero index load; narrower
// ones waste less padding on few tokens. `min_tiles` asks for enough tiles to keep every thread
// busy when tiles are the only parallel axis (backward_input).
inline int vectors_per_tile(int64_t tokens, cpu::DType dt, int64_t min_tiles) {
  const int64_t lanes = cpu::lanes_for(dt);
  for (int nv : {4, 2}) {
    const int64_t tile = nv * lanes;
    if (tokens > (nv / 2) * lanes && (tokens + tile - 1) / tile >= min_tiles) return nv;
  }
  return 1;
}

// Token slots the busiest thread computes with tiles of `tile` tokens, padding included: all of
// them where threads split something else (rows; (tile, input chunk) items): threads = 1; its
// share of the tiles where threads split the tiles (the CSR dx scatter): threads = its threads.
inline int64_t busiest_thread_slots(int64_t tokens, int64_t tile, int64_t threads) {
  const int64_t tiles = (tokens + tile - 1) / tile;
  return (tiles + threads - 1) / threads * tile;
}

// Every nonzero computes a whole tile, padding included, so a kernel takes half its `wide` width
// wherever the wide tiles would have the busiest thread compute at least `excess_percent` more
// token slots (96 fp32 tokens, 1 thread: 128 slots in two 64-token tiles against 96 in three of
// 32, 33% more). 10% is past the wide tile's largest measured gain at equal slots (the Xeon's 2-9%
// in the CSR forward, csr_forward_vectors_per_tile below).
inline int narrower_where_wide_pads(int wide, int64_t tokens, cpu::DType dt, int64_t threads,
                                    int excess_percent = 10) {
  const int64_t lanes = cpu::lanes_for(dt);
  return 100 * busiest_thread_slots(tokens, wide * lanes, threads) >=
                 (100 + excess_percent) * busiest_thread_slots(tokens, wide / 2 * lanes, threads)
             ? wide / 2
             : wide;
}

// vectors_per_tile, with 2 vectors wherever 4-vector tiles pad (narrower_where_wide_pads): the
// forwards (CSR and 2:4), the dx kernels (the 2:4 dx; the CSR dx scatter, whose threads split the
// tiles, with threads = its threads) and the CSR dW, which asks for 20% more slots: each of its
// tiles ends in a lane fold per 16 nonzeros, which narrower tiles repeat. Measured on an AMD EPYC
// (AVX-512, 2 threads, fp32, t5-base FFN and 768x768, density 0.1 and 0.5, alternating calls;
// `python benches/tile_padding.py`; README "Padding in the token tile" and "... backward tiles"):
//   forwards, 3072 inputs x 768 outputs, density 0.1-0.7: 2 vectors took 0.73-0.88x of the 4-vector
//   time at 96-288 tokens against 0.87-1.01x at 128, 192 and 256;
//   2:4 dx: 0.82-0.95x at 96, 160, 224 and 288 tokens against 1.04-1.13x at 128 and 256;
//   CSR dx scatter, 2 threads: 0.80-0.90x at 160 tokens (busiest thread 128 slots against 96);
//   at 224 (128 against 128) 0.98-1.23x, and at 80-96 (64 against 64) 0.73-1.21x, so the rule
//   counts the busiest thread's slots, not all of them;
//   CSR dW: 0.75-0.93x at 80 and 96 tokens (33% more slots), 0.84-0.98x at 160 (20%), but
//   0.86-1.18x at 224 and 288 (14% and 11%), against 1.03-1.18x at 128.
inline int padding_aware_vectors_per_tile(int64_t tokens, cpu::DType dt, int64_t threads,
                                          int excess_percent = 10) {
  const int nv = vectors_per_tile(tokens, dt, threads);
  return nv == 4 ? narrower_where_wide_pads(4, tokens, dt, threads, excess_percent) : nv;
}

// The width a kernel runs: the rule's `nv`, or set_tile_vectors' (kernel_policy.h) where set,
// capped at the kernel's widest instance.
inline int tile_vectors_or_forced(int nv, int widest) {
  const int64_t forced = tile_vectors();
  return forced == 0 ? nv : static_cast<int>(std::min<int64_t>(forced, widest));
}

// Tile width for the tiled CSR forward (also dX over a transient Wᵀ). With short rows (at most
// 256 nonzeros per row on average) 2 vectors (32 fp32 tokens) beat 4: on an AMD EPYC (AVX-512,
// 2 threads) the 2-vector tile took 0.84-0.93x of the 4-vector tile's time at in_features 512-1024
// and density 0.05-0.2 (t5-base/t5-large FFN and attention shapes, 64-1024 tokens, fp32 and bf16),
// and 0.93-1.04x at 2048-4096 inputs. Past ~300 nonzeros per row the wide tile wins by 3-9%
// (density 0.5 at in_features 768-4096), so the rule keys on nonzeros per row, the quantity both
// findings share. README "How the CSR kernels work" has the table.
// Denser rows at in_features <= 1024 take 2 vectors too when that tile walks the panel in chunks
// (cpu::csr_forward_chunk_columns): on an Intel Xeon (AVX-512, 2 threads, fp32, 64-1024 tokens,
// two runs against the 4-vector tile) that took 0.83-0.97x of the time at 768x768, 3072x768,
// 1024x1024 and 4096x1024, density 0.4-0.7; at in_features 3072 the same took 1.02-1.09x (not
// taken there). README "Panel chunks" has the table.
inline int csr_forward_vectors_per_tile(int64_t tokens, cpu::DType dt, int64_t nnz, int64_t rows, int64_t in) {
  const int nv = padding_aware_vectors_per_tile(tokens, dt, 1);
  if (nv != 4) return nv;
  if (nnz <= 256 * rows) return 2;
  const int64_t tiles = (tokens + 2 * cpu::lanes_for(dt) - 1) / (2 * cpu::lanes_for(dt));
  return in <= 1024 && cpu::csr_forward_chunk_columns(2, tiles, nnz, rows, in) < in ? 2 : 4;
}

// The "sparse_narrow" method of the forward (kernel_policy.h): the rule's tile, at most 2 vectors.
// Where the rule gives 4 (dense rows at in_features > 1024, or unchunked), an AMD EPYC (AVX-512,
// 2 threads, fp32, 768x3072, alternating calls) took 0.77-0.94x of the 4-vector time with 2 at
// density 0.5 and 512-2048 tokens, but 1.02-1.21x at 64-256 tokens and 1.16-1.34x at density 0.8:
// not one rule, so the machine's own table chooses it per call.
inline int csr_forward_method_vectors(bool narrow, int64_t tokens, cpu::DType dt, int64_t nnz, int64_t rows,
                                      int64_t in) {
  const int nv = csr_forward_vectors_per_tile(tokens, dt, nnz, rows, in);
  return tile_vectors_or_forced(narrow && nv > 2 ? 2 : nv, 4);
}

inline at::Tensor panels(int64_t tokens, int64_t features, int nv, cpu::DType dt) {
  const int64_t tile = nv * cpu::lanes_for(dt);
  return at::empty({cpu::panel_elements(tokens, features, tile)},
                   at::TensorOptions().dtype(compute_dtype(dt)));
}

// Whether the kernels read col_idx as uint16_t (else int32): uint16, or int16 (what checkpoints
// before uint16 hold; valid ones are >= 0 and < 32768, so the bits read the same).
inline bool is_16bit_index(const at::Tensor& col_idx) {
  return col_idx.scalar_type() == at::kUInt16 || col_idx.scalar_type() == at::kShort;
}

// The kernels' view of a CSR weight (csr_linear.cpp); values may be undefined (the sddmm reads
// only the structure).
inline cpu::CsrView csr_view(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             int64_t out_features, int64_t in_features) {
  cpu::CsrView w;
  w.values = values.defined() ? values.data_ptr() : nullptr;
  w.row_ptr = row_ptr.data_ptr<int32_t>();
  w.col_idx = col_idx.data_ptr();
  w.col_idx_is_16bit = is_16bit_index(col_idx);
  w.out_features = out_features;
  w.in_features = in_features;
  w.nnz = col_idx.size(0);
  return w;
}

}  // namespace sparse_t5
