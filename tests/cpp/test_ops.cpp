// Op-level C++ tests against libtorch: the CPU bodies match dense ATen, and every malformed input
// raises c10::Error (the TORCH_CHECKs) instead of crashing. Also run under ASan + UBSan.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>
#include <tuple>

#include "kernel_policy.h"
#include "op_common.h"
#include "ops.h"

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void expect_throws(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
    expect(false, what + ": no exception");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    expect(msg.find(needle) != std::string::npos, what + ": message lacks '" + needle + "': " + msg.substr(0, 300));
  }
}

struct Csr {
  at::Tensor values, row_ptr, col_idx, dense;
};

Csr make(int64_t out, int64_t in, double density, at::ScalarType index = at::kUInt16) {
  at::Tensor mask = at::rand({out, in}) < density;
  at::Tensor dense = at::randn({out, in}) * mask;
  at::Tensor counts = mask.sum(1);
  at::Tensor row_ptr = at::zeros({out + 1}, at::kLong);
  row_ptr.narrow(0, 1, out).copy_(counts.cumsum(0));
  at::Tensor nz = mask.nonzero();
  return {dense.index({mask}), row_ptr.to(at::kInt), nz.select(1, 1).to(index).contiguous(), dense};
}

}  // namespace

int main() {
  at::manual_seed(0);
  using sparse_t5::csr_linear_backward_input_cpu;
  using sparse_t5::csr_linear_cpu;
  using sparse_t5::csr_sddmm_cpu;

  // Correctness against dense ATen.
  for (double density : {0.0, 0.1, 0.5, 1.0}) {
    Csr w = make(77, 123, density);
    at::Tensor x = at::randn({3, 5, 123}), dy = at::randn({3, 5, 77}), bias = at::randn({77});
    at::Tensor y = csr_linear_cpu(x, w.values, w.row_ptr, w.col_idx, 77, 123, bias);
    expect(at::allclose(y, at::linear(x, w.dense, bias), 1e-5, 1e-5), "forward d=" + std::to_string(density));
    at::Tensor dx = csr_linear_backward_input_cpu(dy, w.values, w.row_ptr, w.col_idx, 77, 123);
    expect(at::allclose(dx, at::matmul(dy, w.dense), 1e-5, 1e-5), "backward_input d=" + std::to_string(density));
    at::Tensor dv = csr_sddmm_cpu(dy, x, w.row_ptr, w.col_idx, 77, 123);
    at::Tensor dW = at::matmul(dy.reshape({-1, 77}).t(), x.reshape({-1, 123}));
    expect(at::allclose(dv, dW.index({w.dense != 0}), 1e-4, 1e-4) || density == 0.0,
           "sddmm d=" + std::to_string(density));
  }

  // The tile rules (csrc/op_common.h): half the width wherever the wide tiles would have the busiest
  // thread compute at least 10% more token slots. fp32: 16 lanes, 4 vectors = 64 tokens.
  {
    using sparse_t5::narrower_where_wide_pads;
    using sparse_t5::padding_aware_vectors_per_tile;
    const auto f32 = sparse_t5::cpu::DType::kFloat32;
    const auto f64 = sparse_t5::cpu::DType::kFloat64;
    // Threads split something else (1): every slot counts. 96 tokens: 128 slots against 96; 352: 384
    // against 352 (9%, kept wide).
    for (int64_t t : {65, 96, 160, 224, 288})
      expect(padding_aware_vectors_per_tile(t, f32, 1) == 2, "1 thread, narrow at " + std::to_string(t));
    for (int64_t t : {40, 64, 128, 192, 256, 352, 1024})
      expect(padding_aware_vectors_per_tile(t, f32, 1) == 4, "1 thread, wide at " + std::to_string(t));
    for (int64_t t : {33, 48, 80})  // fp64: 8 lanes, tiles of 32 and 16 tokens
      expect(padding_aware_vectors_per_tile(t, f64, 1) == 2, "fp64, narrow at " + std::to_string(t));
    // Two threads split the tiles (the CSR dx scatter): the busiest thread's share. 80 and 96 tokens:
    // 64 slots either way; 224: 128 either way; 160 and 192: 128 against 96.
    for (int64_t t : {80, 96, 128, 224, 256, 1024})
      expect(padding_aware_vectors_per_tile(t, f32, 2) == 4, "2 threads, wide at " + std::to_string(t));
    for (int64_t t : {160, 192})
      expect(padding_aware_vectors_per_tile(t, f32, 2) == 2, "2 threads, narrow at " + std::to_string(t));
    // The CSR dW asks for 20% more slots: 80, 96 and 160 tokens (33%, 33%, 20%), not 224 or 288.
    for (int64_t t : {80, 96, 160})
      expect(padding_aware_vectors_per_tile(t, f32, 1, 20) == 2, "dW, narrow at " + std::to_string(t));
    for (int64_t t : {128, 224, 288})
      expect(padding_aware_vectors_per_tile(t, f32, 1, 20) == 4, "dW, wide at " + std::to_string(t));
    // The 2:4 dW's 8-vector tiles (128 tokens) from 256 tokens on: 4 where they pad.
    for (int64_t t : {288, 320, 400})
      expect(narrower_where_wide_pads(8, t, f32, 1) == 4, "8 vectors narrowed at " + std::to_string(t));
    for (int64_t t : {256, 384, 512, 1024})
      expect(narrower_where_wide_pads(8, t, f32, 1) == 8, "8 vectors kept at " + std::to_string(t));
    // set_tile_vectors forces a width, capped at the kernel's widest; 0 gives the rule back.
    sparse_t5::set_tile_vectors(8);
    expect(sparse_t5::tile_vectors_or_forced(2, 4) == 4 && sparse_t5::tile_vectors_or_forced(2, 8) == 8, "forced 8");
    sparse_t5::set_tile_vectors(0);
    expect(sparse_t5::tile_vectors_or_forced(2, 4) == 2, "the rule");
    expect_throws([] { sparse_t5::set_tile_vectors(3); }, "tile_vectors must be 0", "tile_vectors 3");
  }

  // The index types: uint16 (the default up to 65536 columns; t5-11b's 65536-wide FFN output reads
  // columns past 32767, which must not sign-extend), int16 (legacy checkpoints) and int32.
  for (const auto& [in, index] : {std::pair{int64_t{65536}, at::kUInt16}, std::pair{int64_t{40000}, at::kInt},
                                  std::pair{int64_t{300}, at::kShort}}) {
    Csr w = make(6, in, 0.01, index);
    at::Tensor x = at::randn({2, in}), dy = at::randn({2, 6});
    const std::string what = std::string(c10::toString(index)) + " in=" + std::to_string(in);
    expect(at::allclose(csr_linear_cpu(x, w.values, w.row_ptr, w.col_idx, 6, in, {}), at::linear(x, w.dense), 1e-4,
                        1e-4), "forward " + what);
    expect(at::allclose(csr_linear_backward_input_cpu(dy, w.values, w.row_ptr, w.col_idx, 6, in),
                        at::matmul(dy, w.dense), 1e-4, 1e-4), "backward_input " + what);
    expect(at::allclose(csr_sddmm_cpu(dy, x, w.row_ptr, w.col_idx, 6, in),
                        at::matmul(dy.t(), x).index({w.dense != 0}), 1e-4, 1e-4), "sddmm " + what);
  }
  {
    Csr wide = make(4, 40000, 0.001, at::kInt);
    at::Tensor x = at::randn({2, 40000});
    expect_throws([&] { csr_linear_cpu(x, wide.values, wide.row_ptr, wide.col_idx.to(at::kShort), 4, 40000, {}); },
                  "int16 col_idx holds at most 32768", "int16 too narrow");
    Csr wider = make(2, 65537, 0.001, at::kInt);
    expect_throws([&] { csr_linear_cpu(at::randn({2, 65537}), wider.values, wider.row_ptr,
                                       wider.col_idx.to(at::kUInt16), 2, 65537, {}); },
                  "uint16 col_idx holds at most 65536", "uint16 too narrow");
  }

  // Malformed input raises.
  Csr w = make(8, 16, 0.5);
  const int64_t nnz = w.values.size(0);
  at::Tensor x = at::randn({4, 16});
  expect_throws([&] { csr_linear_cpu(at::randn({4, 15}), w.values, w.row_ptr, w.col_idx, 8, 16, {}); },
                "features in its last dimension", "x features");
  expect_throws([&] { csr_linear_cpu(x.to(at::kDouble), w.values, w.row_ptr, w.col_idx, 8, 16, {}); },
                "does not match values dtype", "x dtype");
  expect_throws([&] { csr_linear_cpu(x.to(at::kHalf), w.values.to(at::kHalf), w.row_ptr, w.col_idx, 8, 16, {}); },
                "float32, float64 or bfloat16", "half on CPU");
  // (Edited in int32: torch implements few ops for uint16 beyond copies and indexing.)
  at::Tensor bad_col = w.col_idx.to(at::kInt);
  if (nnz > 0) bad_col[nnz - 1] = 16;
  expect_throws([&] { csr_linear_cpu(x, w.values, w.row_ptr, bad_col.to(at::kUInt16), 8, 16, {}); }, "outside",
                "col >= in");
  if (nnz > 0) bad_col[0] = -1;
  expect_throws([&] { csr_sddmm_cpu(at::randn({4, 8}), x, w.row_ptr, bad_col.to(at::kShort), 8, 16); }, "outside",
                "col < 0");
  at::Tensor bad_rp = w.row_ptr.clone();
  bad_rp[3] = nnz + 5;
  expect_throws([&] { csr_linear_cpu(x, w.values, bad_rp, w.col_idx, 8, 16, {}); }, "decreases", "row_ptr");
  expect_throws([&] { csr_linear_cpu(x, w.values, w.row_ptr.narrow(0, 0, 8), w.col_idx, 8, 16, {}); },
                "row_ptr must have shape", "row_ptr length");
  expect_throws([&] { csr_linear_cpu(x, w.values, w.row_ptr.to(at::kLong), w.col_idx, 8, 16, {}); },
                "row_ptr must be int32", "row_ptr dtype");
  expect_throws([&] { csr_linear_cpu(x, w.values.narrow(0, 0, nnz - 1), w.row_ptr, w.col_idx, 8, 16, {}); },
                "col_idx must have shape", "nnz mismatch");
  expect_throws([&] { csr_linear_cpu(x, w.values, w.row_ptr, w.col_idx, 8, 16, at::randn({9})); },
                "bias must have shape", "bias");
  expect_throws([&] { csr_linear_backward_input_cpu(at::randn({4, 9}), w.values, w.row_ptr, w.col_idx, 8, 16); },
                "features in its last dimension", "grad_out features");
  expect_throws([&] { csr_sddmm_cpu(at::randn({5, 8}), x, w.row_ptr, w.col_idx, 8, 16); },
                "same leading dimensions", "sddmm tokens");
  expect_throws([&] { csr_linear_cpu(x, w.values, w.row_ptr, w.col_idx, -1, 16, {}); }, ">= 0", "negative out");
  // The structures that reached the kernels and corrupted the heap (issue 31): a row pointer raised
  // but still monotone, and columns out of order within a row. Under every method of every op
  // ("mkl": MKL's CSR forward, whose unchecked CSR tensor must never see an unvalidated structure).
  for (const char* policy : {"sparse", "dense", "mkl"}) {
    sparse_t5::set_kernel_policy(policy);
    Csr big = make(64, 256, 0.5);  // several transient-dense panels on any thread count
    const int64_t big_nnz = big.values.size(0);
    at::Tensor xb = at::randn({5, 256}), dyb = at::randn({5, 64});
    at::Tensor reversed = big.col_idx.to(at::kInt).flip(0).to(at::kUInt16).contiguous();
    at::Tensor raised = big.row_ptr.clone();
    raised[10] = raised[10].item<int32_t>() + 3;  // moves 3 of row 10's entries into row 9: unsorted there
    at::Tensor dup = big.col_idx.to(at::kInt);
    dup[big.row_ptr[5].item<int32_t>() + 1] = dup[big.row_ptr[5].item<int32_t>()];
    dup = dup.to(at::kUInt16);
    for (const auto& [rp, ci, needle] : {std::tuple{big.row_ptr, reversed, "unsorted"},
                                          std::tuple{raised, big.col_idx, "unsorted within row 9"},
                                          std::tuple{big.row_ptr, dup, "duplicated within row 5"}}) {
      const std::string what = std::string(policy) + " " + needle;
      expect_throws([&] { csr_linear_cpu(xb, big.values, rp, ci, 64, 256, {}); }, needle, "forward " + what);
      expect_throws([&] { csr_linear_backward_input_cpu(dyb, big.values, rp, ci, 64, 256); }, needle, "dX " + what);
      expect_throws([&] { csr_sddmm_cpu(dyb, xb, rp, ci, 64, 256); }, needle, "sddmm " + what);
    }
    expect(big_nnz > 0 && at::allclose(csr_linear_cpu(xb, big.values, big.row_ptr, big.col_idx, 64, 256, {}),
                                       at::linear(xb, big.dense), 1e-5, 1e-5),
           std::string(policy) + ": well-formed after the malformed calls");
  }
  sparse_t5::set_kernel_policy("auto");

  // 2:4: correct against dense, and malformed metadata raises.
  {
    using sparse_t5::semi24_linear_cpu;
    at::Tensor values = at::randn({6, 8});
    at::Tensor meta = at::full({6, 2}, 0x94, at::kByte);  // groups: positions (0, 1) and (1, 2)
    at::Tensor dense = at::zeros({6, 16});
    for (int64_t r = 0; r < 6; ++r)
      for (int64_t g = 0; g < 4; ++g) {
        const int p0 = g % 2 == 0 ? 0 : 1, p1 = g % 2 == 0 ? 1 : 2;
        dense[r][4 * g + p0] = values[r][2 * g];
        dense[r][4 * g + p1] = values[r][2 * g + 1];
      }
    at::Tensor x2 = at::randn({5, 16});
    expect(at::allclose(semi24_linear_cpu(x2, values, meta, {}), at::linear(x2, dense), 1e-5, 1e-5), "semi24 fwd");
    at::Tensor bad = meta.clone();
    bad[2][1] = 0x33;  // positions (3, 0)
    expect_throws([&] { semi24_linear_cpu(x2, values, bad, {}); }, "malformed 2:4 meta", "semi24 meta");
    expect_throws([&] { semi24_linear_cpu(at::randn({5, 12}), values, meta, {}); }, "features in its last dimension",
                  "semi24 x");
  }

  // Dense few-token forward (the lm_head at decoding steps): every token count against at::linear, with
  // a row length that leaves a scalar tail, in fp32 and bf16; bad input raises.
  {
    using sparse_t5::dense_linear_few_tokens_cpu;
    for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
      const at::Tensor w = at::randn({37, 53}).to(dt);
      for (int64_t t = 1; t <= 16; ++t) {
        const at::Tensor xt = at::randn({t, 53}).to(dt);
        const double tol = dt == at::kFloat ? 1e-4 : 3e-2;
        expect(at::allclose(dense_linear_few_tokens_cpu(xt, w).to(at::kFloat), at::linear(xt.to(at::kFloat), w.to(at::kFloat)),
                            tol, tol),
               "dense few-token forward, " + std::to_string(t) + " tokens");
      }
    }
    const at::Tensor w = at::randn({8, 16});
    expect_throws([&] { dense_linear_few_tokens_cpu(at::randn({17, 16}), w); }, "at most 16 tokens", "dense few: 17 tokens");
    expect_throws([&] { dense_linear_few_tokens_cpu(at::randn({2, 15}), w); }, "features in its last dimension",
                  "dense few: x width");
    expect_throws([&] { dense_linear_few_tokens_cpu(at::randn({2, 16}), at::randn({16})); }, "must be 2-D",
                  "dense few: 1-D weight");
    expect_throws([&] { dense_linear_few_tokens_cpu(at::randn({2, 16}).to(at::kDouble), w.to(at::kDouble)); },
                  "float32 or bfloat16", "dense few: fp64");
    expect(dense_linear_few_tokens_cpu(at::randn({0, 16}), w).size(0) == 0, "dense few: no tokens");
  }

  std::printf("csr ops: %d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
