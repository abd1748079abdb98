// Dense few-token forward, compiled once per instruction set (see kernels_<isa>.cpp).
//
// y[T, out] = x[T, in] W^T for a dense W and 1 <= T <= 16 tokens: the model's lm_head at decoding
// steps (beam search decodes one token per beam, so T is the beam count). The vendor GEMM packs W
// for such calls, a copy of the whole layer per call: on an Intel Xeon (torch 2.13.0+cpu, MKL, 2
// threads) t5-base's lm_head (32128 x 768, 98.7 MB in fp32) took 3.2 ms at 1 token, but 11.7 ms at
// 8 tokens and 14.2 ms at 10, where this kernel took 4.4 and 3.9 ms (benches/lm_head_few_tokens.py;
// README "Beam search and the lm_head at decoding steps"). It reads W once, row by row: each 16-wide
// chunk of a row is loaded once and multiplied into all T tokens' accumulators (T + 1 loads per T
// FMAs; x, T rows of `in` floats, stays in L1 up to ~10 tokens at 768 inputs), and fold_lanes sums
// a row's T accumulators into one vector of T results.
#pragma once
#include "common_impl.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparse_t5 {
namespace cpu {
namespace SPARSE_T5_ISA_NS {
namespace {

// 16 weights as fp32: a load, or bf16 widened into the high halves of fp32 lanes. (An out-parameter,
// not a returned vector: GCC warns (-Wpsabi) on a 64-byte vector return in the non-AVX-512 builds.)
template <typename S> __attribute__((always_inline)) inline void load_vec_fp32(const S* p, Vec<float>::type& out) {
  if constexpr (IsFloat<S>::value) {
    out = vload<Vec<float>::type>(p);
  } else {
    typedef uint16_t VH __attribute__((vector_size(32)));
    typedef uint32_t VU __attribute__((vector_size(64)));
    const VU u = __builtin_convertvector(vload<VH>(p), VU) << 16;
    __builtin_memcpy(&out, &u, sizeof(out));
  }
}

// Software prefetch distance in bytes (2 rows of t5-base's fp32 lm_head). Without it the loop waits
// on each row's lines: a standalone C++ copy of this kernel (2 threads, 32128 x 768) took 8.0-8.7 ms
// at 10 tokens and 3.0-3.7 at 1; prefetching 2 rows ahead, 4.5-5.8 and 2.1-2.3 (8 rows: 4.5-5.2,
// 2.3-2.4). MKL's GEMV reads the same weight in 2.5 ms at 1 token.
constexpr int64_t kDenseFewPrefetchBytes = 6144;

template <typename S, int T>
void dense_forward_few_t(const S* w, const float* x, int64_t out, int64_t in, S* y, const Parallel& par) {
  typedef Vec<float>::type V;
  constexpr int L = Vec<float>::lanes;
  static_assert(T >= 1 && T <= kDenseFewMaxTokens && kDenseFewMaxTokens == L, "a row's T sums fold into one vector");
  const int64_t in_vec = in / L * L;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const S* row = w + r * in;
      V acc[L];
#pragma GCC unroll 16
      for (int t = 0; t < L; ++t) acc[t] = V{} + 0.f;
      for (int64_t c = 0; c < in_vec; c += L) {
        // a prefetch past the weight's end is harmless: prefetches do not fault
        __builtin_prefetch(reinterpret_cast<const char*>(row + c) + kDenseFewPrefetchBytes);
        V wv;
        load_vec_fp32(row + c, wv);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) acc[t] += wv * vload<V>(x + t * in + c);
      }
      fold_lanes(acc);  // lane t of acc[0]: token t's sum over the vector chunks
      for (int t = 0; t < T; ++t) {
        float s = acc[0][t];
        for (int64_t c = in_vec; c < in; ++c) s += load_scalar(row + c) * x[t * in + c];
        store_scalar(y + t * out + r, s);
      }
    }
  };
  parallel_run(par, out, body);
}

// x as fp32 rows (bf16 converted into xbuf, tokens * in floats); W and y in the storage dtype.
template <typename S>
void dense_forward_few_s(const S* w, const S* x, int64_t tokens, int64_t out, int64_t in, S* y, float* xbuf,
                         const Parallel& par) {
  const float* xf = as_fp32_rows(x, tokens * in, xbuf);
  switch (tokens) {
#define SPARSE_T5_DENSE_FEW_CASE(T_) \
  case T_: dense_forward_few_t<S, T_>(w, xf, out, in, y, par); break;
    SPARSE_T5_DENSE_FEW_CASE(1) SPARSE_T5_DENSE_FEW_CASE(2) SPARSE_T5_DENSE_FEW_CASE(3) SPARSE_T5_DENSE_FEW_CASE(4)
    SPARSE_T5_DENSE_FEW_CASE(5) SPARSE_T5_DENSE_FEW_CASE(6) SPARSE_T5_DENSE_FEW_CASE(7) SPARSE_T5_DENSE_FEW_CASE(8)
    SPARSE_T5_DENSE_FEW_CASE(9) SPARSE_T5_DENSE_FEW_CASE(10) SPARSE_T5_DENSE_FEW_CASE(11) SPARSE_T5_DENSE_FEW_CASE(12)
    SPARSE_T5_DENSE_FEW_CASE(13) SPARSE_T5_DENSE_FEW_CASE(14) SPARSE_T5_DENSE_FEW_CASE(15) SPARSE_T5_DENSE_FEW_CASE(16)
#undef SPARSE_T5_DENSE_FEW_CASE
  }
}

void dense_forward_few(const void* w, DType dt, const void* x, int64_t tokens, int64_t out, int64_t in, void* y,
                       void* xbuf, const Parallel& par) {
  if (dt == DType::kFloat32) {
    dense_forward_few_s(static_cast<const float*>(w), static_cast<const float*>(x), tokens, out, in,
                        static_cast<float*>(y), static_cast<float*>(xbuf), par);
  } else if (dt == DType::kBFloat16) {
    dense_forward_few_s(static_cast<const BF16*>(w), static_cast<const BF16*>(x), tokens, out, in,
                        static_cast<BF16*>(y), static_cast<float*>(xbuf), par);
  }
}

}  // namespace
}  // namespace SPARSE_T5_ISA_NS
}  // namespace cpu
}  // namespace sparse_t5

#pragma GCC diagnostic pop
