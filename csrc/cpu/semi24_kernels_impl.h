// 2:4 semi-structured sparse-linear kernels (forward, dx, dvalues), compiled once per instruction
// set (kernels_<isa>.cpp).
//
// Layout (kernel_api.h, Semi24View): values [out, in/2]; meta [out, ceil(in/8)] bytes, one nibble
// per group of 4 inputs (group g in byte g/2, low nibble for even g): bits 0-1 = first kept
// position, bits 2-3 = second, first < second.
//
// Forward loop: a block of R output rows walks the groups in order, so the 4 x-panel rows of a group
// (4 * TILE floats) stay in L1 while all R rows use them; the R x NV accumulators stay in
// registers. The CSR kernel instead reads random columns of the whole panel from L2 for every row,
// which is what kept it at ~0.6x dense at 50% density. Per (row, group): one nibble decode, two
// broadcasts and 2 x NV FMAs with the x loads folded in.
//
// The backward kernels (below the forward) read the metadata the same way (position_offset) and
// keep the same L1 chunking: dx scatters into a chunk of the dX panel, dvalues folds per-token-
// tile dot products. All three walk token panels made by pack_panels (common_impl.h).
#pragma once
#include "common_impl.h"

#ifndef SPARSE_T5_24_ROWS
#define SPARSE_T5_24_ROWS 2
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparse_t5 {
namespace cpu {
namespace SPARSE_T5_ISA_NS {
namespace {

constexpr int64_t k24RowsPerBlock = 32;  // rows per epilogue block (a multiple of SPARSE_T5_24_ROWS)

// Byte offset, within a group's 4 panel rows, of the position held in 2-bit field `field` (0-3) of
// `bits` (a metadata byte or nibble), for panel rows of 2^kRowShift bytes. The field is shifted
// straight to its place and masked: two ops, where shift-mask-multiply was three or four.
template <unsigned kRowShift, int field>
__attribute__((always_inline)) inline unsigned position_offset(unsigned bits) {
  static_assert(kRowShift >= 6, "panel rows are at least one 64-byte vector");
  return (bits << (kRowShift - 2 * field)) & (3u << kRowShift);
}
template <typename C, int64_t TILE> constexpr unsigned panel_row_shift() {
  static_assert((TILE * sizeof(C) & (TILE * sizeof(C) - 1)) == 0, "panel rows must be a power of two bytes");
  return __builtin_ctzll(TILE * sizeof(C));
}

// out_buf[i] (i < R) (+)= values * x over groups [g0, g1), for rows r0 .. r0 + R - 1; the first
// chunk (g0 == 0) starts from zero, later ones add to the partial sums in out_buf.
template <typename S, int NV, int R>
__attribute__((always_inline)) inline void semi24_rows(const S* values, const uint8_t* meta, int64_t in,
                                                        int64_t meta_stride, int64_t r0, int64_t g0, int64_t g1,
                                                        const typename ComputeOf<S>::type* panel,
                                                        typename ComputeOf<S>::type* out_buf) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  const C zero = 0;
  const int64_t half = in / 2;
  // The row and vector loops must unroll fully, or the accumulators live on the stack (measured:
  // without the pragmas GCC kept the 8-row loop and spilled every FMA, 0.6x dense).
  V acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = g0 == 0 ? V{} + zero : vload<V>(out_buf + i * TILE + j * L);
  // Two groups per step: one metadata byte per row, decoded with constant shifts (a shift by a
  // register costs several uops on x86 and was paid per row and group). Measured at 512 tokens, 2
  // threads, against dense in the same process: the position_offset decode and the pointer
  // barrier below together took 512->2048 from 1.0-1.2x to 1.2-1.3x.
  constexpr unsigned kShift = panel_row_shift<C, TILE>();
  constexpr int64_t kGroupBytes = 4 * TILE * sizeof(C);
  // Per-row metadata and value pointers advance with the loop: indexing both from r and g left
  // GCC short of general registers (it parked pointers in xmm registers and recomputed g / 2 per
  // row); measured ~3% faster.
  int64_t g = g0;
  const uint8_t* mp[R];
  const S* vp[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    mp[i] = meta + (r0 + i) * meta_stride + (g0 >> 1);
    vp[i] = values + (r0 + i) * half + 2 * g0;
  }
  const char* xg = reinterpret_cast<const char*>(panel + 4 * g0 * TILE);
  for (; g + 1 < g1; g += 2, xg += 2 * kGroupBytes) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const unsigned byte = *mp[i]++;
      const S* val = vp[i];
      vp[i] += 4;
      const C* xa = reinterpret_cast<const C*>(xg + position_offset<kShift, 0>(byte));
      const C* xb = reinterpret_cast<const C*>(xg + position_offset<kShift, 1>(byte));
      const C* xc = reinterpret_cast<const C*>(xg + kGroupBytes + position_offset<kShift, 2>(byte));
      const C* xd = reinterpret_cast<const C*>(xg + kGroupBytes + position_offset<kShift, 3>(byte));
      // Materialise each pointer in a register. Otherwise GCC folds the offset into a base + index
      // address in every FMA, and x86 splits such memory-operand FMAs into two uops: measured 5%
      // slower on one core and ~20% slower with both cores busy.
      asm volatile("" : "+r"(xa), "+r"(xb), "+r"(xc), "+r"(xd));
      const C va = load_scalar(val), vb = load_scalar(val + 1), vc = load_scalar(val + 2), vd = load_scalar(val + 3);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += va * vload<V>(xa + j * L);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += vb * vload<V>(xb + j * L);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += vc * vload<V>(xc + j * L);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += vd * vload<V>(xd + j * L);
    }
  }
  if (g < g1) {  // an odd last group (g0 is always even: chunks hold an even count): a low nibble
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const unsigned nib = *mp[i] & 0xFu;
      const C* x0 = reinterpret_cast<const C*>(xg + position_offset<kShift, 0>(nib));
      const C* x1 = reinterpret_cast<const C*>(xg + position_offset<kShift, 1>(nib));
      const C v0 = load_scalar(vp[i]), v1 = load_scalar(vp[i] + 1);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += v0 * vload<V>(x0 + j * L);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += v1 * vload<V>(x1 + j * L);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) vstore(out_buf + i * TILE + j * L, acc[i][j]);
}

template <typename S, int NV>
void semi24_forward_t(const Semi24View& w, const S* x, int64_t tokens, const S* bias, S* y,
                      typename ComputeOf<S>::type* xp, const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  // Rows per register block: R x NV accumulators (16 zmm on AVX-512: 8 rows x 2 or 4 rows x 4).
  // Measured at t5-small/base FFN shapes, 512 tokens, before the position_offset decode: 4 x 4
  // (64-token tiles) 0.74-1.02x dense, 8 x 2 0.71-0.83x, 2 x 8 (128-token tiles) 0.5-0.65x. After
  // it, 128-token tiles with 2 or 3 rows measured within 3% of 4 x 4, so 4 x 4 stays.
  constexpr int R = NV >= 4 ? (SPARSE_T5_24_ROWS / 2 > 0 ? SPARSE_T5_24_ROWS / 2 : 1) : SPARSE_T5_24_ROWS;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const int64_t meta_stride = semi24_meta_width(in);
  const int64_t groups = in / 4;
  // 24 KB: measured 1.13-1.25x dense at 16 KB, 1.19-1.30x at 24 KB and no better at 32 KB on a
  // 48 KB L1; 24 KB still leaves room for the value and metadata streams on a 32 KB L1.
  constexpr int64_t kChunkBytes = 24 * 1024;
  constexpr int64_t GC = kChunkBytes / (4 * TILE * static_cast<int64_t>(sizeof(C)));
  static_assert(GC % 2 == 0, "chunks must start at an even group: semi24_rows decodes a byte per group pair");
  const S* values = static_cast<const S*>(w.values);
  const int64_t nrb = (out + k24RowsPerBlock - 1) / k24RowsPerBlock;

  // With at least one token tile per thread, each thread packs the tile it is about to use into
  // its own panel (in * TILE, a few hundred KB, so it stays in L2), instead of one packing pass
  // over all tiles first whose panels went out to memory and came back: measured 5-10% faster on
  // 2048->512, where x is 4 MB. The private panels are carved from the x_panels workspace (it
  // holds ntiles >= threads panels). With fewer tiles than threads, threads share tiles: pack all.
  const int64_t items = ntiles * nrb;
  const int64_t threads = par.num_threads > 1 ? par.num_threads : 1;
  const bool private_panels = ntiles >= threads;
  if (!private_panels) pack_panels<S, C>(x, tokens, in, TILE, xp, par);
  // Items run tile-major, so a range of items touches each of its tiles once, in order.
  auto run_items = [&](int64_t b, int64_t e, C* own_panel) {
    C buf[k24RowsPerBlock * TILE];
    int64_t packed = -1;
    for (int64_t item = b; item < e; ++item) {
      const int64_t tile = item / nrb, rb = item % nrb;
      const C* panel = xp + tile * in * TILE;
      if (own_panel != nullptr) {
        if (tile != packed) pack_tile<S, C>(x, tokens, in, TILE, tile, own_panel);
        packed = tile;
        panel = own_panel;
      }
      const int64_t t0 = tile * TILE;
      const int64_t valid = min_i64(TILE, tokens - t0);
      const int64_t r0 = rb * k24RowsPerBlock;
      const int64_t nrows = min_i64(out - r0, k24RowsPerBlock);
      // Chunks of GC groups (4 * GC panel rows, kChunkBytes) stay in L1 while all rows of the block
      // use them: the panel is read from L2 once per 32-row block instead of once per R rows
      // (measured: once per R rows needed ~32 bytes of L2 per FMA and ran at 0.65-0.75x dense).
      for (int64_t g0 = 0; g0 < groups || g0 == 0; g0 += GC) {
        const int64_t g1 = min_i64(groups, g0 + GC);
        int64_t i = 0;
        for (; i + R <= nrows; i += R)
          semi24_rows<S, NV, R>(values, w.meta, in, meta_stride, r0 + i, g0, g1, panel, buf + i * TILE);
        for (; i < nrows; ++i)
          semi24_rows<S, NV, 1>(values, w.meta, in, meta_stride, r0 + i, g0, g1, panel, buf + i * TILE);
        if (g1 >= groups) break;
      }
      store_row_block<S>(buf, TILE, nrows, valid, y, out, t0, r0, bias);
    }
  };
  if (private_panels) {
    const int64_t per = (items + threads - 1) / threads;
    auto body = [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) run_items(c * per, min_i64(items, (c + 1) * per), xp + c * in * TILE);
    };
    parallel_run(par, threads, body);
  } else {
    auto body = [&](int64_t b, int64_t e) { run_items(b, e, nullptr); };
    parallel_run(par, items, body);
  }
}

