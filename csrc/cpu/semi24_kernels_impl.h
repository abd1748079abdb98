// 2:4 semi-structured sparse-linear forward, compiled once per instruction set (kernels_<isa>.cpp).
//
// Layout (kernel_api.h, Semi24View): values [out, in/2]; meta [out, ceil(in/8)] bytes, one nibble
// per group of 4 inputs (group g in byte g/2, low nibble for even g): bits 0-1 = first kept
// position, bits 2-3 = second, first < second.
//
// Loop: a block of R output rows walks the groups in order, so the 4 x-panel rows of a group
// (4 * TILE floats) stay in L1 while all R rows use them; the R x NV accumulators stay in
// registers. The CSR kernel instead reads random columns of the whole panel from L2 for every row,
// which is what kept it at ~0.6x dense at 50% density. Per (row, group): one nibble decode, two
// broadcasts and 2 x NV FMAs with the x loads folded in.
//
// The backward products (dx and dvalues) reuse the CSR kernels on a column index decoded from the
// metadata (csrc/semi24_linear.cpp): one mechanism for the scatter and the sampled product.
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
  // register costs several uops on x86 and was paid per row and group). Each 2-bit field is shifted
  // straight to its byte offset in the panel and masked (two ops per pointer; shift-mask-multiply
  // was three or four). Measured at 512 tokens, 2 threads, against dense in the same process: the
  // pointer barrier below and this decode together took 512->2048 from 1.0-1.2x to 1.2-1.3x.
  constexpr unsigned kRowShift = __builtin_ctzll(TILE * sizeof(C));  // log2 of one panel row's bytes
  constexpr unsigned kPosMask = 3u << kRowShift;
  constexpr int64_t kGroupBytes = 4 * TILE * sizeof(C);
  static_assert((TILE * sizeof(C) & (TILE * sizeof(C) - 1)) == 0 && kRowShift >= 6, "panel rows must be 2^k >= 64 bytes");
  int64_t g = g0;
  for (; g + 1 < g1; g += 2) {
    const char* xg = reinterpret_cast<const char*>(panel + 4 * g * TILE);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const int64_t r = r0 + i;
      const unsigned byte = meta[r * meta_stride + (g >> 1)];
      const S* val = values + r * half + 2 * g;
      const C* xa = reinterpret_cast<const C*>(xg + ((byte << kRowShift) & kPosMask));
      const C* xb = reinterpret_cast<const C*>(xg + ((byte << (kRowShift - 2)) & kPosMask));
      const C* xc = reinterpret_cast<const C*>(xg + kGroupBytes + ((byte << (kRowShift - 4)) & kPosMask));
      const C* xd = reinterpret_cast<const C*>(xg + kGroupBytes + ((byte << (kRowShift - 6)) & kPosMask));
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
  for (; g < g1; ++g) {  // an odd group left over (g0 is always even: chunks hold an even count)
    const C* xg = panel + 4 * g * TILE;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const int64_t r = r0 + i;
      const unsigned nib = (meta[r * meta_stride + (g >> 1)] >> ((g & 1) * 4)) & 0xFu;
      const C* x0 = xg + (nib & 3u) * TILE;
      const C* x1 = xg + (nib >> 2) * TILE;
      const C v0 = load_scalar(values + r * half + 2 * g);
      const C v1 = load_scalar(values + r * half + 2 * g + 1);
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
  // Measured at t5-small/base FFN shapes, 512 tokens: 4 x 4 (64-token tiles) 0.74-1.02x dense,
  // 8 x 2 0.71-0.83x, 2 x 8 (128-token tiles) 0.5-0.65x.
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
  pack_panels<S, C>(x, tokens, in, TILE, xp, par);
  const S* values = static_cast<const S*>(w.values);
  const int64_t nrb = (out + k24RowsPerBlock - 1) / k24RowsPerBlock;

  auto body = [&](int64_t b, int64_t e) {
    C buf[k24RowsPerBlock * TILE];
    for (int64_t item = b; item < e; ++item) {
      const int64_t tile = item / nrb, rb = item % nrb;
      const C* panel = xp + tile * in * TILE;
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
  parallel_run(par, ntiles * nrb, body);
}

void semi24_forward(const Semi24View& w, DType dt, const void* x, int64_t tokens, const void* bias, void* y,
                    void* x_panels, int nv, const Parallel& par) {
#define SPARSE_T5_24_CALL(S_)                                                                              \
  {                                                                                                        \
    typedef S_ S;                                                                                          \
    typedef typename ComputeOf<S>::type C;                                                                 \
    if (nv <= 1)                                                                                           \
      semi24_forward_t<S, 1>(w, static_cast<const S*>(x), tokens, static_cast<const S*>(bias),             \
                             static_cast<S*>(y), static_cast<C*>(x_panels), par);                          \
    else if (nv == 2)                                                                                      \
      semi24_forward_t<S, 2>(w, static_cast<const S*>(x), tokens, static_cast<const S*>(bias),             \
                             static_cast<S*>(y), static_cast<C*>(x_panels), par);                          \
    else                                                                                                   \
      semi24_forward_t<S, 4>(w, static_cast<const S*>(x), tokens, static_cast<const S*>(bias),             \
                             static_cast<S*>(y), static_cast<C*>(x_panels), par);                          \
  }
  switch (dt) {
    case DType::kFloat32: SPARSE_T5_24_CALL(float) break;
    case DType::kFloat64: SPARSE_T5_24_CALL(double) break;
    case DType::kBFloat16: SPARSE_T5_24_CALL(BF16) break;
  }
#undef SPARSE_T5_24_CALL
}

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
