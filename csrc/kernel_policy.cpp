// The kernel policy and the measured method tables (kernel_policy.h). Tables are rows of
// (op, dtype code, tokens, out, in, density, method) measured by benches/kernel_methods.py; a call
// takes the method of its nearest measured row of the same op and dtype, the distance taken in
// log2 of tokens, of out, of in and of density (the axes the costs scale along). Out and in are two
// axes, not one out * in: a layer and its transpose (T5's wi 3072 x 768 and wo 768 x 3072) have the
// same size but not the same costs, and with one size axis every wo call tied with the wi row and
// took the verdict of whichever came first in the table, even at wo's own measured points (2:4 dW
// at 2-16 tokens: dense, 1.06-1.41x the time of the sparse method its own row measured fastest).
// A call with no row for its op and dtype runs sparse on the CPU (the kernels every op has) and
// dense on CUDA (the vendor GEMM, which the field's measurements put ahead at recovery densities).
#include "kernel_policy.h"

#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

namespace sparse_t5 {
namespace {

enum class Policy { kAuto = 0, kSparse = 1, kDense = 2, kMkl = 3, kSparseNarrow = 4 };

struct Row {
  int64_t op, dtype;
  double log_tokens, log_out, log_in, log_density;
  Method method;
};

std::atomic<int> g_policy{static_cast<int>(Policy::kAuto)};
std::mutex g_tables_mutex;
std::map<std::string, std::vector<Row>>& tables() {
  static std::map<std::string, std::vector<Row>> t;
  return t;
}

double safe_log2(double v) { return std::log2(v > 1e-9 ? v : 1e-9); }

PolicyOp parse_op(const std::string& op) {
  static const std::map<std::string, PolicyOp> ops = {
      {"csr_linear", PolicyOp::kCsrForward},
      {"csr_linear_backward_input", PolicyOp::kCsrBackwardInput},
      {"csr_sddmm", PolicyOp::kCsrSddmm},
      {"semi24_linear", PolicyOp::kSemi24Forward},
      {"semi24_linear_backward_input", PolicyOp::kSemi24BackwardInput},
      {"semi24_sddmm", PolicyOp::kSemi24Sddmm},
  };
  auto it = ops.find(op);
  TORCH_CHECK_VALUE(it != ops.end(), "sparse_t5: unknown op for the kernel policy: ", op);
  return it->second;
}

}  // namespace

void set_kernel_policy(const std::string& policy) {
  Policy p;
  if (policy == "auto") {
    p = Policy::kAuto;
  } else if (policy == "sparse") {
    p = Policy::kSparse;
  } else if (policy == "dense") {
    p = Policy::kDense;
  } else if (policy == "mkl") {
    p = Policy::kMkl;
  } else if (policy == "sparse_narrow") {
    p = Policy::kSparseNarrow;
  } else {
    TORCH_CHECK_VALUE(false, "sparse_t5: kernel policy must be 'auto', 'sparse', 'dense', 'mkl' or 'sparse_narrow', got '",
                      policy, "'");
  }
  g_policy.store(static_cast<int>(p));
}

namespace {
// 3: on an AMD EPYC (AVX-512, 2 threads, t5-base FFN shapes, `benches/csr_few_tokens.py`, two runs)
// the few-token path (4 nonzeros a load, csrc/cpu/csr_kernels_impl.h) beat the tiled kernel at 2 and
// 3 tokens in all four cases (at 3: 0.56-0.61x against 0.70-1.09x of dense F.linear at density 0.5,
// 0.13-0.18x against 0.16-0.39x at 0.1; at 1 token 0.58-0.72x and 0.14-0.22x), tied at 4 (wins
// on 3072->768 at 0.5, ties or loses on the other three) and lost from 5-6 on, where its 2 + 4T
// loads per four nonzeros cost more than the tiled kernel's vectors. The script measures the
// crossover on another CPU; set_csr_few_tokens changes it.
constexpr int64_t kDefaultCsrFewTokens = 3;
std::atomic<int64_t> g_csr_few_tokens{kDefaultCsrFewTokens};
}  // namespace

void set_csr_few_tokens(int64_t tokens) {
  TORCH_CHECK_VALUE(tokens >= 0 && tokens <= kMaxCsrFewTokens, "sparse_t5: the CSR few-token path takes 0 to ",
                    kMaxCsrFewTokens, " tokens (0: off), got ", tokens);
  g_csr_few_tokens.store(tokens);
}

int64_t csr_few_tokens() { return g_csr_few_tokens.load(); }

namespace {
std::atomic<bool> g_csr_few_tokens_gather{false};
}  // namespace

void set_csr_few_tokens_kernel(const std::string& kernel) {
  TORCH_CHECK_VALUE(kernel == "scalar" || kernel == "gather",
                    "sparse_t5: the CSR few-token kernel must be 'scalar' or 'gather', got '", kernel, "'");
  g_csr_few_tokens_gather.store(kernel == "gather");
}

std::string csr_few_tokens_kernel() { return g_csr_few_tokens_gather.load() ? "gather" : "scalar"; }

bool csr_few_tokens_gather() { return g_csr_few_tokens_gather.load(); }

namespace {
// 256: on an AMD EPYC (AVX-512, 2 threads; `python benches/csr_dx.py`: t5-small, t5-base and
// t5-large FFN shapes and 768 x 768, density 0.5 and 0.1) the transpose took 0.67-1.14x the
// scatter's time at 256 tokens (11 of 14 cases faster), 0.56-0.87x at 512 and 0.53-0.81x at 1024;
// at 128 tokens 0.84-1.62x, its O(nnz) build not yet paid for. set_csr_dx_transpose_tokens changes it.
constexpr int64_t kDefaultCsrDxTransposeTokens = 256;
std::atomic<int64_t> g_csr_dx_transpose_tokens{kDefaultCsrDxTransposeTokens};
}  // namespace

void set_csr_dx_transpose_tokens(int64_t tokens) {
  TORCH_CHECK_VALUE(tokens >= 0, "sparse_t5: csr_dx_transpose_tokens must be >= 0 (0: off), got ", tokens);
  g_csr_dx_transpose_tokens.store(tokens);
}

int64_t csr_dx_transpose_tokens() { return g_csr_dx_transpose_tokens.load(); }

namespace {
std::atomic<int64_t> g_tile_vectors{0};
}  // namespace

void set_tile_vectors(int64_t vectors) {
  TORCH_CHECK_VALUE(vectors == 0 || vectors == 1 || vectors == 2 || vectors == 4 || vectors == 8,
                    "sparse_t5: tile_vectors must be 0 (the rules), 1, 2, 4 or 8, got ", vectors);
  g_tile_vectors.store(vectors);
}

int64_t tile_vectors() { return g_tile_vectors.load(); }

std::string get_kernel_policy() {
  switch (static_cast<Policy>(g_policy.load())) {
    case Policy::kSparse: return "sparse";
    case Policy::kDense: return "dense";
    case Policy::kMkl: return "mkl";
    case Policy::kSparseNarrow: return "sparse_narrow";
    default: return "auto";
  }
}

// table: float64 [rows, 7] = (op, dtype code, tokens, out, in, density, method 0|1|2|3); the dtype code
// is the ScalarType's integer value (torch.float32 -> 6). Replaces the device class's table.
void set_method_table(const std::string& device_class, const at::Tensor& table) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == 7, "sparse_t5: a method table must be [rows, 7], got ",
                    table.sizes());
  const at::Tensor t = table.to(at::kDouble).contiguous().cpu();
  const double* d = t.data_ptr<double>();
  std::vector<Row> rows;
  for (int64_t i = 0; i < t.size(0); ++i, d += 7) {
    // MKL and the narrow tile are methods of the CPU CSR forward only (op 0).
    const bool method_ok =
        d[6] == 0 || d[6] == 1 || ((d[6] == 2 || d[6] == 3) && d[0] == 0 && device_class == "cpu");
    TORCH_CHECK_VALUE(d[0] >= 0 && d[0] <= 5 && method_ok && d[2] >= 1 && d[3] >= 1 && d[4] >= 1 && d[5] > 0 &&
                          d[5] <= 1,
                      "sparse_t5: malformed method table row ", i);
    rows.push_back({static_cast<int64_t>(d[0]), static_cast<int64_t>(d[1]), safe_log2(d[2]), safe_log2(d[3]),
                    safe_log2(d[4]), safe_log2(d[5]), static_cast<Method>(static_cast<int>(d[6]))});
  }
  std::lock_guard<std::mutex> lock(g_tables_mutex);
  tables()[device_class] = std::move(rows);
}

