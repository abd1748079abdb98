// Structure checks of the sparse formats, and the memory of structures already checked
// (structure_checks.h says what is checked, why, and which path skips what).
#include "structure_checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu/kernel_api.h"
#include "op_common.h"

namespace sparse_t5 {
namespace {

std::atomic<bool> g_every_call{false};

// One tensor as it was when its structure passed.
struct Stamp {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data = nullptr;
  int64_t offset = 0;
  int64_t numel = 0;
  uint32_t version = 0;

  explicit Stamp(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()),
        data(t.data_ptr()),
        offset(t.storage_offset()),
        numel(t.numel()),
        version(t._version()) {}

  bool matches(const at::Tensor& t) const {
    // A live weak reference to the same StorageImpl: the object cannot have been freed and its
    // address reused while this stamp holds it.
    return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           data == t.data_ptr() && offset == t.storage_offset() && numel == t.numel() &&
           version == t._version();
  }
};

// (kind, out, in, nnz): the same index is valid for one shape and not for another.
using ShapeKey = std::array<int64_t, 4>;
enum Kind : int64_t { kCsr = 1, kSemi24 = 2 };

struct Entry {
  ShapeKey shape;
  std::vector<Stamp> stamps;
};

// Keyed by the data pointer of the structure's first tensor (col_idx, or meta). Bounded: a model
// has a few hundred sparse layers (t5-11b: 336), and stale entries are swept before it grows past
// the bound.
class ValidatedStructures {
 public:
  bool known(const ShapeKey& shape, std::initializer_list<const at::Tensor*> ts) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find((*ts.begin())->data_ptr());
    if (it == entries_.end() || it->second.shape != shape || it->second.stamps.size() != ts.size()) return false;
    size_t i = 0;
    for (const at::Tensor* t : ts)
      if (!it->second.stamps[i++].matches(*t)) return false;
    return true;
  }

  void remember(const ShapeKey& shape, std::initializer_list<const at::Tensor*> ts) {
    Entry e{shape, {}};
    for (const at::Tensor* t : ts) e.stamps.emplace_back(*t);
    std::lock_guard<std::mutex> lock(mu_);
    if (entries_.size() >= kMaxEntries) sweep();
    entries_.insert_or_assign((*ts.begin())->data_ptr(), std::move(e));
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
  }

 private:
  static constexpr size_t kMaxEntries = 16384;

  void sweep() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      bool stale = false;
      for (const Stamp& s : it->second.stamps) stale |= s.storage.expired();
      it = stale ? entries_.erase(it) : std::next(it);
    }
    if (entries_.size() >= kMaxEntries) entries_.clear();
  }

  std::mutex mu_;
  std::unordered_map<const void*, Entry> entries_;
};

ValidatedStructures& validated() {
  static ValidatedStructures* v = new ValidatedStructures();  // never destroyed: ops may run at exit
  return *v;
}

// Runs `check` unless this structure passed before and is unchanged (structure_checks.h).
template <class Check>
void check_once(const ShapeKey& shape, std::initializer_list<const at::Tensor*> ts, Check&& check) {
  bool cacheable = !g_every_call.load(std::memory_order_relaxed);
  for (const at::Tensor* t : ts) cacheable &= !t->is_inference();  // no version counter to watch
  if (cacheable && validated().known(shape, ts)) return;
  check();
  if (cacheable) validated().remember(shape, ts);
}

// Columns strictly increasing within each row and inside [0, in). row_ptr is already known to be
// valid. The fast pass is branch-free and split over rows; only a failing index is walked again,
// serially, to name its first fault.
template <typename I>
void check_csr_columns(const int32_t* rp, const I* cols, int64_t out, int64_t in) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, out, 256, [&](int64_t b, int64_t e) {
    bool fault = false;
    for (int64_t r = b; r < e; ++r) {
      const int64_t s = rp[r], t = rp[r + 1];
      if (s == t) continue;
      fault |= static_cast<int64_t>(cols[s]) < 0;
      fault |= static_cast<int64_t>(cols[t - 1]) >= in;
      uint8_t unsorted = 0;
      for (int64_t k = s + 1; k < t; ++k) unsorted |= static_cast<uint8_t>(cols[k] <= cols[k - 1]);
      fault |= unsorted != 0;
    }
    if (fault) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
      const int64_t c = cols[k];
      TORCH_CHECK_VALUE(c >= 0 && c < in, "sparse_t5: invalid CSR: col_idx[", k, "] = ", c,
                        " is outside [0, in_features = ", in, ")");
      if (k > rp[r]) {
        const int64_t prev = cols[k - 1];
        TORCH_CHECK_VALUE(c > prev, "sparse_t5: invalid CSR: columns ", c == prev ? "duplicated" : "unsorted",
                          " within row ", r, " at col_idx[", k, "] = ", c, " (previous column ", prev,
                          "); columns must be strictly increasing within a row");
      }
    }
  }
}

void check_csr_contents(int64_t nnz, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t out,
                        int64_t in) {
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(rp[0] == 0, "sparse_t5: invalid CSR: row_ptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK_VALUE(rp[out] == nnz, "sparse_t5: invalid CSR: row_ptr[-1] must equal nnz (", nnz, "), got ",
                    rp[out]);
  for (int64_t r = 0; r < out; ++r) {
    TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], "sparse_t5: invalid CSR: row_ptr decreases at row ", r, " (", rp[r],
                      " > ", rp[r + 1], ")");
  }
  if (col_idx.scalar_type() == at::kShort) {
    check_csr_columns(rp, col_idx.data_ptr<int16_t>(), out, in);
  } else if (col_idx.scalar_type() == at::kUInt16) {
    check_csr_columns(rp, static_cast<const uint16_t*>(col_idx.data_ptr()), out, in);
  } else {
    check_csr_columns(rp, col_idx.data_ptr<int32_t>(), out, in);
  }
}

