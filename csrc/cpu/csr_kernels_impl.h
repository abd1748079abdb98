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
// Blocking (README "How the CSR kernels work", "Panel chunks"). A token tile's panel is in x TILE
// floats (96-384 KB at t5-base shapes), beyond L1, and each nonzero reads TILE floats of it at a
// random column. An item is (token tile, block of rows). With dense enough rows (the rule and its
// figures: csr_forward_chunk_columns, kernel_api.h) the block walks the panel in chunks of
// kPanelChunkBytes (32 KB, L1-sized): every row of the block takes its nonzeros
// inside the chunk, then the next chunk, so a chunk is loaded from L2 once per block and read
// rows x density times from L1. A row's cursor (where its walk stopped) carries over from one chunk
// to the next, since columns rise within a row; the last chunk walks to the row's end, so every
// nonzero is taken exactly once whatever its column. The block's partial sums live in `buf`
// (kRowBlockBytes, so buf and a chunk fit in L1 together). Unsplit, a block is 32 rows.
constexpr int64_t kRowBlockBytes = 16 * 1024;
constexpr int64_t kMaxBlockRows = kRowBlockBytes / 64;  // a tile is at least one 64-byte vector

// Rows per block: as many as kRowBlockBytes holds, halved (down to 16) while there are fewer than
// 4 items per thread, so that few-tile calls still spread over every thread.
inline int64_t csr_forward_block_rows(int64_t tile_bytes, int64_t out, int64_t ntiles, int threads) {
  int64_t rows = kRowBlockBytes / tile_bytes;
  while (rows > 16 && ntiles * ((out + rows - 1) / rows) < 4 * static_cast<int64_t>(threads)) rows /= 2;
  return rows;
}

template <typename S, typename I, int NV>
void csr_forward_t(const CsrView& w, const S* x, int64_t tokens, const S* bias, S* y,
                   typename ComputeOf<S>::type* xp, const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  constexpr int A = SPARSE_T5_ACC_SETS;
  // buf holds an unsplit block (32 rows) and cursor a split one (kRowBlockBytes / tile bytes rows).
  static_assert(TILE * sizeof(C) >= 64 && 32 * TILE * sizeof(C) <= kRowBlockBytes, "tile size vs buf");
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const int64_t chunk = csr_forward_chunk_columns(NV, ntiles, w.nnz, out, in);
  const int64_t nchunks = (in + chunk - 1) / chunk;
  const int64_t block_rows =
      nchunks > 1 ? csr_forward_block_rows(TILE * static_cast<int64_t>(sizeof(C)), out, ntiles, par.num_threads)
                  : 32;
  const C zero = 0;

  pack_panels<S, C>(x, tokens, in, TILE, xp, par);

  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  const int64_t nrb = (out + block_rows - 1) / block_rows;

  // Items run tile-major so that consecutive items of a thread reuse the same x panel.
  auto body = [&](int64_t b, int64_t e) {
    C buf[kRowBlockBytes / sizeof(C)];  // the row block's outputs, [row][token]
    int32_t cursor[kMaxBlockRows];
    for (int64_t item = b; item < e; ++item) {
      const int64_t tile = item / nrb, rb = item % nrb;
      const C* panel = xp + tile * in * TILE;
      const int64_t t0 = tile * TILE;
      const int64_t valid = min_i64(TILE, tokens - t0);
      const int64_t r0 = rb * block_rows;
      const int64_t nrows = min_i64(out - r0, block_rows);
      for (int64_t i = 0; i < nrows; ++i) cursor[i] = row_ptr[r0 + i];
      for (int64_t j = 0; j < nchunks; ++j) {
        const bool last = j + 1 == nchunks;
        const int64_t limit = (j + 1) * chunk;  // this chunk's columns are below it
        for (int64_t i = 0; i < nrows; ++i) {
          // A independent accumulator chains hide FMA latency (SPARSE_T5_ACC_SETS: 2 on AVX-512,
          // where 4 zmm chains leave half the FMA ports idle; 1 on AVX2, where 2 would spill).
          V acc[A][NV];
          for (int s = 0; s < A; ++s)
            for (int t = 0; t < NV; ++t) acc[s][t] = V{} + zero;
          if (j > 0)
            for (int t = 0; t < NV; ++t) acc[0][t] = vload<V>(buf + i * TILE + t * L);
          int64_t k = cursor[i];
          const int64_t k_end = row_ptr[r0 + i + 1];
          // Groups of A nonzeros while the group's last column is inside the chunk (the last chunk
          // takes all of the row's rest), then one by one up to the chunk's end.
          for (; k + A <= k_end && (last || static_cast<int64_t>(col[k + A - 1]) < limit); k += A) {
            for (int s = 0; s < A; ++s) {
              const C v = load_scalar(values + k + s);
              const C* xc = panel + static_cast<int64_t>(col[k + s]) * TILE;
              for (int t = 0; t < NV; ++t) acc[s][t] += v * vload<V>(xc + t * L);
            }
          }
          for (; k < k_end && (last || static_cast<int64_t>(col[k]) < limit); ++k) {
            const C v = load_scalar(values + k);
            const C* xc = panel + static_cast<int64_t>(col[k]) * TILE;
            for (int t = 0; t < NV; ++t) acc[0][t] += v * vload<V>(xc + t * L);
          }
          cursor[i] = static_cast<int32_t>(k);
          for (int s = 1; s < A; ++s)
            for (int t = 0; t < NV; ++t) acc[0][t] += acc[s][t];
          for (int t = 0; t < NV; ++t) vstore(buf + i * TILE + t * L, acc[0][t]);
        }
      }
      store_row_block<S>(buf, TILE, nrows, valid, y, out, t0, r0, bias);
    }
  };
  parallel_run(par, ntiles * nrb, body);
}

