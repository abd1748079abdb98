// CSR sparse-linear kernels, compiled once per instruction set (see kernels_<isa>.cpp).
//
// Layout and loops (README "How the CSR kernels work"):
//  * Activations are repacked into token-tile panels P[tile][feature][TILE] (kernel_api.h), so a
//    nonzero W[r, c] touches one contiguous run of TILE tokens: P[tile][c][0:TILE].
//  * forward: for an output row r and a token tile, acc[TILE] (in registers) += W[r,c] * X[tile][c]
//    over the row's nonzeros; one AXPY per nonzero, no index beyond the CSR itself.
//  * backward_input: dX[tile][c] += W[r,c] * dY[tile][r], scattered by column. A thread owns whole
//    token tiles of dX, so there are no atomics and no transposed copy of the index (which would
//    cost 6-8 more bytes per nonzero: README "How the CSR kernels work").
//  * sddmm: dvalues[k] = <dY[:, r], X[:, c]>, accumulated over chunks of tiles that fit in L2.
#pragma once
#include "common_impl.h"

#ifndef SPARSE_T5_ACC_SETS
#define SPARSE_T5_ACC_SETS 1
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparse_t5 {
namespace cpu {
namespace SPARSE_T5_ISA_NS {
namespace {
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
      store_row_block<S>(buf, TILE, nrows, valid, y, out, t0, r0, bias);
    }
  };
  parallel_run(par, ntiles * nrb, body);
}

// ---- forward for a few tokens (decoding steps) ---------------------------------------------------
// With 1 <= T <= 8 tokens (the binding's csr_few_tokens setting) a token tile is mostly padding: the tiled kernel above spends one
// 16-lane FMA (and a 64-byte panel load) per nonzero for 1 useful lane, and its per-row FMA chain
// is latency-bound. This path vectorises across a row's nonzeros instead: 16 values and 16 column
// indices are loaded once, and for each token one hardware gather fetches x[t, col[k..k+15]] from
// the (L1-resident) input row, one FMA per token per 16 nonzeros. Values and indices are read once
// per call, as a dense GEMV reads its weight once: 6 bytes per kept weight (16-bit index) against
// dense's 4 per weight. fold_lanes then sums 16 rows' accumulators at once. Built where a gather is
// one instruction (AVX-512 vgatherdps, AVX2 two ymm gathers); elsewhere the tiled kernel runs.
#if defined(SPARSE_T5_GATHER)

typedef uint16_t VS16 __attribute__((vector_size(32)));  // 16 uint16 column indices (zero-extended below)

// x[idx[l]] for lanes l < n, 0 elsewhere (the masked lanes read nothing).
__attribute__((always_inline)) inline V16 gather16(const float* x, const VI16& idx, int n) {
#if SPARSE_T5_GATHER == 512
  const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
  __m512i i;
  __builtin_memcpy(&i, &idx, 64);
  const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i, x, 4);
  V16 r;
  __builtin_memcpy(&r, &g, 64);
  return r;
#else
  const VI16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const VI16 live = lane < (VI16{} + n);  // all ones where l < n
  __m256i i0, i1, m0, m1;
  __builtin_memcpy(&i0, &idx, 32);
  __builtin_memcpy(&i1, reinterpret_cast<const char*>(&idx) + 32, 32);
  __builtin_memcpy(&m0, &live, 32);
  __builtin_memcpy(&m1, reinterpret_cast<const char*>(&live) + 32, 32);
  const __m256 z = _mm256_setzero_ps();
  const __m256 g0 = _mm256_mask_i32gather_ps(z, x, i0, _mm256_castsi256_ps(m0), 4);
  const __m256 g1 = _mm256_mask_i32gather_ps(z, x, i1, _mm256_castsi256_ps(m1), 4);
  V16 r;
  __builtin_memcpy(&r, &g0, 32);
  __builtin_memcpy(reinterpret_cast<char*>(&r) + 32, &g1, 32);
  return r;
#endif
}

template <typename S, typename I>
__attribute__((always_inline)) inline void load16(const S* values, const I* col, int64_t k, int n, V16& v, VI16& c) {
  if (n == 16) {
    if constexpr (IsFloat<S>::value) {
      v = vload<V16>(values + k);
    } else {
      float f[16];
      for (int l = 0; l < 16; ++l) f[l] = load_scalar(values + k + l);
      v = vload<V16>(f);
    }
    if constexpr (sizeof(I) == 2) {
      c = __builtin_convertvector(vload<VS16>(col + k), VI16);
    } else {
      c = vload<VI16>(col + k);
    }
    return;
  }
  // The row's last, partial chunk: zero-padded copies (never a read past the row's arrays).
  float f[16] = {0};
  int32_t ci[16] = {0};
  for (int l = 0; l < n; ++l) {
    f[l] = load_scalar(values + k + l);
    ci[l] = static_cast<int32_t>(col[k + l]);
  }
  v = vload<V16>(f);
  c = vload<VI16>(ci);
}

