// Helpers shared by the CPU kernels (csr_kernels_impl.h, semi24_kernels_impl.h): scalar and
// vector types, the 16x16 transpose, token-tile panels and the output epilogue.
//
// Include only from kernels_<isa>.cpp, after defining SPARSE_T5_ISA_NS (the namespace that keeps
// each variant's symbols apart) and after `#pragma GCC target(...)`. No standard-library templates
// are used here on purpose: see kernel_api.h for the ODR reason.
//
#pragma once
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

#ifndef SPARSE_T5_ISA_NS
#error "define SPARSE_T5_ISA_NS before including the kernel headers (see kernels_<isa>.cpp)"
#endif

// Vector-typed helpers below have internal linkage and are always inlined, so GCC's note that a
// 64-byte vector argument has an ABI without AVX-512 does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparse_t5 {
namespace cpu {
namespace SPARSE_T5_ISA_NS {
namespace {

// ---- scalar storage types and conversions --------------------------------------------------
struct BF16 {
  uint16_t bits;
};

template <typename S> struct ComputeOf { typedef float type; };
template <> struct ComputeOf<double> { typedef double type; };

inline float load_scalar(const float* p) { return *p; }
inline double load_scalar(const double* p) { return *p; }
inline float load_scalar(const BF16* p) {
  uint32_t u = static_cast<uint32_t>(p->bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(double* p, double v) { *p = v; }
// Round to nearest even, NaN kept quiet: the same rule as c10::BFloat16.
inline void store_scalar(BF16* p, float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = static_cast<uint16_t>(u >> 16);
}

// ---- 64-byte vectors (GCC vector extensions: zmm on AVX-512, 2 ymm on AVX2, 4 xmm on SSE2) ----
template <typename C> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

template <typename V> __attribute__((always_inline)) inline V vload(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V> __attribute__((always_inline)) inline void vstore(void* p, const V& v) { __builtin_memcpy(p, &v, sizeof(V)); }
template <typename C, typename V> __attribute__((always_inline)) inline C hsum(const V& v) {
  C s = 0;
  for (int i = 0; i < Vec<C>::lanes; ++i) s += v[i];
  return s;
}

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- 16 x 16 fp32 transpose (pack, unpack and the forward epilogue all are transposes) ----------
// a[i] holds row i of a 16x16 block; afterwards a[t] holds column t. Four butterfly stages of
// two-source shuffles (vpermt2ps on AVX-512): 64 shuffles for 256 elements, against 2 scalar
// moves per element, which measured as half the forward time at sparsity 0.95.
typedef Vec<float>::type V16;
typedef int32_t VI16 __attribute__((vector_size(64)));
// Butterfly stage G (8, 4, 2, 1) of two-source shuffles: lo takes the lanes l with (l & G) == 0
// from a and the others from b shifted down by G; hi the same, shifted up. transpose16 and
// fold_lanes share them.
#define SPARSE_T5_BUTTERFLY_16                                                                    \
  const VI16 lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};                    \
  const VI16 hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};                    \
  const VI16 lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};                     \
  const VI16 hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};                   \
  const VI16 lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};                     \
  const VI16 hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};                   \
  const VI16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};                       \
  const VI16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