// ---- forward for a few tokens (decoding steps) ---------------------------------------------------
// With 1 <= T <= 8 tokens (the binding's csr_few_tokens setting) a token tile is mostly padding: the
// tiled kernel above spends one 16-lane FMA (and a 64-byte panel load) per nonzero for 1 useful lane.
// This path walks each row's nonzeros four at a time: one 16-byte load of four values, one 8-byte
// load of four int16 columns (split with shifts, on the integer ports), and for each token the four
// x[t, col] from the (L1-resident) input rows, inserted into one 4-lane vector and multiplied into
// two accumulators per token (one FMA chain would be latency-bound). That is 2 + 4T loads per four
// nonzeros; the earlier walk, one scalar load each of value, column and x, took 2 + T per nonzero
// and sat at the load ports (about one nonzero a cycle on an AMD EPYC; README "Serving a pruned
// model"). Values and indices are read once per call, as a dense GEMV reads its weight once.
// Scalar loads, not hardware gathers: an earlier version loaded 16 columns and fetched x with one
// vgatherdps per token per 16 nonzeros, and on an AMD EPYC (AVX-512) that gather, not memory,
// bounded it; the scalar loop took 0.73-0.91x of its time at 1 token (fp32; bf16 0.74-1.05x) and
// 0.47-0.82x at 2-4 (old build against new in interleaved processes, t5-base FFN shapes). It needs
// no gather (GCC vector extensions: xmm on every ISA), so every ISA variant has it. Past a few
// tokens the tiled kernel's vectors win (the crossover: csrc/kernel_policy.cpp, kDefaultCsrFewTokens).
typedef float V4F __attribute__((vector_size(16)));

template <typename S>
inline V4F load4_values(const S* p) {
  if constexpr (IsFloat<S>::value) {  // one unaligned 16-byte load
    V4F v;
    __builtin_memcpy(&v, p, 16);
    return v;
  } else {  // bf16 (the few-token path takes fp32 and bf16): one 8-byte load, widened to fp32
    static_assert(sizeof(S) == 2, "load4_values takes fp32 or bf16 values");
    typedef uint16_t V4H __attribute__((vector_size(8)));
    typedef uint32_t V4U __attribute__((vector_size(16)));
    const V4U u = __builtin_convertvector(vload<V4H>(p), V4U) << 16;
    V4F v;
    __builtin_memcpy(&v, &u, 16);
    return v;
  }
}

