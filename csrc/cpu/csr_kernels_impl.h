// CSR sparse-linear kernels, compiled once per instruction set.
//
// Include only from csr_kernels_<isa>.cpp, after defining SPARSE_T5_ISA_NS (the namespace that
// keeps each variant's symbols apart) and SPARSE_T5_ACC_SETS (independent accumulator sets in the
// forward loop), and after `#pragma GCC target(...)`. No standard-library templates are used here
// on purpose: see kernel_api.h for the ODR reason.
//
// Layout and loops (GUIDE §2):
//  * Activations are repacked into token-tile panels P[tile][feature][TILE] (kernel_api.h), so a
//    nonzero W[r, c] touches one contiguous run of TILE tokens: P[tile][c][0:TILE].
//  * forward: for an output row r and a token tile, acc[TILE] (in registers) += W[r,c] * X[tile][c]
//    over the row's nonzeros; one AXPY per nonzero, no index beyond the CSR itself.
//  * backward_input: dX[tile][c] += W[r,c] * dY[tile][r], scattered by column. A thread owns whole
//    token tiles of dX, so there are no atomics and no transposed copy of the index (which would
//    cost 6-8 more bytes per nonzero, GUIDE §1).
//  * sddmm: dvalues[k] = <dY[:, r], X[:, c]>, accumulated over chunks of tiles that fit in L2.
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

#if !defined(SPARSE_T5_ISA_NS) || !defined(SPARSE_T5_ISA_NAME) || !defined(SPARSE_T5_TABLE_FN)
#error "define SPARSE_T5_ISA_NS, SPARSE_T5_ISA_NAME and SPARSE_T5_TABLE_FN before including"
#endif
#ifndef SPARSE_T5_ACC_SETS
#define SPARSE_T5_ACC_SETS 1
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
__attribute__((always_inline)) inline void transpose16(V16 a[16]) {
  typedef int32_t VI __attribute__((vector_size(64)));
  const VI lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const VI hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  const VI lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const VI hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const VI lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const VI hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const VI lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const VI hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
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

template <typename T> struct IsFloat { static constexpr bool value = false; };
template <> struct IsFloat<float> { static constexpr bool value = true; };

// ---- parallel helper: lambda -> C callback --------------------------------------------------
template <typename F> void parallel_run(const Parallel& par, int64_t n, F& body) {
  if (n <= 0) return;
  par.run(n, &body, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); });
}