std::string choose_method_op(const std::string& device_class, const std::string& op, at::ScalarType dtype,
                             int64_t tokens, int64_t out_features, int64_t in_features, double density) {
  switch (choose_method(device_class, parse_op(op), dtype, tokens, out_features, in_features, density)) {
    case Method::kDense: return "dense";
    case Method::kMkl: return "mkl";
    case Method::kSparseNarrow: return "sparse_narrow";
    default: return "sparse";
  }
}

Method choose_method(const std::string& device_class, PolicyOp op, at::ScalarType dtype, int64_t tokens,
                     int64_t out_features, int64_t in_features, double density) {
  const Policy policy = static_cast<Policy>(g_policy.load(std::memory_order_relaxed));
  if (policy == Policy::kSparse) return Method::kSparse;
  if (policy == Policy::kDense) return Method::kDense;
  if (policy == Policy::kMkl)
    return op == PolicyOp::kCsrForward && device_class == "cpu" ? Method::kMkl : Method::kSparse;
  if (policy == Policy::kSparseNarrow)
    return op == PolicyOp::kCsrForward && device_class == "cpu" ? Method::kSparseNarrow : Method::kSparse;
  const Method fallback = device_class == "cpu" ? Method::kSparse : Method::kDense;
  const double lt = safe_log2(static_cast<double>(tokens)),
               lo = safe_log2(static_cast<double>(out_features)), li = safe_log2(static_cast<double>(in_features)),
               ld = safe_log2(density);
  std::lock_guard<std::mutex> lock(g_tables_mutex);
  auto it = tables().find(device_class);
  if (it == tables().end()) return fallback;
  double best = std::numeric_limits<double>::infinity();
  Method method = fallback;
  for (const Row& r : it->second) {
    if (r.op != static_cast<int64_t>(op) || r.dtype != static_cast<int64_t>(dtype)) continue;
    const double dist = std::abs(r.log_tokens - lt) + std::abs(r.log_out - lo) + std::abs(r.log_in - li) +
                        std::abs(r.log_density - ld);
    if (dist < best) {
      best = dist;
      method = r.method;
    }
  }
  return method;
}

}  // namespace sparse_t5