template <typename I>
inline void load4_columns(const I* p, int64_t c[4]) {
  if constexpr (sizeof(I) == 2) {  // int16 index: one 8-byte load, split on the integer ports
    uint64_t q;
    __builtin_memcpy(&q, p, 8);
    c[0] = static_cast<int64_t>(q & 0xffffu);
    c[1] = static_cast<int64_t>((q >> 16) & 0xffffu);
    c[2] = static_cast<int64_t>((q >> 32) & 0xffffu);
    c[3] = static_cast<int64_t>(q >> 48);
  } else {
    for (int u = 0; u < 4; ++u) c[u] = static_cast<int64_t>(p[u]);  // int32 is >= 0
  }
}

// Four nonzeros (values[0..3] at columns col[0..3]) into accumulator chain h of every token.
template <typename S, typename I, int T>
__attribute__((always_inline)) inline void few_step4(const S* values, const I* col, const float* x, int64_t in,
                                                     V4F (&acc)[T][2], int h) {
  const V4F v = load4_values(values);
  int64_t c[4];
  load4_columns(col, c);
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    const float* xt = x + t * in;
    acc[t][h] += v * V4F{xt[c[0]], xt[c[1]], xt[c[2]], xt[c[3]]};
  }
}

template <typename S, typename I, int T>
void csr_forward_few_t(const CsrView& w, const float* x, const S* bias, S* y, const Parallel& par) {
  const int64_t in = w.in_features, out = w.out_features;
  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t k_end = row_ptr[r + 1];
      int64_t k = row_ptr[r];
      V4F acc[T][2] = {};  // two FMA chains per token
      for (; k + 8 <= k_end; k += 8) {
        few_step4<S, I, T>(values + k, col + k, x, in, acc, 0);
        few_step4<S, I, T>(values + k + 4, col + k + 4, x, in, acc, 1);
      }
      if (k + 4 <= k_end) {
        few_step4<S, I, T>(values + k, col + k, x, in, acc, 1);
        k += 4;
      }
      float tail[T] = {};
      for (; k < k_end; ++k) {
        const float v = load_scalar(values + k);
        const int64_t c = static_cast<int64_t>(col[k]);
        for (int t = 0; t < T; ++t) tail[t] += v * x[t * in + c];
      }
      const float b_r = bias ? load_scalar(bias + r) : 0.f;
      for (int t = 0; t < T; ++t) {
        const V4F s = acc[t][0] + acc[t][1];
        store_scalar(y + t * out + r, ((s[0] + s[1]) + (s[2] + s[3])) + (tail[t] + b_r));
      }
    }
  };
  parallel_run(par, out, body);
}

// The same with hardware gathers (AVX-512 builds): 16 values and 16 columns are loaded as vectors,
// and for each token one vgatherdps fetches x[t, col[k..k+15]], one FMA per token per 16 nonzeros,
// in two accumulators per token. Which of the two wins depends on the CPU, not the shape: on the
// AMD EPYC host the gather bounded it and the scalar walk took 0.73-0.91x of its time; on an Intel
// Xeon (AVX-512, AMX) the gather took 0.54-0.61x of the scalar walk's (a standalone C++ loop, t5-base
// FFN shapes, density 0.5 and 0.1, 1 token). Those figures are against the walk before it took four
// nonzeros a load; on the AMD host the 4-wide walk took about two thirds of that one's time at 1
// token, and it has not been timed against the gather on a Xeon. So both are built, and
// `sparse-t5 tune` measures which one this machine takes (set_csr_few_tokens_kernel;
// csrc/kernel_policy.h).
#if defined(SPARSE_T5_HAS_GATHER512)
// Software prefetch distance, in nonzeros, of the values and columns ahead of the loop. A decode
// step reads each layer's index once, from L3 or DRAM, and a loop waiting on gathers leaves the
// hardware prefetcher behind: 512 ahead took a standalone copy of this loop, cycling over 48
// t5-base 3072x768 layers so that none stays in cache, from 366-391 us to 249-250 us per layer at
// density 0.5 and from 45-46 to 36-37 at 0.1 (Intel Xeon, 2 threads; 256 ahead: 277-283 and 37-39,
// 1024: 253 and 35, 2048: 257 and 35).
constexpr int64_t kFewPrefetchAhead = 512;

template <typename S>
__attribute__((always_inline)) inline __m512 load16_values(const S* p, __mmask16 m) {
  if constexpr (IsFloat<S>::value) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {  // bf16: the high half of an fp32
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
}

template <typename I>
__attribute__((always_inline)) inline __m512i load16_cols(const I* p, __mmask16 m) {
  if constexpr (sizeof(I) == 2) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));  // uint16 zero-extends
  } else {
    return _mm512_maskz_loadu_epi32(m, p);
  }
}