// ---- panels -------------------------------------------------------------------------------
// src [T, F] row-major (storage S) -> dst [ntiles][F][TILE] (compute C), zero past T.
template <typename S, typename C>
void pack_panels(const S* src, int64_t tokens, int64_t features, int64_t tile, C* dst,
                 const Parallel& par) {
  const int64_t ntiles = (tokens + tile - 1) / tile;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      C* panel = dst + item * features * tile;
      const int64_t t0 = item * tile;
      const int64_t valid = min_i64(tile, tokens - t0);
      if (valid < tile) __builtin_memset(panel, 0, sizeof(C) * features * tile);
      int64_t f_done = 0;
      if constexpr (IsFloat<S>::value) {
        // Full 16-token x 16-feature blocks: vector transpose.
        const int64_t full_t = valid / 16 * 16;
        f_done = features / 16 * 16;
        for (int64_t f0 = 0; f0 < f_done; f0 += 16) {
          for (int64_t i0 = 0; i0 < full_t; i0 += 16) {
            V16 a[16];
            for (int i = 0; i < 16; ++i) a[i] = vload<V16>(src + (t0 + i0 + i) * features + f0);
            transpose16(a);
            for (int f = 0; f < 16; ++f) vstore(panel + (f0 + f) * tile + i0, a[f]);
          }
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
          for (int64_t i0 = 0; i0 < full_t; i0 += 16) {
            V16 a[16];
            for (int f = 0; f < 16; ++f) a[f] = vload<V16>(panel + (f0 + f) * tile + i0);
            transpose16(a);
            for (int i = 0; i < 16; ++i) vstore(dst + (t0 + i0 + i) * features + f0, a[i]);
          }
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

// ---- forward: y = x W^T + b -------------------------------------------------------------------
constexpr int64_t kRowsPerBlock = 32;

template <typename S, typename I, int NV>
void csr_forward_t(const CsrView& w, const S* x, int64_t tokens, const S* bias, S* y,
                   typename ComputeOf<S>::type* xp, const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const C zero = 0;

  pack_panels<S, C>(x, tokens, in, TILE, xp, par);

  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  const int64_t nrb = (out + kRowsPerBlock - 1) / kRowsPerBlock;

  // Items run tile-major so that consecutive items of a thread reuse the same x panel.
  // (Splitting K so a panel chunk stays in L1 was tried and measured no faster at 0.5 and slower
  // at 0.95, where a row has ~1 nonzero per chunk.)
  auto body = [&](int64_t b, int64_t e) {
    C buf[kRowsPerBlock * TILE];  // the row block's outputs, [row][token]
    for (int64_t item = b; item < e; ++item) {
      const int64_t tile = item / nrb, rb = item % nrb;
      const C* panel = xp + tile * in * TILE;
      const int64_t t0 = tile * TILE;
      const int64_t valid = min_i64(TILE, tokens - t0);
      const int64_t r0 = rb * kRowsPerBlock;
      const int64_t nrows = min_i64(out - r0, kRowsPerBlock);
      for (int64_t i = 0; i < nrows; ++i) {
        // SPARSE_T5_ACC_SETS independent accumulator chains hide FMA latency (2 on AVX-512,
        // where 4 zmm chains leave half the FMA ports idle; 1 on AVX2, where 2 would spill).
        V acc[SPARSE_T5_ACC_SETS][NV];
        for (int s = 0; s < SPARSE_T5_ACC_SETS; ++s)
          for (int j = 0; j < NV; ++j) acc[s][j] = V{} + zero;
        int64_t k = row_ptr[r0 + i];
        const int64_t k_end = row_ptr[r0 + i + 1];
        for (; k + SPARSE_T5_ACC_SETS <= k_end; k += SPARSE_T5_ACC_SETS) {
          for (int s = 0; s < SPARSE_T5_ACC_SETS; ++s) {
            const C v = load_scalar(values + k + s);
            const C* xc = panel + static_cast<int64_t>(col[k + s]) * TILE;
            for (int j = 0; j < NV; ++j) acc[s][j] += v * vload<V>(xc + j * L);
          }
        }
        for (; k < k_end; ++k) {
          const C v = load_scalar(values + k);
          const C* xc = panel + static_cast<int64_t>(col[k]) * TILE;
          for (int j = 0; j < NV; ++j) acc[0][j] += v * vload<V>(xc + j * L);
        }
        for (int s = 1; s < SPARSE_T5_ACC_SETS; ++s)
          for (int j = 0; j < NV; ++j) acc[0][j] += acc[s][j];
        for (int j = 0; j < NV; ++j) vstore(buf + i * TILE + j * L, acc[0][j]);
      }
      // Epilogue, token-major: each token writes one contiguous run of the row block. (Writing
      // each row's tokens directly strides by `out`; with out = 2048 fp32 all lines of a tile
      // fall in one L1 set.)
      int64_t rows_done = 0;
      if constexpr (IsFloat<C>::value) {
        // fp32 compute (fp32 or bf16 storage): 16x16 vector transposes.
        rows_done = nrows / 16 * 16;
        for (int64_t i0 = 0; i0 < rows_done; i0 += 16) {
          C bias16[16];
          for (int i = 0; i < 16; ++i) bias16[i] = bias ? load_scalar(bias + r0 + i0 + i) : zero;
          const V16 bias_v = vload<V16>(bias16);
          for (int64_t tt = 0; tt < TILE; tt += 16) {
            if (tt >= valid) break;
            V16 a[16];
            for (int i = 0; i < 16; ++i) a[i] = vload<V16>(buf + (i0 + i) * TILE + tt);
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
          store_scalar(yrow + i, buf[i * TILE + t] + bias_r);
        }
      }
    }
  };
  parallel_run(par, ntiles * nrb, body);
}

// ---- backward input: dx = dy W ----------------------------------------------------------------
template <typename S, typename I, int NV>
void csr_backward_input_t(const CsrView& w, const S* dy, int64_t tokens, S* dx,
                          typename ComputeOf<S>::type* dyp, typename ComputeOf<S>::type* dxp,
                          const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;

  pack_panels<S, C>(dy, tokens, out, TILE, dyp, par);

  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;

  auto body = [&](int64_t b, int64_t e) {
    for (int64_t tile = b; tile < e; ++tile) {
      C* dxt = dxp + tile * in * TILE;
      __builtin_memset(dxt, 0, sizeof(C) * in * TILE);
      const C* dyt = dyp + tile * out * TILE;
      for (int64_t r = 0; r < out; ++r) {
        V g[NV];
        for (int j = 0; j < NV; ++j) g[j] = vload<V>(dyt + r * TILE + j * L);
        const int64_t k_end = row_ptr[r + 1];
        for (int64_t k = row_ptr[r]; k < k_end; ++k) {
          const C v = load_scalar(values + k);
          C* dst = dxt + static_cast<int64_t>(col[k]) * TILE;
          for (int j = 0; j < NV; ++j) vstore(dst + j * L, vload<V>(dst + j * L) + v * g[j]);
        }
      }
    }
  };
  parallel_run(par, ntiles, body);
  unpack_panels<S, C>(dxp, tokens, in, TILE, dx, par);
}

// ---- sddmm: dvalues at the nonzeros -------------------------------------------------------------
template <typename S, typename I, int NV>
void csr_sddmm_t(const CsrView& w, const S* dy, const S* x, int64_t tokens, S* dvalues,
                 typename ComputeOf<S>::type* dyp, typename ComputeOf<S>::type* xp,
                 typename ComputeOf<S>::type* acc_buf, const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const C zero = 0;

  pack_panels<S, C>(dy, tokens, out, TILE, dyp, par);
  pack_panels<S, C>(x, tokens, in, TILE, xp, par);

  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  const int64_t nrb = (out + kRowsPerBlock - 1) / kRowsPerBlock;
  // Tiles per chunk: keep the x panels a chunk reads within ~1 MiB (half a 2 MiB L2).
  const int64_t panel_bytes = in * TILE * static_cast<int64_t>(sizeof(C));
  int64_t chunk = (int64_t{1} << 20) / (panel_bytes > 0 ? panel_bytes : 1);
  if (chunk < 1) chunk = 1;

  auto body = [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb) {
      const int64_t r0 = rb * kRowsPerBlock, r1 = min_i64(out, r0 + kRowsPerBlock);
      for (int64_t k = row_ptr[r0]; k < row_ptr[r1]; ++k) acc_buf[k] = zero;
      for (int64_t c0 = 0; c0 < ntiles; c0 += chunk) {
        const int64_t c1 = min_i64(ntiles, c0 + chunk);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t k_end = row_ptr[r + 1];
          for (int64_t k = row_ptr[r]; k < k_end; ++k) {
            const int64_t c = col[k];
            V acc[NV];
            for (int j = 0; j < NV; ++j) acc[j] = V{} + zero;
            for (int64_t tile = c0; tile < c1; ++tile) {
              const C* g = dyp + (tile * out + r) * TILE;
              const C* xc = xp + (tile * in + c) * TILE;
              for (int j = 0; j < NV; ++j) acc[j] += vload<V>(g + j * L) * vload<V>(xc + j * L);
            }
            for (int j = 1; j < NV; ++j) acc[0] += acc[j];
            acc_buf[k] += hsum<C>(acc[0]);
          }
        }
      }
      for (int64_t k = row_ptr[r0]; k < row_ptr[r1]; ++k) store_scalar(dvalues + k, acc_buf[k]);
    }
  };
  parallel_run(par, nrb, body);
}

// ---- type dispatch ------------------------------------------------------------------------------
// Expands CALL once per (storage S, index I, vectors per tile NV), picking the runtime one.
#define SPARSE_T5_DISPATCH_NV(S, I, CALL) \
  switch (nv) {                           \
    case 1: { constexpr int NV = 1; CALL; } break; \
    case 2: { constexpr int NV = 2; CALL; } break; \
    default: { constexpr int NV = 4; CALL; } break; \
  }
#define SPARSE_T5_DISPATCH_IDX(S_, CALL)                                  \
  if (w.col_idx_is_int16) {                                              \
    typedef S_ S; typedef int16_t I; SPARSE_T5_DISPATCH_NV(S, I, CALL)   \
  } else {                                                               \
    typedef S_ S; typedef int32_t I; SPARSE_T5_DISPATCH_NV(S, I, CALL)   \
  }
#define SPARSE_T5_DISPATCH(CALL)                                           \
  switch (dt) {                                                           \
    case DType::kFloat32: { SPARSE_T5_DISPATCH_IDX(float, CALL) } break;  \
    case DType::kFloat64: { SPARSE_T5_DISPATCH_IDX(double, CALL) } break; \
    case DType::kBFloat16: { SPARSE_T5_DISPATCH_IDX(BF16, CALL) } break;  \
  }

void csr_forward(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias,
                 void* y, void* x_panels, int nv, const Parallel& par) {
  SPARSE_T5_DISPATCH((csr_forward_t<S, I, NV>(
      w, static_cast<const S*>(x), tokens, static_cast<const S*>(bias), static_cast<S*>(y),
      static_cast<typename ComputeOf<S>::type*>(x_panels), par)))
}

void csr_backward_input(const CsrView& w, DType dt, const void* dy, int64_t tokens, void* dx,
                        void* dy_panels, void* dx_panels, int nv, const Parallel& par) {
  SPARSE_T5_DISPATCH((csr_backward_input_t<S, I, NV>(
      w, static_cast<const S*>(dy), tokens, static_cast<S*>(dx),
      static_cast<typename ComputeOf<S>::type*>(dy_panels),
      static_cast<typename ComputeOf<S>::type*>(dx_panels), par)))
}

void csr_sddmm(const CsrView& w, DType dt, const void* dy, const void* x, int64_t tokens,
               void* dvalues, void* dy_panels, void* x_panels, void* dvalues_acc, int nv,
               const Parallel& par) {
  SPARSE_T5_DISPATCH((csr_sddmm_t<S, I, NV>(
      w, static_cast<const S*>(dy), static_cast<const S*>(x), tokens, static_cast<S*>(dvalues),
      static_cast<typename ComputeOf<S>::type*>(dy_panels),
      static_cast<typename ComputeOf<S>::type*>(x_panels),
      static_cast<typename ComputeOf<S>::type*>(dvalues_acc), par)))
}

#undef SPARSE_T5_DISPATCH
#undef SPARSE_T5_DISPATCH_IDX
#undef SPARSE_T5_DISPATCH_NV

}  // namespace

}  // namespace SPARSE_T5_ISA_NS

const KernelTable& SPARSE_T5_TABLE_FN() {
  static const KernelTable table = {SPARSE_T5_ISA_NAME, &SPARSE_T5_ISA_NS::csr_forward,
                                    &SPARSE_T5_ISA_NS::csr_backward_input,
                                    &SPARSE_T5_ISA_NS::csr_sddmm};
  return table;
}

}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
