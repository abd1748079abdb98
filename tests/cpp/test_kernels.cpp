// Torch-free unit tests of the CSR and 2:4 kernels: every instruction-set variant this CPU runs, against a
// naive dense reference, on awkward shapes (partial tiles, empty rows, one token, all-zero, dense).
// Run by ctest, also under ASan + UBSan (CMakeLists.txt, SPARSE_T5_SANITIZE=ON).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernel_api.h"

using namespace sparse_t5::cpu;

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      ++g_failures;                                       \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
    }                                                     \
  } while (0)

// A real two-thread Parallel, so the sanitizers see the kernels' threading too.
void run_two_threads(int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
  const int64_t half = n / 2;
  std::thread t([&] { body(ctx, half, n); });
  if (half > 0) body(ctx, 0, half);
  t.join();
}

struct Case {
  int64_t tokens, in, out;
  double density;
  bool empty_rows;
};

template <typename T>
struct Csr {
  std::vector<T> values;
  std::vector<int32_t> row_ptr;
  std::vector<uint16_t> col16;  // the 16-bit index is read unsigned: widths up to 65536
  std::vector<int32_t> col32;
  std::vector<double> dense;  // [out, in], zeros off the pattern
};

template <typename T>
Csr<T> make_csr(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(0.0, 1.0), v(-1.0, 1.0);
  Csr<T> w;
  w.dense.assign(c.out * c.in, 0.0);
  w.row_ptr.push_back(0);
  for (int64_t r = 0; r < c.out; ++r) {
    const bool empty = c.empty_rows && r % 3 == 1;
    for (int64_t col = 0; col < c.in; ++col) {
      if (!empty && u(rng) < c.density) {
        const T val = static_cast<T>(v(rng));
        w.values.push_back(val);
        w.col16.push_back(static_cast<uint16_t>(col));
        w.col32.push_back(static_cast<int32_t>(col));
        w.dense[r * c.in + col] = static_cast<double>(val);
      }
    }
    w.row_ptr.push_back(static_cast<int32_t>(w.values.size()));
  }
  return w;
}

template <typename T>
double rel_err(const std::vector<T>& got, const std::vector<double>& want) {
  double scale = 1e-30, err = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::fmax(scale, std::fabs(want[i]));
    err = std::fmax(err, std::fabs(static_cast<double>(got[i]) - want[i]));
  }
  return err / scale;
}