template <typename S, typename I, int T>
void csr_forward_few_gather_t(const CsrView& w, const float* x, const S* bias, S* y, const Parallel& par) {
  const int64_t in = w.in_features, out = w.out_features;
  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t k_end = row_ptr[r + 1];
      int64_t k = row_ptr[r];
      __m512 acc0[T], acc1[T];
      for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
      for (; k + 32 <= k_end; k += 32) {
        // a prefetch past the arrays' end is harmless: prefetches do not fault
        _mm_prefetch(reinterpret_cast<const char*>(values + k + kFewPrefetchAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(col + k + kFewPrefetchAhead), _MM_HINT_T0);
        if constexpr (sizeof(S) == 4) _mm_prefetch(reinterpret_cast<const char*>(values + k + kFewPrefetchAhead + 16), _MM_HINT_T0);
        if constexpr (sizeof(I) == 4) _mm_prefetch(reinterpret_cast<const char*>(col + k + kFewPrefetchAhead + 16), _MM_HINT_T0);
        const __m512 v0 = load16_values(values + k, 0xFFFF), v1 = load16_values(values + k + 16, 0xFFFF);
        const __m512i c0 = load16_cols(col + k, 0xFFFF), c1 = load16_cols(col + k + 16, 0xFFFF);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          acc0[t] = _mm512_fmadd_ps(v0, _mm512_i32gather_ps(c0, x + t * in, 4), acc0[t]);
          acc1[t] = _mm512_fmadd_ps(v1, _mm512_i32gather_ps(c1, x + t * in, 4), acc1[t]);
        }
      }
      for (; k < k_end; k += 16) {  // the row's last 1-31: masked lanes read nothing
        const int n = static_cast<int>(min_i64(16, k_end - k));
        const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
        const __m512 v = load16_values(values + k, m);
        const __m512i c = load16_cols(col + k, m);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t)
          acc0[t] = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x + t * in, 4), acc0[t]);
      }
      const float b_r = bias ? load_scalar(bias + r) : 0.f;
      for (int t = 0; t < T; ++t) store_scalar(y + t * out + r, _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + b_r);
    }
  };
  parallel_run(par, out, body);
}

#endif