template <typename S, typename I, int T>
void csr_forward_few_t(const CsrView& w, const float* x, const S* bias, S* y, const Parallel& par) {
  const int64_t in = w.in_features, out = w.out_features;
  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  const int64_t nrb = (out + 15) / 16;
  auto body = [&](int64_t b, int64_t e) {
    V16 p[T][16];
    for (int64_t rb = b; rb < e; ++rb) {
      const int64_t r0 = rb * 16, nrows = min_i64(16, out - r0);
      for (int64_t i = 0; i < 16; ++i) {
        // Two accumulators per token (even and odd chunks, unrolled so that both stay in
        // registers) hide the FMA latency at T = 1.
        V16 acc0[T], acc1[T];
        for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = V16{};
        if (i < nrows) {
          const int64_t k_end = row_ptr[r0 + i + 1];
          int64_t k = row_ptr[r0 + i];
          for (; k + 32 <= k_end; k += 32) {
            V16 v0, v1;
            VI16 c0, c1;
            load16<S, I>(values, col, k, 16, v0, c0);
            load16<S, I>(values, col, k + 16, 16, v1, c1);
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) {
              acc0[t] += v0 * gather16(x + t * in, c0, 16);
              acc1[t] += v1 * gather16(x + t * in, c1, 16);
            }
          }
          for (; k < k_end; k += 16) {
            const int n = static_cast<int>(min_i64(16, k_end - k));
            V16 v;
            VI16 c;
            load16<S, I>(values, col, k, n, v, c);
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) acc0[t] += v * gather16(x + t * in, c, n);
          }
        }
        for (int t = 0; t < T; ++t) p[t][i] = acc0[t] + acc1[t];
      }
      for (int t = 0; t < T; ++t) {
        fold_lanes(p[t]);
        for (int64_t i = 0; i < nrows; ++i) {
          const float b_i = bias ? load_scalar(bias + r0 + i) : 0.f;
          store_scalar(y + t * out + r0 + i, p[t][0][i] + b_i);
        }
      }
    }
  };
  parallel_run(par, nrb, body);
}

template <typename S, typename I>
void csr_forward_few(const CsrView& w, const S* x, int64_t tokens, const S* bias, S* y, float* xbuf,
                     const Parallel& par) {
  const float* xf = as_fp32_rows(x, tokens * w.in_features, xbuf);
  switch (tokens) {
#define SPARSE_T5_FEW_CASE(T_) case T_: csr_forward_few_t<S, I, T_>(w, xf, bias, y, par); break;
    SPARSE_T5_FEW_CASE(1) SPARSE_T5_FEW_CASE(2) SPARSE_T5_FEW_CASE(3) SPARSE_T5_FEW_CASE(4)
    SPARSE_T5_FEW_CASE(5) SPARSE_T5_FEW_CASE(6) SPARSE_T5_FEW_CASE(7) SPARSE_T5_FEW_CASE(8)
#undef SPARSE_T5_FEW_CASE
  }
}
#endif

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
  if (w.col_idx_is_16bit) {                                              \
    typedef S_ S; typedef uint16_t I; SPARSE_T5_DISPATCH_NV(S, I, CALL)  \
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

#if defined(SPARSE_T5_GATHER)
void csr_forward_few_entry(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias, void* y,
                           void* xbuf, const Parallel& par) {
#define SPARSE_T5_FEW_IDX(S_)                                                                          \
  if (w.col_idx_is_16bit)                                                                              \
    csr_forward_few<S_, uint16_t>(w, static_cast<const S_*>(x), tokens, static_cast<const S_*>(bias),    \
                                 static_cast<S_*>(y), static_cast<float*>(xbuf), par);                 \
  else                                                                                                 \
    csr_forward_few<S_, int32_t>(w, static_cast<const S_*>(x), tokens, static_cast<const S_*>(bias),    \
                                 static_cast<S_*>(y), static_cast<float*>(xbuf), par);
  if (dt == DType::kFloat32) {
    SPARSE_T5_FEW_IDX(float)
  } else if (dt == DType::kBFloat16) {
    SPARSE_T5_FEW_IDX(BF16)
  }
#undef SPARSE_T5_FEW_IDX
}
#endif

#undef SPARSE_T5_DISPATCH
#undef SPARSE_T5_DISPATCH_IDX
#undef SPARSE_T5_DISPATCH_NV

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
