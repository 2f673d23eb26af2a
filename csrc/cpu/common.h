// Shared pieces of linrec's CPU kernels: tiles of at::vec vectors in the accumulation type
// (fp32, or complex64), their loads and stores from every storage type, the list of sequences
// a call scans (dense batch rows or packed cu_seqlens spans) and the blocking heuristics.
//
// Every kernel runs one pass over time per (sequence, channel block) task; tasks run in
// parallel with at::parallel_for. Within a step the channels of a block are processed in tiles
// of two vectors, so that a bfloat16 / float16 vector converts to exactly one tile of fp32.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace linrec_cpu {

using fVec = at::vec::Vectorized<float>;
using cfloat = c10::complex<float>;
using cVec = at::vec::Vectorized<cfloat>;

// Accumulation type of a storage type: float for the real types, complex64 for complex64.
template <typename S> struct Acc { using type = float; using V = fVec; };
template <> struct Acc<cfloat> { using type = cfloat; using V = cVec; };
template <typename S> using acc_t = typename Acc<S>::type;
template <typename S> using vec_t = typename Acc<S>::V;

// Elements of one tile (two vectors) of the accumulation type.
template <typename S> constexpr int64_t tile_width() { return 2 * vec_t<S>::size(); }

// ---- loads of n <= tile_width elements into two vectors (missing lanes are zero) ----------

inline void load2(const float* p, int64_t n, fVec& lo, fVec& hi) {
  constexpr int64_t K = fVec::size();
  if (n >= 2 * K) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + K);
  } else if (n > K) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + K, n - K);
  } else {
    lo = fVec::loadu(p, n);
    hi = fVec(0.f);
  }
}

inline void load2(const cfloat* p, int64_t n, cVec& lo, cVec& hi) {
  constexpr int64_t K = cVec::size();
  if (n >= 2 * K) {
    lo = cVec::loadu(p);
    hi = cVec::loadu(p + K);
  } else if (n > K) {
    lo = cVec::loadu(p);
    hi = cVec::loadu(p + K, n - K);
  } else {
    lo = cVec::loadu(p, n);
    hi = cVec(cfloat(0.f, 0.f));
  }
}

template <typename R, typename std::enable_if_t<at::vec::is_reduced_floating_point_v<R>, int> = 0>
inline void load2(const R* p, int64_t n, fVec& lo, fVec& hi) {
  using RV = at::vec::Vectorized<R>;
  static_assert(RV::size() == 2 * fVec::size(), "a reduced-precision vector must fill one fp32 tile");
  const RV v = n >= RV::size() ? RV::loadu(p) : RV::loadu(p, n);
  std::tie(lo, hi) = at::vec::convert_to_float<R>(v);
}

// ---- stores of the first n <= tile_width elements of two vectors --------------------------

inline void store2(float* p, int64_t n, const fVec& lo, const fVec& hi) {
  constexpr int64_t K = fVec::size();
  if (n >= 2 * K) {
    lo.store(p);
    hi.store(p + K);
  } else if (n > K) {
    lo.store(p);
    hi.store(p + K, n - K);
  } else {
    lo.store(p, n);
  }
}

inline void store2(cfloat* p, int64_t n, const cVec& lo, const cVec& hi) {
  constexpr int64_t K = cVec::size();
  if (n >= 2 * K) {
    lo.store(p);
    hi.store(p + K);
  } else if (n > K) {
    lo.store(p);
    hi.store(p + K, n - K);
  } else {
    lo.store(p, n);
  }
}

template <typename R, typename std::enable_if_t<at::vec::is_reduced_floating_point_v<R>, int> = 0>
inline void store2(R* p, int64_t n, const fVec& lo, const fVec& hi) {
  using RV = at::vec::Vectorized<R>;
  const RV v = at::vec::convert_from_float<R>(lo, hi);
  if (n >= RV::size()) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}

// ---- arithmetic in the accumulation type ---------------------------------------------------

inline fVec conj_(const fVec& v) { return v; }
inline cVec conj_(const cVec& v) { return v.conj(); }
// a * b + c (one fused multiply-add for real vectors)
inline fVec mul_add(const fVec& a, const fVec& b, const fVec& c) { return at::vec::fmadd(a, b, c); }
inline cVec mul_add(const cVec& a, const cVec& b, const cVec& c) { return a * b + c; }

// Scalar conversion to and from the accumulation type.
template <typename S> inline acc_t<S> to_acc(S v) { return static_cast<acc_t<S>>(v); }
template <typename S> inline S from_acc(acc_t<S> v) { return static_cast<S>(v); }