__attribute__((always_inline)) inline void transpose16(V16 a[16]) {
  SPARSE_T5_BUTTERFLY_16
#define SPARSE_T5_STAGE(G)                                     \
  for (int i = 0; i < 16; ++i) {                               \
    if (i & G) continue;                                       \
    const V16 lo = __builtin_shuffle(a[i], a[i + G], lo##G);   \
    const V16 hi = __builtin_shuffle(a[i], a[i + G], hi##G);   \
    a[i] = lo;                                                 \
    a[i + G] = hi;                                             \
  }
  SPARSE_T5_STAGE(1)
  SPARSE_T5_STAGE(2)
  SPARSE_T5_STAGE(4)
  SPARSE_T5_STAGE(8)
#undef SPARSE_T5_STAGE
}

// Copies the transpose of a 16 x 16 fp32 block: dst[j * dst_stride + i] = src[i * src_stride + j].
__attribute__((always_inline)) inline void transpose16_copy(const float* src, int64_t src_stride, float* dst,
                                                            int64_t dst_stride) {
  V16 a[16];
  for (int i = 0; i < 16; ++i) a[i] = vload<V16>(src + i * src_stride);
  transpose16(a);
  for (int j = 0; j < 16; ++j) vstore(dst + j * dst_stride, a[j]);
}

// Sum of all lanes of each of L vectors (L = 16 fp32 or 8 fp64), as one vector left in p[0]:
// p[0][i] = sum of the old p[i]. (Returned in place: a vector return value changes the ABI on the
// AVX2 build and GCC warns.) Each stage pairs vector i with i + n/2 and adds the two halves of every lane group: 30
// shuffles and 15 adds for 16 sums, against 16 separate horizontal sums. p is clobbered.
__attribute__((always_inline)) inline void fold_lanes(V16* p) {
  SPARSE_T5_BUTTERFLY_16
#define SPARSE_T5_FOLD(G, N) \
  for (int i = 0; i < N; ++i) p[i] = __builtin_shuffle(p[i], p[i + N], lo##G) + __builtin_shuffle(p[i], p[i + N], hi##G);
  SPARSE_T5_FOLD(8, 8)
  SPARSE_T5_FOLD(4, 4)
  SPARSE_T5_FOLD(2, 2)
  SPARSE_T5_FOLD(1, 1)
}
typedef Vec<double>::type V8D;
__attribute__((always_inline)) inline void fold_lanes(V8D* p) {
  typedef int64_t VI8 __attribute__((vector_size(64)));
  const VI8 lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
  const VI8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const VI8 lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  SPARSE_T5_FOLD(4, 4)
  SPARSE_T5_FOLD(2, 2)
  SPARSE_T5_FOLD(1, 1)
#undef SPARSE_T5_FOLD
}

template <typename T> struct IsFloat { static constexpr bool value = false; };
template <> struct IsFloat<float> { static constexpr bool value = true; };

// ---- parallel helper: lambda -> C callback --------------------------------------------------
template <typename F> void parallel_run(const Parallel& par, int64_t n, F& body) {
  if (n <= 0) return;
  par.run(n, &body, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); });
}

// ---- fp32 rows ------------------------------------------------------------------------------
// n elements as fp32 rows for the few-token paths: the input itself, or converted into `buf`
// (n floats) from bf16.
template <typename S> const float* as_fp32_rows(const S* x, int64_t n, float* buf) {
  if constexpr (IsFloat<S>::value) {
    (void)n;
    (void)buf;
    return x;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = load_scalar(x + k);
    return buf;
  }
}

// ---- panels -------------------------------------------------------------------------------
// Token tile `item` of src [T, F] row-major (storage S) -> panel [F][TILE] (compute C), zero past T.
template <typename S, typename C>
void pack_tile(const S* src, int64_t tokens, int64_t features, int64_t tile, int64_t item, C* panel) {
  const int64_t t0 = item * tile;
  const int64_t valid = min_i64(tile, tokens - t0);
  if (features == 0) return;  // an empty panel may have no storage: memset(nullptr, 0, 0) is UB
  if (valid < tile) __builtin_memset(panel, 0, sizeof(C) * features * tile);
  int64_t f_done = 0;
  if constexpr (IsFloat<S>::value) {
    // Full 16-token x 16-feature blocks: vector transpose.
    const int64_t full_t = valid / 16 * 16;
    f_done = features / 16 * 16;
    for (int64_t f0 = 0; f0 < f_done; f0 += 16) {
      for (int64_t i0 = 0; i0 < full_t; i0 += 16)
        transpose16_copy(src + (t0 + i0) * features + f0, features, panel + f0 * tile + i0, tile);
      for (int64_t i = full_t; i < valid; ++i)
        for (int64_t f = f0; f < f0 + 16; ++f) panel[f * tile + i] = src[(t0 + i) * features + f];
    }
  }
  // Blocks of 16 features keep both the source rows and the panel lines in L1.
  for (int64_t f0 = f_done; f0 < features; f0 += 16) {
    const int64_t f1 = min_i64(features, f0 + 16);
    for (int64_t i = 0; i < valid; ++i) {
      const S* row = src + (t0 + i) * features;
      for (int64_t f = f0; f < f1; ++f) panel[f * tile + i] = load_scalar(row + f);
    }
  }
}

// src [T, F] row-major (storage S) -> dst [ntiles][F][TILE] (compute C), zero past T.
template <typename S, typename C>
void pack_panels(const S* src, int64_t tokens, int64_t features, int64_t tile, C* dst,
                 const Parallel& par) {
  const int64_t ntiles = (tokens + tile - 1) / tile;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item)
      pack_tile<S, C>(src, tokens, features, tile, item, dst + item * features * tile);
  };
  parallel_run(par, ntiles, body);
}

