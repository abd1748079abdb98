// The structure checks of the sparse weight formats (CSR and 2:4), shared by every CPU op body
// (csr_linear.cpp, semi24_linear.cpp). The kernels index x, dX and their panels through these
// structures, so a malformed one would write out of bounds; these checks make it a ValueError.
//
// What is checked (README "Bad input"):
//   CSR:  row_ptr[0] == 0, row_ptr non-decreasing, row_ptr[-1] == nnz, and within each row the
//         columns strictly increasing and inside [0, in_features). Sorted, unique columns are
//         needed for memory safety, not just for a canonical form: the transient-dense panels
//         (transient_dense.cpp) binary-search each row for its first column of a panel and write
//         at column - c0, which is negative for a column out of order (issue 31: that write is
//         what corrupted the heap).
//   2:4:  every nibble names two distinct positions in increasing order, and the unused high
//         nibble of an odd last group is 0.
//
// Cost, and the one path that skips the O(nnz) part: a full check reads the whole index, about
// as many bytes as the product itself reads at one token. So a structure that passed is
// remembered, and a later call with the same structure skips the O(nnz) part. "The same" means
// the same storage (held by a weak reference, so its address cannot be reused by another
// tensor while remembered), data pointer, offset, sizes and autograd version counter. Every
// in-place write through the tensor or any of its views bumps that counter (also under no_grad
// and in inference mode), so such a write is always checked again. Not seen: writes that bypass
// the counter (through `.data`, a numpy or DLPack view, or _unsafe_set_version). For those,
// set_structure_checks("every_call") checks every call. Inference tensors have no version counter
// and are checked on every call. Measured: benches/structure_checks.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace sparse_t5 {

// CSR structure of an [out_features, in_features] weight with nnz kept values. Checks dtypes,
// devices and shapes on every call, the index contents once per structure (above).
void check_csr_structure(int64_t nnz, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                         int64_t out_features, int64_t in_features);

// 2:4 metadata [out, ceil(in / 8)] uint8 of an [out, in] weight; same caching.
void check_semi24_meta(const at::Tensor& meta, int64_t out, int64_t in);

// "once" (the default): the O(nnz) checks run once per structure, as above. "every_call": always.
void set_structure_checks(const std::string& mode);
std::string get_structure_checks();

// Forget every remembered structure (tests, and the benchmark's every-call rows).
void clear_validated_structures();

}  // namespace sparse_t5