// ---- forward for a few tokens (decoding steps) -----------------------------------------------------
// With T <= kFewTokens tokens a token tile is mostly padding (the tiled kernel computes 16 tokens
// for 1), so this path vectorises over the inputs instead: per row and 32 inputs (8 groups, 16
// kept values, 4 metadata bytes), the 16 metadata fields become a two-source permute index that
// gathers the kept inputs of each token from two registers, and one FMA per token accumulates 16
// products; fold_lanes then sums 16 rows at once. Values are read once per call, as a dense GEMV
// reads its weight once: 2.125 bytes per weight against 4. Built only where a two-source permute
// is one instruction (AVX-512 vpermt2ps); elsewhere the tiled kernel runs.
#ifdef SPARSE_T5_HAS_PERMUTE2
constexpr int64_t kFewTokens = 8;

template <typename S, int T>
void semi24_forward_few_t(const Semi24View& w, const float* x, const S* bias, S* y, const Parallel& par) {
  typedef Vec<float>::type V;
  typedef int32_t VI __attribute__((vector_size(64)));
  const int64_t in = w.in_features, out = w.out_features, half = in / 2, groups = in / 4;
  const int64_t meta_stride = semi24_meta_width(in);
  const int64_t blocks = in / 32;
  const S* values = static_cast<const S*>(w.values);
  const VI shifts = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const VI base = {0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28};
  const VI three = VI{} + 3;
  const int64_t nrb = (out + 15) / 16;
  auto body = [&](int64_t b, int64_t e) {
    V p[T][16];
    float tail[T][16];
    for (int64_t rb = b; rb < e; ++rb) {
      const int64_t r0 = rb * 16, nrows = min_i64(16, out - r0);
      for (int64_t i = 0; i < 16; ++i) {
        V acc[T];
        for (int t = 0; t < T; ++t) acc[t] = V{};
        for (int t = 0; t < T; ++t) tail[t][i] = 0.f;
        if (i >= nrows) {
          for (int t = 0; t < T; ++t) p[t][i] = acc[t];
          continue;
        }
        const int64_t r = r0 + i;
        const S* vrow = values + r * half;
        const uint8_t* mrow = w.meta + r * meta_stride;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          V vals;
          if constexpr (IsFloat<S>::value) {
            vals = vload<V>(vrow + 16 * blk);
          } else {
            float v16[16];
            for (int l = 0; l < 16; ++l) v16[l] = load_scalar(vrow + 16 * blk + l);
            vals = vload<V>(v16);
          }
          uint32_t word;
          __builtin_memcpy(&word, mrow + 4 * blk, 4);
          const VI idx = (((VI{} + static_cast<int32_t>(word)) >> shifts) & three) + base;
          const float* xb = x + 32 * blk;
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
            acc[t] += vals * __builtin_shuffle(vload<V>(xb + t * in), vload<V>(xb + t * in + 16), idx);
        }
        for (int64_t g = 8 * blocks; g < groups; ++g) {  // in % 32 != 0: the last groups one by one
          const unsigned nib = (mrow[g >> 1] >> ((g & 1) * 4)) & 0xFu;
          const float v0 = load_scalar(vrow + 2 * g), v1 = load_scalar(vrow + 2 * g + 1);
          for (int t = 0; t < T; ++t)
            tail[t][i] += v0 * x[t * in + 4 * g + (nib & 3u)] + v1 * x[t * in + 4 * g + (nib >> 2)];
        }
        for (int t = 0; t < T; ++t) p[t][i] = acc[t];
      }
      for (int t = 0; t < T; ++t) {
        fold_lanes(p[t]);
        for (int64_t i = 0; i < nrows; ++i) {
          const float b_i = bias ? load_scalar(bias + r0 + i) : 0.f;
          store_scalar(y + t * out + r0 + i, p[t][0][i] + tail[t][i] + b_i);
        }
      }
    }
  };
  parallel_run(par, nrb, body);
}

