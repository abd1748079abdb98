// Which exact method runs a sparse op call: the sparse kernels, or "transient dense" (the weight
// decompressed for this call only, then the vendor GEMM; csrc/transient_dense.cpp), or for the CPU
// CSR forward in fp32/fp64 a third, "mkl": torch's sparse CSR matrix product (MKL's CSR GEMM on
// x86 builds) on a CSR tensor that views our values (csrc/csr_linear.cpp), and a fourth,
// "sparse_narrow": the sparse kernels with the token tile at most 2 vectors (32 fp32 tokens) where
// the tile rule (csrc/op_common.h) gives 4. Which tile wins at dense rows and many tokens differs by
// CPU and by density, so a table measured on the machine (`sparse-t5 tune`) chooses it per call.
//
// The policy is process-wide, like torch.backends flags: "auto" (the default) looks the call up in
// the measured table of this device class (sparse_t5/kernel_tables/<class>.json, installed by
// sparse_t5/kernel_policy.py at import), "sparse" and "dense" force a method. Python:
// `sparse_t5.kernel_policy(...)` and SPARSE_T5_KERNEL_POLICY. The same lookup serves the CUDA
// (Triton) bodies through the `choose_method` op, so the rule exists once.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace sparse_t5 {

enum class Method { kSparse = 0, kDense = 1, kMkl = 2, kSparseNarrow = 3 };

// Op codes of the table (and of `choose_method`'s op argument, by name).
enum class PolicyOp {
  kCsrForward = 0,
  kCsrBackwardInput = 1,
  kCsrSddmm = 2,
  kSemi24Forward = 3,
  kSemi24BackwardInput = 4,
  kSemi24Sddmm = 5,
};

// The method for one call on `device_class` ("cpu" or "cuda"): density = kept / (out * in).
Method choose_method(const std::string& device_class, PolicyOp op, at::ScalarType dtype, int64_t tokens,
                     int64_t out_features, int64_t in_features, double density);

// The ops behind sparse_t5.kernel_policy (schemas in registration.cpp).
// "auto" | "sparse" | "dense" | "mkl" | "sparse_narrow" ("mkl", "sparse_narrow": that method for the
// CPU CSR forward, every other call sparse).
void set_kernel_policy(const std::string& policy);
std::string get_kernel_policy();
// table: float64 [rows, 7] = (op code, dtype code = the ScalarType's integer value, tokens, out, in,
// density, method 0 sparse | 1 dense | 2 mkl | 3 sparse_narrow, the last two for the CPU CSR forward
// only). Replaces the device class's table.
void set_method_table(const std::string& device_class, const at::Tensor& table);
// The CPU CSR forward's few-token path (csrc/cpu/csr_kernels_impl.h, a walk along each row's
// nonzeros, four a load) serves calls of 1 to csr_few_tokens() tokens; more go to the tiled kernel.
// 0 turns it off. Process-wide, at most kMaxCsrFewTokens; the default is the crossover measured on
// CPUs of this project's machines (README "How the CSR kernels work").
constexpr int64_t kMaxCsrFewTokens = 8;
void set_csr_few_tokens(int64_t tokens);
int64_t csr_few_tokens();
// Which few-token kernel serves those calls: "scalar" (the row walk, x fetched with scalar loads,
// every ISA; the default) or "gather" (AVX-512 hardware gathers; where the active ISA has none, the
// scalar walk runs). Which wins depends on the CPU (csrc/cpu/csr_kernels_impl.h); `sparse-t5 tune`
// measures it and the tuned table sets it.
void set_csr_few_tokens_kernel(const std::string& kernel);
std::string csr_few_tokens_kernel();
bool csr_few_tokens_gather();
// The CPU CSR dx = dy W (sparse method) runs as the forward over a transient Wᵀ from
// csr_dx_transpose_tokens() tokens on, and as the scatter below that (csrc/cpu/csr_kernels_impl.h).
// 0 turns the transpose off. Process-wide; the default is the crossover measured on this project's
// machines (`python benches/csr_dx.py`).
void set_csr_dx_transpose_tokens(int64_t tokens);
int64_t csr_dx_transpose_tokens();
// Vectors per token tile for every tiled CPU kernel (forward, dx, dW of CSR and 2:4): 0 (the
// default) lets each op's rule choose (csrc/op_common.h); 1, 2, 4 or 8 forces that width wherever
// the kernel has it (8: the 2:4 dW only; the others take at most 4). Process-wide; for the A/B of
// the rules (`python benches/tile_padding.py`) and the tests that run every width.
void set_tile_vectors(int64_t vectors);
int64_t tile_vectors();
// The tiled CSR forward's shape for one call (csrc/op_common.h, csrc/cpu/csr_kernels_impl.h) by
// `method` ("sparse" or "sparse_narrow"): (vectors per token tile, panel chunks). Tests use it to
// know which path a case takes, tune to know where the two methods differ.
std::tuple<int64_t, int64_t> csr_forward_tiling(int64_t tokens, at::ScalarType dtype, int64_t nnz,
                                                int64_t out_features, int64_t in_features,
                                                const std::string& method);
// "sparse", "dense", "mkl" or "sparse_narrow" for one call under the current policy; op by schema name.
std::string choose_method_op(const std::string& device_class, const std::string& op, at::ScalarType dtype,
                             int64_t tokens, int64_t out_features, int64_t in_features, double density);

}  // namespace sparse_t5