// ---- the sequences of a call ---------------------------------------------------------------

struct Seq {
  int64_t row;    // batch row of x / h
  int64_t start;  // first time index
  int64_t len;    // number of steps (may be 0)
  int64_t state;  // row of initial_state / grad_initial_state
};

// Dense (B rows of T steps) or packed (B = 1, N spans of cu_seqlens, int64, checked here so that
// a bad offset can never index out of bounds).
inline std::vector<Seq> make_seqs(int64_t B, int64_t T, const c10::optional<at::Tensor>& cu_seqlens) {
  std::vector<Seq> seqs;
  if (!cu_seqlens.has_value()) {
    seqs.reserve(B);
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b, 0, T, b});
    return seqs;
  }
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.is_contiguous(),
              "cu_seqlens must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(B == 1, "with cu_seqlens the batch must be packed into B = 1, got B = ", B);
  const int64_t N = cu.numel() - 1;
  TORCH_CHECK(N >= 1, "cu_seqlens must hold N + 1 >= 2 offsets");
  const int64_t* off = cu.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[N] == T, "cu_seqlens must start at 0 and end at T = ", T, ", got ", off[0],
              " ... ", off[N]);
  seqs.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(off[n + 1] >= off[n], "cu_seqlens must be non-decreasing, got ", off[n], " then ", off[n + 1]);
    seqs.push_back({0, off[n], off[n + 1] - off[n], n});
  }
  return seqs;
}

// Steps of time over all sequences (the tokens a call scans).
inline int64_t total_steps(const std::vector<Seq>& seqs) {
  int64_t steps = 0;
  for (const Seq& sq : seqs) steps += sq.len;
  return steps;
}

// Stride of a dimension, 0 where it has size 1 (a broadcast dimension).
inline int64_t bstride(const at::Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// Splits `units` (tiles of channels, or blocks) into blocks of at most max_per_block, then into
// smaller ones (down to min_per_block) until there are enough tasks for every thread.
// Returns the number of units per block.
inline int64_t units_per_block(int64_t units, int64_t rows, int64_t max_per_block, int64_t min_per_block) {
  units = std::max<int64_t>(units, 1);
  int64_t per = std::min(units, max_per_block);
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = threads > 1 ? 4 * threads : 1;
  while (per > min_per_block && rows * ((units + per - 1) / per) < wanted) {
    per = (per + 1) / 2;
  }
  return std::max<int64_t>(per, 1);
}

// Runs f(begin, end) over the tasks [0, ntasks) on ATen's threads. `work` is the whole call's
// size in element-steps (tokens x channels, times b for a block-diagonal mat-vec, ...): each
// thread is handed at least ATen's own grain (at::internal::GRAIN_SIZE element-steps), so a call
// smaller than that runs on the calling thread. Forking a call of a few microseconds onto a second
// thread costs more than it saves, and on a loaded machine the join waits for a time slice.
template <typename F>
inline void parallel_tasks(int64_t ntasks, int64_t work, const F& f) {
  if (ntasks <= 0) return;
  work = std::max<int64_t>(work, 1);
  const int64_t grain = std::max<int64_t>(1, (at::internal::GRAIN_SIZE * ntasks + work - 1) / work);
  at::parallel_for(0, ntasks, grain, f);
}

// ---- output buffers --------------------------------------------------------------------------

// Outputs of at least this many bytes ask the kernel for transparent huge pages.
constexpr size_t kHugePageMinBytes = size_t(8) << 20;

// Whether large outputs get MADV_HUGEPAGE (LINREC_CPP_HUGEPAGES=0 turns it off; read once).
inline bool hugepages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("LINREC_CPP_HUGEPAGES");
    return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0 ||
                             std::strcmp(v, "no") == 0);
  }();
  return wanted;
}

// at::empty for an output the kernel writes once, first touch included. A fresh large buffer is
// mapped by the allocator and faulted in 4 KiB pages as the kernel first writes it: at one
// thread that zeroing and fault handling cost more than the scan itself (measured: a 134 MB
// dL/dA took 65 ms of page faults, the sweep about 30 ms). With transparent huge pages in
// "madvise" mode, MADV_HUGEPAGE on the 2 MiB-aligned interior of the buffer (before anything
// touched it) makes those 2 MiB faults, as PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every
// allocation. Only a hint: where the kernel has no huge pages nothing changes.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = t.nbytes();
  if (bytes >= kHugePageMinBytes && hugepages_wanted()) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace linrec_cpu