// x as fp32 rows (as_fp32_rows), then the kernel instantiated for this token count.
template <typename S>
void semi24_forward_few(const Semi24View& w, const S* x, int64_t tokens, const S* bias, S* y, float* xbuf,
                        const Parallel& par) {
  const float* xf = as_fp32_rows(x, tokens * w.in_features, xbuf);
  switch (tokens) {
#define SPARSE_T5_FEW_CASE(T_) case T_: semi24_forward_few_t<S, T_>(w, xf, bias, y, par); break;
    SPARSE_T5_FEW_CASE(1) SPARSE_T5_FEW_CASE(2) SPARSE_T5_FEW_CASE(3) SPARSE_T5_FEW_CASE(4)
    SPARSE_T5_FEW_CASE(5) SPARSE_T5_FEW_CASE(6) SPARSE_T5_FEW_CASE(7) SPARSE_T5_FEW_CASE(8)
#undef SPARSE_T5_FEW_CASE
  }
}
#endif

// ---- backward input: dx = dy W ------------------------------------------------------------------
// Scatter form: each kept value adds v * dY[:, r] into dX's panel row of its input. Items are
// (token tile, chunk of groups), so a thread's destination chunk (24 KB of the dX panel) stays in
// L1 while every row of W adds into it, and items write disjoint parts of dX (no atomics; with one
// token tile the chunks still spread over threads). The CSR kernel this replaces scattered over
// the whole dX tile in L2 and decoded the metadata into a transient column index first.
template <typename S, int NV>
void semi24_backward_input_t(const Semi24View& w, const S* dy, int64_t tokens, S* dx,
                             typename ComputeOf<S>::type* dyp, typename ComputeOf<S>::type* dxp,
                             const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const int64_t meta_stride = semi24_meta_width(in);
  const int64_t groups = in / 4, half = in / 2;
  constexpr unsigned kShift = panel_row_shift<C, TILE>();
  constexpr int64_t kGroupBytes = 4 * TILE * sizeof(C);
  constexpr int64_t kChunkBytes = 24 * 1024;  // as in the forward
  constexpr int64_t GC = kChunkBytes / kGroupBytes;
  static_assert(GC % 2 == 0, "chunks must start at an even group: a metadata byte holds a group pair");
  const int64_t nchunks = (groups + GC - 1) / GC;
  pack_panels<S, C>(dy, tokens, out, TILE, dyp, par);
  const S* values = static_cast<const S*>(w.values);

  auto body = [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t tile = item / nchunks, g0 = (item % nchunks) * GC, g1 = min_i64(groups, g0 + GC);
      C* dxc = dxp + tile * in * TILE + 4 * g0 * TILE;
      __builtin_memset(dxc, 0, sizeof(C) * 4 * (g1 - g0) * TILE);
      const C* dyt = dyp + tile * out * TILE;
      char* base = reinterpret_cast<char*>(dxp + tile * in * TILE);
      for (int64_t r = 0; r < out; ++r) {
        V d[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) d[j] = vload<V>(dyt + r * TILE + j * L);
        const uint8_t* m = w.meta + r * meta_stride;
        const S* val = values + r * half;
        int64_t g = g0;
        for (; g + 1 < g1; g += 2) {
          const unsigned byte = m[g >> 1];
          char* xg = base + g * kGroupBytes;
          C* xa = reinterpret_cast<C*>(xg + position_offset<kShift, 0>(byte));
          C* xb = reinterpret_cast<C*>(xg + position_offset<kShift, 1>(byte));
          C* xc = reinterpret_cast<C*>(xg + kGroupBytes + position_offset<kShift, 2>(byte));
          C* xd = reinterpret_cast<C*>(xg + kGroupBytes + position_offset<kShift, 3>(byte));
          asm volatile("" : "+r"(xa), "+r"(xb), "+r"(xc), "+r"(xd));  // see semi24_rows
          const C va = load_scalar(val + 2 * g), vb = load_scalar(val + 2 * g + 1);
          const C vc = load_scalar(val + 2 * g + 2), vd = load_scalar(val + 2 * g + 3);
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) vstore(xa + j * L, vload<V>(xa + j * L) + va * d[j]);
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) vstore(xb + j * L, vload<V>(xb + j * L) + vb * d[j]);
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) vstore(xc + j * L, vload<V>(xc + j * L) + vc * d[j]);
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) vstore(xd + j * L, vload<V>(xd + j * L) + vd * d[j]);
        }
        if (g < g1) {  // the odd last group (g0 is even)
          const unsigned nib = m[g >> 1] & 0xFu;
          char* xg = base + g * kGroupBytes;
          C* xa = reinterpret_cast<C*>(xg + position_offset<kShift, 0>(nib));
          C* xb = reinterpret_cast<C*>(xg + position_offset<kShift, 1>(nib));
          const C va = load_scalar(val + 2 * g), vb = load_scalar(val + 2 * g + 1);
          for (int j = 0; j < NV; ++j) vstore(xa + j * L, vload<V>(xa + j * L) + va * d[j]);
          for (int j = 0; j < NV; ++j) vstore(xb + j * L, vload<V>(xb + j * L) + vb * d[j]);
        }
      }
    }
  };
  parallel_run(par, ntiles * nchunks, body);
  unpack_panels<S, C>(dxp, tokens, in, TILE, dx, par);
}