template <typename T>
void check_case(const KernelTable& k, const Case& c, bool idx16, std::mt19937& rng) {
  const DType dt = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  Csr<T> w = make_csr<T>(c, rng);
  std::uniform_real_distribution<double> v(-1.0, 1.0);
  std::vector<T> x(c.tokens * c.in), dy(c.tokens * c.out), bias(c.out);
  for (auto& e : x) e = static_cast<T>(v(rng));
  for (auto& e : dy) e = static_cast<T>(v(rng));
  for (auto& e : bias) e = static_cast<T>(v(rng));

  CsrView view;
  view.values = w.values.data();
  view.row_ptr = w.row_ptr.data();
  view.col_idx = idx16 ? static_cast<const void*>(w.col16.data()) : w.col32.data();
  view.col_idx_is_16bit = idx16;
  view.out_features = c.out;
  view.in_features = c.in;
  view.nnz = static_cast<int64_t>(w.values.size());
  Parallel par{&run_two_threads, 2};

  // Dense references in double.
  std::vector<double> y_ref(c.tokens * c.out), dx_ref(c.tokens * c.in, 0.0), dv_ref(w.values.size());
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int64_t r = 0; r < c.out; ++r) {
      double s = static_cast<double>(bias[r]);
      for (int64_t i = 0; i < c.in; ++i) s += w.dense[r * c.in + i] * static_cast<double>(x[t * c.in + i]);
      y_ref[t * c.out + r] = s;
      for (int64_t i = 0; i < c.in; ++i)
        dx_ref[t * c.in + i] += static_cast<double>(dy[t * c.out + r]) * w.dense[r * c.in + i];
    }
  for (int64_t r = 0; r < c.out; ++r)
    for (int32_t kk = w.row_ptr[r]; kk < w.row_ptr[r + 1]; ++kk) {
      double s = 0;
      for (int64_t t = 0; t < c.tokens; ++t)
        s += static_cast<double>(dy[t * c.out + r]) * static_cast<double>(x[t * c.in + w.col32[kk]]);
      dv_ref[kk] = s;
    }

  for (int nv : {1, 2, 4}) {
    const int64_t tile = nv * lanes_for(dt);
    std::vector<T> y(c.tokens * c.out, T(-7)), dx(c.tokens * c.in, T(-7)), dv(w.values.size(), T(-7));
    std::vector<T> xp(panel_elements(c.tokens, c.in, tile)), dyp(panel_elements(c.tokens, c.out, tile));
    std::vector<T> dxp(panel_elements(c.tokens, c.in, tile)), acc(w.values.size());
    k.csr_forward(view, dt, x.data(), c.tokens, bias.data(), y.data(), xp.data(), nv, par);
    k.csr_backward_input(view, dt, dy.data(), c.tokens, dx.data(), dyp.data(), dxp.data(), nv, par);
    k.csr_sddmm(view, dt, dy.data(), x.data(), c.tokens, dv.data(), dyp.data(), xp.data(), acc.data(), nv, par);
    const std::string what = std::string(k.name) + (sizeof(T) == 8 ? " f64" : " f32") +
                             (idx16 ? " u16" : " i32") + " nv=" + std::to_string(nv) +
                             " T=" + std::to_string(c.tokens) + " in=" + std::to_string(c.in) +
                             " out=" + std::to_string(c.out) + " d=" + std::to_string(c.density);
    EXPECT(rel_err(y, y_ref) <= tol, "forward %s: rel err %g", what.c_str(), rel_err(y, y_ref));
    EXPECT(rel_err(dx, dx_ref) <= tol, "backward_input %s: rel err %g", what.c_str(), rel_err(dx, dx_ref));
    EXPECT(rel_err(dv, dv_ref) <= tol, "sddmm %s: rel err %g", what.c_str(), rel_err(dv, dv_ref));
  }
  // dx as the forward over the transient transpose (csr_transpose, then csr_forward of Wᵀ), with
  // 1 and 3 row parts. The transpose is checked entry by entry against the dense matrix too.
  if (c.tokens >= 1) {
    for (int64_t parts : {1, 3}) {
      const size_t nnz = w.values.size();
      std::vector<T> tv(nnz + 1);
      std::vector<int32_t> tp(c.in + 1), counts(parts * c.in + 1);
      std::vector<uint16_t> tr(nnz + 1);  // out <= 65536 in every case here
      k.csr_transpose(view, dt, tv.data(), tp.data(), tr.data(), counts.data(), parts, par);
      bool ok = tp[0] == 0 && tp[c.in] == static_cast<int32_t>(nnz);
      for (int64_t col = 0; ok && col < c.in; ++col)
        for (int32_t q = tp[col]; ok && q < tp[col + 1]; ++q)
          ok = (q == tp[col] || tr[q] > tr[q - 1]) &&
               w.dense[static_cast<int64_t>(tr[q]) * c.in + col] == static_cast<double>(tv[q]);
      EXPECT(ok, "transpose %s %s parts=%lld: wrong entries", k.name, idx16 ? "u16" : "i32",
             static_cast<long long>(parts));
      CsrView wt;
      wt.values = tv.data();
      wt.row_ptr = tp.data();
      wt.col_idx = tr.data();
      wt.col_idx_is_16bit = true;
      wt.out_features = c.in;
      wt.in_features = c.out;
      wt.nnz = static_cast<int64_t>(nnz);
      std::vector<T> dx(c.tokens * c.in, T(-7)), dyp(panel_elements(c.tokens, c.out, 4 * lanes_for(dt)));
      k.csr_forward(wt, dt, dy.data(), c.tokens, nullptr, dx.data(), dyp.data(), 4, par);
      EXPECT(rel_err(dx, dx_ref) <= tol, "backward_input by transpose %s %s T=%lld: rel err %g", k.name,
             idx16 ? "u16" : "i32", static_cast<long long>(c.tokens), rel_err(dx, dx_ref));
    }
  }
  // The few-token forward (every variant has one): fp32 here (bf16: tests/test_csr_linear.py).
  if (sizeof(T) == 4 && c.tokens >= 1 && c.tokens <= 8) {
    std::vector<T> y(c.tokens * c.out, T(-7));
    k.csr_forward_few(view, dt, x.data(), c.tokens, bias.data(), y.data(), nullptr, par);
    EXPECT(rel_err(y, y_ref) <= tol, "forward_few %s %s T=%lld: rel err %g", k.name, idx16 ? "u16" : "i32",
           static_cast<long long>(c.tokens), rel_err(y, y_ref));
    if (k.csr_forward_few_gather) {  // AVX-512's gather kernel (the others have none)
      std::vector<T> yg(c.tokens * c.out, T(-7));
      k.csr_forward_few_gather(view, dt, x.data(), c.tokens, bias.data(), yg.data(), nullptr, par);
      EXPECT(rel_err(yg, y_ref) <= tol, "forward_few_gather %s %s T=%lld: rel err %g", k.name,
             idx16 ? "u16" : "i32", static_cast<long long>(c.tokens), rel_err(yg, y_ref));
    }
  }
}

