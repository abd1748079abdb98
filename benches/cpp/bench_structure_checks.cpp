// What the structure checks cost inside the op, without Python and the dispatcher around them
// (issue 31; benches/structure_checks.py measures the same from Python, op by op). Built by CMake
// (not a test: it measures), run as
//   build-cpp/bench_structure_checks
// For the t5-base FFN weights at densities 0.5 and 0.1 and 2:4, it times:
//   - the check on the default path (the structure remembered: a lookup), per call;
//   - the full O(nnz) check ("every_call"), per call;
//   - the CSR / 2:4 forward at 1 and 512 tokens, the op the checks guard;
// and prints each check as a fraction of the op, in one run.
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "ops.h"
#include "structure_checks.h"

namespace {

double seconds_per_call(const std::function<void()>& f, int calls) {
  f();  // warm up (and, for the default path, remember the structure)
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls;
}

// op(x) runs the guarded op on activations x [tokens, in].
void report(const char* name, int64_t in, const std::function<void()>& check,
            const std::function<void(const at::Tensor&)>& op) {
  sparse_t5::set_structure_checks("once");
  const double cached = seconds_per_call(check, 200000);
  sparse_t5::set_structure_checks("every_call");
  const double full = seconds_per_call(check, 200);
  sparse_t5::set_structure_checks("once");
  for (int64_t tokens : {1, 512}) {
    const at::Tensor x = at::randn({tokens, in});
    const double t = seconds_per_call([&] { op(x); }, tokens == 1 ? 2000 : 20);
    std::printf("%-22s %6lld tokens: op %9.1f us | default-path check %7.3f us (%6.3f%%) | full check %8.1f us (%5.1f%%)\n",
                name, static_cast<long long>(tokens), t * 1e6, cached * 1e6, 100 * cached / t, full * 1e6,
                100 * full / t);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t shapes[2][2] = {{3072, 768}, {768, 3072}};  // t5-base FFN wi, wo
  for (const auto& shape : shapes) {
    const int64_t out = shape[0], in = shape[1];
    for (double density : {0.5, 0.1}) {
      at::Tensor mask = at::rand({out, in}) < density;
      at::Tensor row_ptr = at::zeros({out + 1}, at::kLong);
      row_ptr.narrow(0, 1, out).copy_(mask.sum(1).cumsum(0));
      row_ptr = row_ptr.to(at::kInt);
      at::Tensor col_idx = mask.nonzero().select(1, 1).to(at::kShort).contiguous();
      at::Tensor values = at::randn({col_idx.size(0)});
      char name[64];
      std::snprintf(name, sizeof name, "CSR %.1f %lldx%lld", density, static_cast<long long>(out),
                    static_cast<long long>(in));
      report(
          name, in, [&] { sparse_t5::check_csr_structure(values.size(0), row_ptr, col_idx, out, in); },
          [&](const at::Tensor& x) { sparse_t5::csr_linear_cpu(x, values, row_ptr, col_idx, out, in, {}); });
    }
    // 2:4: the first two of every four inputs kept (a valid pattern; the check reads every nibble).
    at::Tensor meta = at::full({out, (in / 4 + 1) / 2}, 0x44, at::kByte);  // nibble 0b0100: positions 0, 1
    at::Tensor values24 = at::randn({out, in / 2});
    char name[64];
    std::snprintf(name, sizeof name, "2:4 %lldx%lld", static_cast<long long>(out), static_cast<long long>(in));
    report(
        name, in, [&] { sparse_t5::check_semi24_meta(meta, out, in); },
        [&](const at::Tensor& x) { sparse_t5::semi24_linear_cpu(x, values24, meta, {}); });
  }
  return 0;
}