// ---- sddmm: dvalues[r, k] = <dY[:, r], X[:, col(r, k)]> at the kept positions only --------------
// Loop: threads own blocks of 32 rows (no races on dvalues). Per token tile, a row's dY vectors
// stay in registers while it walks an L1-resident chunk of the X panel; each batch of L/2 groups
// (L kept values) gives L dot-product vectors that fold_lanes reduces into one vector of sums,
// added to the row's fp32/fp64 accumulators. One load per FMA, as in the forward.
template <typename S, int NV>
void semi24_sddmm_t(const Semi24View& w, const S* dy, const S* x, int64_t tokens, S* dvalues,
                    typename ComputeOf<S>::type* dyp, typename ComputeOf<S>::type* xp,
                    typename ComputeOf<S>::type* acc_buf, const Parallel& par) {
  typedef typename ComputeOf<S>::type C;
  typedef typename Vec<C>::type V;
  constexpr int L = Vec<C>::lanes;
  constexpr int64_t TILE = NV * L;
  constexpr int B = L / 2;  // groups per batch: L kept values
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t ntiles = (tokens + TILE - 1) / TILE;
  const int64_t meta_stride = semi24_meta_width(in);
  const int64_t groups = in / 4, half = in / 2;
  const C zero = 0;
  constexpr unsigned kShift = panel_row_shift<C, TILE>();
  constexpr int64_t kChunkBytes = 24 * 1024;  // as in the forward
  int64_t GC = kChunkBytes / (4 * TILE * static_cast<int64_t>(sizeof(C))) / B * B;
  if (GC < B) GC = B;
  pack_panels<S, C>(dy, tokens, out, TILE, dyp, par);
  pack_panels<S, C>(x, tokens, in, TILE, xp, par);
  const int64_t nrb = (out + k24RowsPerBlock - 1) / k24RowsPerBlock;

  auto body = [&](int64_t b, int64_t e) {
    for (int64_t rb = b; rb < e; ++rb) {
      const int64_t r0 = rb * k24RowsPerBlock, r1 = min_i64(out, r0 + k24RowsPerBlock);
      C* acc = acc_buf + r0 * half;
      for (int64_t k = 0; k < (r1 - r0) * half; ++k) acc[k] = zero;
      for (int64_t tile = 0; tile < ntiles; ++tile) {
        const C* dyt = dyp + tile * out * TILE;
        const char* xt = reinterpret_cast<const char*>(xp + tile * in * TILE);
        for (int64_t g0 = 0; g0 < groups; g0 += GC) {
          const int64_t g1 = min_i64(groups, g0 + GC);
          for (int64_t r = r0; r < r1; ++r) {
            V d[NV];
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) d[j] = vload<V>(dyt + r * TILE + j * L);
            const uint8_t* m = w.meta + r * meta_stride;
            C* acc_r = acc + (r - r0) * half;
            for (int64_t gb = g0; gb < g1; gb += B) {
              V p[L];
#pragma GCC unroll 16
              for (int q = 0; q < B; ++q) {
                const int64_t g = gb + q;
                if (g < g1) {
                  const unsigned nib = static_cast<unsigned>(m[g >> 1]) >> ((q & 1) * 4);  // gb is even
                  const char* xg = xt + g * 4 * TILE * static_cast<int64_t>(sizeof(C));
                  const C* xa = reinterpret_cast<const C*>(xg + position_offset<kShift, 0>(nib));
                  const C* xb = reinterpret_cast<const C*>(xg + position_offset<kShift, 1>(nib));
                  asm volatile("" : "+r"(xa), "+r"(xb));  // see semi24_rows
                  V pa = d[0] * vload<V>(xa), pb = d[0] * vload<V>(xb);
#pragma GCC unroll 8
                  for (int j = 1; j < NV; ++j) {
                    pa += d[j] * vload<V>(xa + j * L);
                    pb += d[j] * vload<V>(xb + j * L);
                  }
                  p[2 * q] = pa;
                  p[2 * q + 1] = pb;
                } else {
                  p[2 * q] = V{} + zero;
                  p[2 * q + 1] = V{} + zero;
                }
              }
              fold_lanes(p);
              const V sums = p[0];
              C* dst = acc_r + 2 * gb;
              const int64_t n = min_i64(L, 2 * (g1 - gb));
              if (n == L) {
                vstore(dst, vload<V>(dst) + sums);
              } else {
                for (int64_t l = 0; l < n; ++l) dst[l] += sums[l];
              }
            }
          }
        }
      }
      for (int64_t k = 0; k < (r1 - r0) * half; ++k) store_scalar(dvalues + r0 * half + k, acc[k]);
    }
  };
  parallel_run(par, nrb, body);
}

