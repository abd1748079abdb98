// The Parallel callback the kernels use, backed by at::parallel_for so that
// torch.set_num_threads governs the kernels like any ATen op.
#pragma once

#include <ATen/Parallel.h>

#include "kernel_api.h"

namespace sparse_t5 {
namespace cpu {

inline Parallel aten_parallel() {
  Parallel par;
  par.run = [](int64_t n, void* ctx, void (*body)(void*, int64_t, int64_t)) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(ctx, b, e); });
  };
  par.num_threads = at::get_num_threads();
  return par;
}

}  // namespace cpu
}  // namespace sparse_t5