// panels [ntiles][F][TILE] (compute C) -> dst [T, F] row-major (storage S).
template <typename S, typename C>
void unpack_panels(const C* src, int64_t tokens, int64_t features, int64_t tile, S* dst,
                   const Parallel& par) {
  const int64_t ntiles = (tokens + tile - 1) / tile;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const C* panel = src + item * features * tile;
      const int64_t t0 = item * tile;
      const int64_t valid = min_i64(tile, tokens - t0);
      int64_t f_done = 0;
      if constexpr (IsFloat<S>::value) {
        const int64_t full_t = valid / 16 * 16;
        f_done = features / 16 * 16;
        for (int64_t f0 = 0; f0 < f_done; f0 += 16) {
          for (int64_t i0 = 0; i0 < full_t; i0 += 16)
            transpose16_copy(panel + f0 * tile + i0, tile, dst + (t0 + i0) * features + f0, features);
          for (int64_t i = full_t; i < valid; ++i)
            for (int64_t f = f0; f < f0 + 16; ++f) dst[(t0 + i) * features + f] = panel[f * tile + i];
        }
      }
      for (int64_t f0 = f_done; f0 < features; f0 += 16) {
        const int64_t f1 = min_i64(features, f0 + 16);
        for (int64_t i = 0; i < valid; ++i) {
          S* row = dst + (t0 + i) * features;
          for (int64_t f = f0; f < f1; ++f) store_scalar(row + f, panel[f * tile + i]);
        }
      }
    }
  };
  parallel_run(par, ntiles, body);
}

// ---- output epilogue ---------------------------------------------------------------------------
// buf holds a block of `nrows` output rows x `tile` tokens ([row][token], compute dtype); writes
// y[t0 + t, r0 + i] = buf[i][t] + bias[r0 + i] for t < valid. Token-major, so each token writes one
// contiguous run of the block. (Writing each row's tokens directly strides by `out`; with
// out = 2048 fp32 all lines of a tile fall in one L1 set.)
template <typename S>
void store_row_block(const typename ComputeOf<S>::type* buf, int64_t tile, int64_t nrows, int64_t valid,
                     S* y, int64_t out, int64_t t0, int64_t r0, const S* bias) {
  typedef typename ComputeOf<S>::type C;
  const C zero = 0;
  int64_t rows_done = 0;
  if constexpr (IsFloat<C>::value) {
    // fp32 compute (fp32 or bf16 storage): 16x16 vector transposes.
    rows_done = nrows / 16 * 16;
    for (int64_t i0 = 0; i0 < rows_done; i0 += 16) {
      C bias16[16];
      for (int i = 0; i < 16; ++i) bias16[i] = bias ? load_scalar(bias + r0 + i0 + i) : zero;
      const V16 bias_v = vload<V16>(bias16);
      for (int64_t tt = 0; tt < tile && tt < valid; tt += 16) {
        V16 a[16];
        for (int i = 0; i < 16; ++i) a[i] = vload<V16>(buf + (i0 + i) * tile + tt);
        transpose16(a);
        const int64_t nt = min_i64(16, valid - tt);
        for (int64_t t = 0; t < nt; ++t) {
          S* yrow = y + (t0 + tt + t) * out + r0 + i0;
          const V16 v = a[t] + bias_v;
          if constexpr (IsFloat<S>::value) {
            vstore(yrow, v);
          } else {
            for (int i = 0; i < 16; ++i) store_scalar(yrow + i, v[i]);
          }
        }
      }
    }
  }
  for (int64_t t = 0; t < valid; ++t) {
    S* yrow = y + (t0 + t) * out + r0;
    for (int64_t i = rows_done; i < nrows; ++i) {
      const C bias_r = bias ? load_scalar(bias + r0 + i) : zero;
      store_scalar(yrow + i, buf[i * tile + t] + bias_r);
    }
  }
}

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
