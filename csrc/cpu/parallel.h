// Parallel loops of the CPU ops, on ATen's thread pool so that torch.set_num_threads governs the
// kernels like any ATen op.
//
// Work is handed out dynamically in chunks, several per thread: each thread takes the next chunk
// when it finishes one. With at::parallel_for's one static block per thread, a thread that another
// process (a data-loading worker, a tokenizer) keeps off its core holds back the whole call by its
// whole block; here it delays only the chunk it holds, and the others take the rest (issue 15's
// contention case, benches/kernel_methods.py --contention).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "kernel_api.h"

namespace sparse_t5 {
namespace cpu {

// Chunks per thread: enough that a stalled thread's share is small, few enough that the atomic
// counter and the loss of contiguity cost nothing measurable.
constexpr int64_t kChunksPerThread = 8;

// The threads a parallel loop started here runs on: 1 inside another parallel region, where the
// loops below run inline on the calling thread.
inline int64_t worker_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// body(begin, end) over [0, n), chunks of at least `min_chunk` items, claimed dynamically.
template <typename F>
void dynamic_parallel_for(int64_t n, int64_t min_chunk, const F& body) {
  if (n <= 0) return;
  const int64_t threads = worker_threads();
  if (threads <= 1 || n <= min_chunk) {
    body(0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(min_chunk, (n + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(chunk); b < n; b = next.fetch_add(chunk)) body(b, std::min(n, b + chunk));
  });
}

// SPARSE_T5_STATIC_SCHEDULE=1 restores the old schedule (at::parallel_for's one static block per
// thread) for the kernels, so benches/contention.py can measure both on the same build.
inline bool static_schedule() {
  static const bool on = std::getenv("SPARSE_T5_STATIC_SCHEDULE") != nullptr;
  return on;
}

inline Parallel aten_parallel() {
  Parallel par;
  if (static_schedule()) {
    par.run = [](int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
    };
  } else {
    par.run = [](int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
      dynamic_parallel_for(n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
    };
  }
  par.num_threads = at::get_num_threads();
  return par;
}

}  // namespace cpu
}  // namespace sparse_t5