// Either few-token kernel over x as fp32 rows (bf16 input converted into xbuf).
template <typename S, typename I, bool Gather>
void csr_forward_few(const CsrView& w, const S* x, int64_t tokens, const S* bias, S* y, float* xbuf,
                     const Parallel& par) {
  const float* xf = as_fp32_rows(x, tokens * w.in_features, xbuf);
#if defined(SPARSE_T5_HAS_GATHER512)
#define SPARSE_T5_FEW_KERNEL(T_) (Gather ? &csr_forward_few_gather_t<S, I, T_> : &csr_forward_few_t<S, I, T_>)
#else
  static_assert(!Gather, "the gather few-token kernel is built for AVX-512 only");
#define SPARSE_T5_FEW_KERNEL(T_) (&csr_forward_few_t<S, I, T_>)
#endif
  switch (tokens) {
#define SPARSE_T5_FEW_CASE(T_) case T_: SPARSE_T5_FEW_KERNEL(T_)(w, xf, bias, y, par); break;
    SPARSE_T5_FEW_CASE(1) SPARSE_T5_FEW_CASE(2) SPARSE_T5_FEW_CASE(3) SPARSE_T5_FEW_CASE(4)
    SPARSE_T5_FEW_CASE(5) SPARSE_T5_FEW_CASE(6) SPARSE_T5_FEW_CASE(7) SPARSE_T5_FEW_CASE(8)
#undef SPARSE_T5_FEW_CASE
#undef SPARSE_T5_FEW_KERNEL
  }
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

// ---- transpose: Wᵀ as CSR, so that dx = dy W runs as the forward over Wᵀ --------------------------
// The scatter above (backward_input) stores every dx vector it updates: one store per FMA, and a
// core stores at most half as many 64-byte vectors per cycle as it loads, so it took about twice the
// forward's time (t5-base FFN at density 0.1, 512 tokens). Over Wᵀ each dx vector is summed in
// registers and stored once. The transpose is transient (built per call, freed when the op returns,
// 6 B per nonzero with a 16-bit row index), so the memory held across a step stays one index; its
// O(nnz) cost pays only with several token tiles (the binding's threshold, csr_dx_transpose_tokens).
// Rows are split into `parts` ranges of about equal nonzeros; pass 1 counts each part's columns,
// a prefix over (column, part) gives every part its own offsets, and pass 2 scatters (row, value)
// in parallel. Within a column, rows stay ascending.
template <typename S, typename I, typename J>
void csr_transpose_t(const CsrView& w, S* t_values, int32_t* t_ptr, J* t_rows, int32_t* counts,
                     int64_t parts, const Parallel& par) {
  const int64_t in = w.in_features, out = w.out_features;
  const S* values = static_cast<const S*>(w.values);
  const I* col = static_cast<const I*>(w.col_idx);
  const int32_t* row_ptr = w.row_ptr;
  const int64_t nnz = row_ptr[out];
  constexpr int64_t kMaxParts = 64;
  if (parts > kMaxParts) parts = kMaxParts;
  if (parts < 1) parts = 1;
  int64_t first_row[kMaxParts + 1];
  first_row[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {  // the first row whose nonzeros start at or past p/parts of nnz
    const int64_t target = nnz * p / parts;
    int64_t lo = first_row[p - 1], hi = out;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (row_ptr[mid] < target) lo = mid + 1; else hi = mid;
    }
    first_row[p] = lo;
  }
  first_row[parts] = out;

  auto count = [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      int32_t* cnt = counts + p * in;
      __builtin_memset(cnt, 0, sizeof(int32_t) * in);
      for (int64_t k = row_ptr[first_row[p]]; k < row_ptr[first_row[p + 1]]; ++k) ++cnt[col[k]];
    }
  };
  parallel_run(par, parts, count);
  int32_t run = 0;
  for (int64_t c = 0; c < in; ++c) {
    t_ptr[c] = run;
    for (int64_t p = 0; p < parts; ++p) {
      const int32_t n = counts[p * in + c];
      counts[p * in + c] = run;
      run += n;
    }
  }
  t_ptr[in] = run;
  auto scatter = [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      int32_t* next = counts + p * in;
      for (int64_t r = first_row[p]; r < first_row[p + 1]; ++r)
        for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k) {
          const int32_t pos = next[col[k]]++;
          t_rows[pos] = static_cast<J>(r);
          t_values[pos] = values[k];
        }
    }
  };
  parallel_run(par, parts, scatter);
}

// ---- sddmm: dvalues at the nonzeros -------------------------------------------------------------
// dvalues[k] = <dY[:, r], X[:, c]> over the tokens. Threads own blocks of 32 rows (no races on
// dvalues). Per token tile, a row's dY vectors stay in registers while its nonzeros are walked in
// batches of L: each nonzero's products over the tile's tokens form one vector, and fold_lanes
// reduces the batch's L vectors to one vector of L sums, added to the fp32/fp64 accumulators in one
// vector load and store (the semi24 sddmm's scheme). One x load per FMA. The earlier loop reduced
// every nonzero's vector on its own (a 16-lane horizontal sum per nonzero per tile chunk) and, with a
// 3072-wide input whose panel fills L2 (one tile per chunk), that sum cost more than the FMAs: dW of
// t5-base's FFN wo at density 0.1 and 512 tokens took 1.02x dense's time (README "How the CSR
// kernels work"). A row's last, partial batch is padded with zero vectors.
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
  constexpr int64_t kRowsPerBlock = 32;
  const int64_t nrb = (out + kRowsPerBlock - 1) / kRowsPerBlock;

  // Tiles outermost within a claimed range of row blocks: the tile's x panel (in x TILE values,
  // at most 768 KiB for in = 3072) is read from L2 by every row of the range.
  auto body = [&](int64_t b, int64_t e) {
    const int64_t r0 = b * kRowsPerBlock, r1 = min_i64(out, e * kRowsPerBlock);
    for (int64_t k = row_ptr[r0]; k < row_ptr[r1]; ++k) acc_buf[k] = zero;
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const C* dyt = dyp + tile * out * TILE;
      const C* xt = xp + tile * in * TILE;
      for (int64_t r = r0; r < r1; ++r) {
        int64_t k = row_ptr[r];
        const int64_t k_end = row_ptr[r + 1];
        if (k == k_end) continue;
        V d[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) d[j] = vload<V>(dyt + r * TILE + j * L);
        for (; k < k_end; k += L) {
          const int64_t n = min_i64(L, k_end - k);
          V p[L];
#pragma GCC unroll 16
          for (int q = 0; q < L; ++q) {
            if (q < n) {
              const C* xc = xt + static_cast<int64_t>(col[k + q]) * TILE;
              V a = d[0] * vload<V>(xc);
#pragma GCC unroll 8
              for (int j = 1; j < NV; ++j) a += d[j] * vload<V>(xc + j * L);
              p[q] = a;
            } else {
              p[q] = V{} + zero;
            }
          }
          fold_lanes(p);
          C* dst = acc_buf + k;
          if (n == L) {
            vstore(dst, vload<V>(dst) + p[0]);
          } else {
            for (int64_t l = 0; l < n; ++l) dst[l] += p[0][l];
          }
        }
      }
    }
    for (int64_t k = row_ptr[r0]; k < row_ptr[r1]; ++k) store_scalar(dvalues + k, acc_buf[k]);
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