void check_semi24_contents(const at::Tensor& meta, int64_t out, int64_t in) {
  const uint8_t* m = meta.data_ptr<uint8_t>();
  const int64_t groups = in / 4, width = cpu::semi24_meta_width(in);
  // Branch-free byte arithmetic that GCC vectorises (16 bytes per SSE2 op), rows split across
  // threads. (A nibble-by-nibble loop with a check per group cost ~0.5 ms per call on a t5-small
  // FFN weight; a 256-entry table ~0.2 ms.) Only a failing weight is walked again to name the fault.
  const bool odd = groups % 2 == 1;
  const int64_t full = odd ? width - 1 : width;  // bytes holding two groups
  std::atomic<bool> bad{false};
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    uint8_t fault = 0;
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* row = m + r * width;
      for (int64_t i = 0; i < full; ++i) {
        const uint8_t v = row[i];
        fault |= static_cast<uint8_t>(((v & 3) >= ((v >> 2) & 3)) | (((v >> 4) & 3) >= (v >> 6)));
      }
      if (odd) {
        const uint8_t v = row[width - 1];
        fault |= static_cast<uint8_t>(((v & 3) >= ((v >> 2) & 3)) | ((v >> 4) != 0));
      }
    }
    if (fault) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned nib = (m[r * width + g / 2] >> ((g & 1) * 4)) & 0xFu;
      TORCH_CHECK_VALUE((nib & 3u) < (nib >> 2), "sparse_t5: malformed 2:4 meta at row ", r, ", group ", g,
                        ": positions ", nib & 3u, " and ", nib >> 2, " must be distinct and increasing");
    }
    if (odd) {
      TORCH_CHECK_VALUE((m[r * width + width - 1] >> 4) == 0, "sparse_t5: malformed 2:4 meta at row ", r,
                        ": the unused high nibble of the last byte must be 0");
    }
  }
}

}  // namespace

void check_csr_structure(int64_t nnz, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t out_features,
                         int64_t in_features) {
  TORCH_CHECK_VALUE(out_features >= 0 && in_features >= 0,
                    "sparse_t5: out_features and in_features must be >= 0, got ", out_features, " and ",
                    in_features);
  check_cpu(row_ptr, "row_ptr");
  check_cpu(col_idx, "col_idx");
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt, "sparse_t5: row_ptr must be int32, got ",
                   row_ptr.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.size(0) == out_features + 1,
                    "sparse_t5: row_ptr must have shape [out_features + 1] = [", out_features + 1, "], got ",
                    row_ptr.sizes());
  const auto index_type = col_idx.scalar_type();
  TORCH_CHECK_TYPE(index_type == at::kInt || index_type == at::kUInt16 || index_type == at::kShort,
                   "sparse_t5: col_idx must be uint16, int16 or int32, got ", index_type);
  TORCH_CHECK_VALUE(index_type != at::kShort || in_features <= 32768,
                    "sparse_t5: int16 col_idx holds at most 32768 columns, in_features is ", in_features);
  TORCH_CHECK_VALUE(index_type != at::kUInt16 || in_features <= 65536,
                    "sparse_t5: uint16 col_idx holds at most 65536 columns, in_features is ", in_features);
  TORCH_CHECK_VALUE(col_idx.dim() == 1 && col_idx.size(0) == nnz, "sparse_t5: col_idx must have shape [nnz] = [",
                    nnz, "] like values, got ", col_idx.sizes());
  TORCH_CHECK_VALUE(row_ptr.is_contiguous() && col_idx.is_contiguous(),
                    "sparse_t5: row_ptr and col_idx must be contiguous");
  check_once({kCsr, out_features, in_features, nnz}, {&col_idx, &row_ptr},
             [&] { check_csr_contents(nnz, row_ptr, col_idx, out_features, in_features); });
}

void check_semi24_meta(const at::Tensor& meta, int64_t out, int64_t in) {
  check_cpu(meta, "meta");
  TORCH_CHECK_VALUE(in % 4 == 0, "sparse_t5: 2:4 needs in_features divisible by 4, got in_features = ", in);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "sparse_t5: 2:4 meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == out && meta.size(1) == cpu::semi24_meta_width(in),
                    "sparse_t5: 2:4 meta must have shape [out_features, ceil(in_features / 8)] = [", out, ", ",
                    cpu::semi24_meta_width(in), "], got ", meta.sizes());
  TORCH_CHECK_VALUE(meta.is_contiguous(), "sparse_t5: 2:4 meta must be contiguous");
  check_once({kSemi24, out, in, 0}, {&meta}, [&] { check_semi24_contents(meta, out, in); });
}

void set_structure_checks(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "once" || mode == "every_call",
                    "sparse_t5: structure checks must be 'once' or 'every_call', got '", mode, "'");
  g_every_call.store(mode == "every_call");
}

std::string get_structure_checks() { return g_every_call.load() ? "every_call" : "once"; }

void clear_validated_structures() { validated().clear(); }

}  // namespace sparse_t5