// 2:4: pack a random 2-of-4 pattern, run the forward, dx and dvalues kernels at every tile width,
// compare with the dense reference. (300, 1028, 20): several L1 chunks, an odd group count (257)
// and a partial 128-token tile; (0, 16, 8): no tokens.
template <typename T>
void check_semi24(const KernelTable& k, int64_t tokens, int64_t in, int64_t out, std::mt19937& rng) {
  const DType dt = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::uniform_real_distribution<double> v(-1.0, 1.0);
  std::uniform_int_distribution<int> pick(0, 5);
  static const int kPairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  const int64_t groups = in / 4, width = (groups + 1) / 2;
  std::vector<T> values(out * in / 2), x(tokens * in), y(tokens * out, T(-7)), bias(out);
  std::vector<uint8_t> meta(out * width, 0);
  std::vector<double> dense(out * in, 0.0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int* p = kPairs[pick(rng)];
      meta[r * width + g / 2] |= static_cast<uint8_t>((p[0] | (p[1] << 2)) << ((g & 1) * 4));
      for (int j = 0; j < 2; ++j) {
        const T val = static_cast<T>(v(rng));
        values[r * in / 2 + 2 * g + j] = val;
        dense[r * in + 4 * g + p[j]] = static_cast<double>(val);
      }
    }
  for (auto& e : x) e = static_cast<T>(v(rng));
  for (auto& e : bias) e = static_cast<T>(v(rng));
  std::vector<double> ref(tokens * out);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < out; ++r) {
      double s = static_cast<double>(bias[r]);
      for (int64_t i = 0; i < in; ++i) s += dense[r * in + i] * static_cast<double>(x[t * in + i]);
      ref[t * out + r] = s;
    }
  Semi24View w{values.data(), meta.data(), out, in};
  Parallel par{&run_two_threads, 2};
  for (int nv : {1, 2, 4}) {
    std::vector<T> xp(panel_elements(tokens, in, nv * lanes_for(dt)));
    std::fill(y.begin(), y.end(), T(-7));
    k.semi24_forward(w, dt, x.data(), tokens, bias.data(), y.data(), xp.data(), nv, par);
    EXPECT(rel_err(y, ref) <= tol, "semi24 %s nv=%d T=%ld in=%ld out=%ld: rel err %g", k.name, nv, (long)tokens,
           (long)in, (long)out, rel_err(y, ref));
  }
  // Backward: dx = dy W and dvalues = (dy^T x) at the kept positions.
  std::vector<T> dy(tokens * out), dx(tokens * in, T(-7)), dv(out * in / 2, T(-7));
  for (auto& e : dy) e = static_cast<T>(v(rng));
  std::vector<double> dx_ref(tokens * in, 0.0), dv_ref(out * in / 2, 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < out; ++r)
      for (int64_t i = 0; i < in; ++i) dx_ref[t * in + i] += static_cast<double>(dy[t * out + r]) * dense[r * in + i];
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned nib = (meta[r * width + g / 2] >> ((g & 1) * 4)) & 0xFu;
      for (int j = 0; j < 2; ++j) {
        const int64_t col = 4 * g + (j == 0 ? (nib & 3u) : (nib >> 2));
        double s = 0.0;
        for (int64_t t = 0; t < tokens; ++t) s += static_cast<double>(dy[t * out + r]) * static_cast<double>(x[t * in + col]);
        dv_ref[r * in / 2 + 2 * g + j] = s;
      }
    }
  for (int nv : {1, 2, 4}) {
    const int64_t tile = nv * lanes_for(dt);
    std::vector<T> dyp(panel_elements(tokens, out, tile)), dxp(panel_elements(tokens, in, tile));
    std::fill(dx.begin(), dx.end(), T(-7));
    k.semi24_backward_input(w, dt, dy.data(), tokens, dx.data(), dyp.data(), dxp.data(), nv, par);
    EXPECT(rel_err(dx, dx_ref) <= tol, "semi24 dx %s nv=%d T=%ld in=%ld out=%ld: rel err %g", k.name, nv,
           (long)tokens, (long)in, (long)out, rel_err(dx, dx_ref));
  }
  Semi24View structure{nullptr, meta.data(), out, in};  // the sddmm must not read values
  for (int nv : {1, 2, 4, 8}) {
    const int64_t tile = nv * lanes_for(dt);
    std::vector<T> dyp(panel_elements(tokens, out, tile)), xp(panel_elements(tokens, in, tile)), acc(out * in / 2);
    std::fill(dv.begin(), dv.end(), T(-7));
    k.semi24_sddmm(structure, dt, dy.data(), x.data(), tokens, dv.data(), dyp.data(), xp.data(), acc.data(), nv, par);
    EXPECT(rel_err(dv, dv_ref) <= tol, "semi24 sddmm %s nv=%d T=%ld in=%ld out=%ld: rel err %g", k.name, nv,
           (long)tokens, (long)in, (long)out, rel_err(dv, dv_ref));
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      {5, 123, 77, 0.5, false},  {1, 64, 16, 0.3, false},  {33, 17, 35, 0.1, true},
      {130, 48, 40, 1.0, false}, {70, 80, 64, 0.0, false}, {64, 256, 32, 0.05, true},
      {17, 1, 9, 0.7, false},    {0, 8, 8, 0.5, false},   {3, 200, 40, 0.4, true},
      {8, 37, 70, 0.9, true},
      // Panel chunks (kernel_api.h, csr_forward_chunk_columns): 3 chunks of 256 columns at nv=2 and
      // 6 of 128 at nv=4 (2 token tiles each), the last partial, beside empty rows; then 5 at nv=2.
      {70, 700, 24, 0.9, true}, {40, 1028, 12, 0.5, false},
      // t5-11b's FFN output width: columns past 32767 must not read as negative (sign-extended).
      {3, 65536, 4, 0.002, true}, {20, 40000, 3, 0.003, false},
  };
  std::vector<const KernelTable*> tables = {&baseline_kernels()};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&avx2_kernels());
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    tables.push_back(&avx512_kernels());
#endif
  int checked = 0;
  for (const KernelTable* k : tables) {
    for (const Case& c : cases) {
      for (bool idx16 : {true, false}) {
        check_case<float>(*k, c, idx16, rng);
        check_case<double>(*k, c, idx16, rng);
        checked += 2;
      }
    }
    for (const int64_t* c : {(const int64_t[]){5, 124, 77}, (const int64_t[]){70, 64, 40},
                             (const int64_t[]){1, 32, 33}, (const int64_t[]){130, 4, 9},
                             (const int64_t[]){300, 1028, 20}, (const int64_t[]){0, 16, 8}}) {
      check_semi24<float>(*k, c[0], c[1], c[2], rng);
      check_semi24<double>(*k, c[0], c[1], c[2], rng);
      checked += 2;
    }
    std::printf("variant %s checked\n", k->name);
  }
  std::printf("%d cases x 3 tile widths, %d failures\n", checked, g_failures);
  return g_failures == 0 ? 0 : 1;
}