// t_rows is read as uint16 when out_features <= 65536, else int32 (t_rows_16bit in the view of Wᵀ).
void csr_transpose(const CsrView& w, DType dt, void* t_values, int32_t* t_ptr, void* t_rows, int32_t* counts,
                   int64_t parts, const Parallel& par) {
#define SPARSE_T5_TRANSPOSE_J(S_, I_)                                                                    \
  if (w.out_features <= 65536)                                                                         \
    csr_transpose_t<S_, I_, uint16_t>(w, static_cast<S_*>(t_values), t_ptr, static_cast<uint16_t*>(t_rows), \
                                      counts, parts, par);                                             \
  else                                                                                                 \
    csr_transpose_t<S_, I_, int32_t>(w, static_cast<S_*>(t_values), t_ptr, static_cast<int32_t*>(t_rows), \
                                     counts, parts, par);
#define SPARSE_T5_TRANSPOSE_I(S_)               \
  if (w.col_idx_is_16bit) {                     \
    SPARSE_T5_TRANSPOSE_J(S_, uint16_t)         \
  } else {                                      \
    SPARSE_T5_TRANSPOSE_J(S_, int32_t)          \
  }
  switch (dt) {
    case DType::kFloat32: { SPARSE_T5_TRANSPOSE_I(float) } break;
    case DType::kFloat64: { SPARSE_T5_TRANSPOSE_I(double) } break;
    case DType::kBFloat16: { SPARSE_T5_TRANSPOSE_I(BF16) } break;
  }
#undef SPARSE_T5_TRANSPOSE_I
#undef SPARSE_T5_TRANSPOSE_J
}

// One entry for both few-token kernels: the scalar walk (every ISA) or, in AVX-512 builds, the gather.
template <bool Gather>
void csr_forward_few_dispatch(const CsrView& w, DType dt, const void* x, int64_t tokens, const void* bias, void* y,
                              void* xbuf, const Parallel& par) {
#define SPARSE_T5_FEW_IDX(S_)                                                                          \
  if (w.col_idx_is_16bit)                                                                              \
    csr_forward_few<S_, uint16_t, Gather>(w, static_cast<const S_*>(x), tokens, static_cast<const S_*>(bias), \
                                          static_cast<S_*>(y), static_cast<float*>(xbuf), par);        \
  else                                                                                                 \
    csr_forward_few<S_, int32_t, Gather>(w, static_cast<const S_*>(x), tokens, static_cast<const S_*>(bias), \
                                         static_cast<S_*>(y), static_cast<float*>(xbuf), par);
  if (dt == DType::kFloat32) {
    SPARSE_T5_FEW_IDX(float)
  } else if (dt == DType::kBFloat16) {
    SPARSE_T5_FEW_IDX(BF16)
  }
#undef SPARSE_T5_FEW_IDX
}

#undef SPARSE_T5_DISPATCH
#undef SPARSE_T5_DISPATCH_IDX
#undef SPARSE_T5_DISPATCH_NV

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