// ---- entry points: runtime dtype and tile width -> template instance ------------------------------
// CALL is expanded with S (storage type), C (compute type) and NV (vectors per tile) defined; nv
// above 4 means WIDEST (8 where a kernel has an 8-vector instance, else 4).
#define SPARSE_T5_24_DISPATCH_NV(CALL, WIDEST)            \
  if (nv <= 1) { constexpr int NV = 1; CALL; }            \
  else if (nv == 2) { constexpr int NV = 2; CALL; }       \
  else if (nv == 4) { constexpr int NV = 4; CALL; }       \
  else { constexpr int NV = WIDEST; CALL; }
#define SPARSE_T5_24_DISPATCH(CALL, WIDEST)                                                               \
  switch (dt) {                                                                                           \
    case DType::kFloat32: { typedef float S; typedef float C; SPARSE_T5_24_DISPATCH_NV(CALL, WIDEST) } break;   \
    case DType::kFloat64: { typedef double S; typedef double C; SPARSE_T5_24_DISPATCH_NV(CALL, WIDEST) } break; \
    case DType::kBFloat16: { typedef BF16 S; typedef float C; SPARSE_T5_24_DISPATCH_NV(CALL, WIDEST) } break;   \
  }

void semi24_forward(const Semi24View& w, DType dt, const void* x, int64_t tokens, const void* bias, void* y,
                    void* x_panels, int nv, const Parallel& par) {
#ifdef SPARSE_T5_HAS_PERMUTE2
  if (tokens >= 1 && tokens <= kFewTokens && dt != DType::kFloat64) {  // x_panels holds >= tokens * in
    if (dt == DType::kFloat32)
      semi24_forward_few<float>(w, static_cast<const float*>(x), tokens, static_cast<const float*>(bias),
                                static_cast<float*>(y), static_cast<float*>(x_panels), par);
    else
      semi24_forward_few<BF16>(w, static_cast<const BF16*>(x), tokens, static_cast<const BF16*>(bias),
                               static_cast<BF16*>(y), static_cast<float*>(x_panels), par);
    return;
  }
#endif
  SPARSE_T5_24_DISPATCH((semi24_forward_t<S, NV>(w, static_cast<const S*>(x), tokens, static_cast<const S*>(bias),
                                                 static_cast<S*>(y), static_cast<C*>(x_panels), par)),
                        4)
}

void semi24_backward_input(const Semi24View& w, DType dt, const void* dy, int64_t tokens, void* dx,
                           void* dy_panels, void* dx_panels, int nv, const Parallel& par) {
  SPARSE_T5_24_DISPATCH((semi24_backward_input_t<S, NV>(w, static_cast<const S*>(dy), tokens, static_cast<S*>(dx),
                                                        static_cast<C*>(dy_panels), static_cast<C*>(dx_panels), par)),
                        4)
}

void semi24_sddmm(const Semi24View& w, DType dt, const void* dy, const void* x, int64_t tokens, void* dvalues,
                  void* dy_panels, void* x_panels, void* dvalues_acc, int nv, const Parallel& par) {
  SPARSE_T5_24_DISPATCH((semi24_sddmm_t<S, NV>(w, static_cast<const S*>(dy), static_cast<const S*>(x), tokens,
                                               static_cast<S*>(dvalues), static_cast<C*>(dy_panels),
                                               static_cast<C*>(x_panels), static_cast<C*>(dvalues_acc), par)),
                        8)
}

#undef SPARSE_T5_24_DISPATCH
#undef SPARSE_T5_24_DISPATCH_NV

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
