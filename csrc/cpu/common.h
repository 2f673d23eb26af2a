// Shared pieces of linrec's CPU kernels: tiles of at::vec vectors in the accumulation type
// (fp32, or complex64), their loads and stores from every storage type, the list of sequences
// a call scans (dense batch rows or packed cu_seqlens spans) and the blocking heuristics.
//
// Every kernel runs one pass over time per (sequence, channel block) task; tasks run in
// parallel with at::parallel_for. Within a step the channels of a block are processed in tiles
// of two vectors, so that a bfloat16 / float16 vector converts to exactly one tile of fp32.

#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/complex.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
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

// ---- non-temporal stores of whole tiles -----------------------------------------------------
//
// A large output (kLargeOutputBytes or more: far past the caches) is written once and read only
// after the call. An ordinary store first reads each line it overwrites (read for ownership); a
// non-temporal store does not, and leaves the caches to the inputs: a forward scan then moves 3
// units of memory traffic (read a, x; write h) instead of 4, a backward 5 instead of 7. Used for
// full tiles at vector-aligned addresses (AVX-512: one fp32 / complex64 vector, or one tile of a
// 16-bit type, is one 64-byte line); each thread ends its tasks with stream_fence() so that the
// stores are visible before the parallel region joins. Other builds store normally. Which outputs
// stream: stream_output() below (those on huge pages).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define LINREC_STREAM_STORES 1
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
inline void stream_raw(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
inline void stream_raw(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
#else
constexpr uintptr_t kStreamAlign = 32;
inline void stream_raw(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
inline void stream_raw(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#endif
inline void stream_fence() { _mm_sfence(); }
#else
#define LINREC_STREAM_STORES 0
inline void stream_fence() {}
#endif

// store2 of a tile of n elements at p, non-temporal when `stream` is set, the tile is full and p
// is vector-aligned (otherwise an ordinary store2).
template <typename S, typename V>
inline void store_tile(S* p, int64_t n, const V& lo, const V& hi, bool stream) {
#if LINREC_STREAM_STORES
  if (stream && n == 2 * V::size() && (reinterpret_cast<uintptr_t>(p) & (kStreamAlign - 1)) == 0) {
    if constexpr (at::vec::is_reduced_floating_point_v<S>) {
      stream_raw(p, at::vec::convert_from_float<S>(lo, hi));  // one vector of 2 * V::size() 16-bit values
    } else {
      stream_raw(p, lo);
      stream_raw(p + V::size(), hi);
    }
    return;
  }
#endif
  store2(p, n, lo, hi);
}

// ---- arithmetic in the accumulation type ---------------------------------------------------

inline fVec conj_(const fVec& v) { return v; }
inline cVec conj_(const cVec& v) { return v.conj(); }
// a * b + c (one fused multiply-add for real vectors)
inline fVec mul_add(const fVec& a, const fVec& b, const fVec& c) { return at::vec::fmadd(a, b, c); }
// Complex products on interleaved (re, im) lanes: a * b = a.re * b -/+ a.im * swap(b), one
// multiply and one fmaddsub after three in-lane shuffles (at::vec's operator* takes a horizontal
// subtract with more shuffles; the complex scans are otherwise compute-bound at one thread).
inline cVec cmul_add(const cVec& a, const cVec& b, const cVec* c) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 av = a, bv = b;
  const __m512 prod = _mm512_fmaddsub_ps(_mm512_moveldup_ps(av), bv,
                                         _mm512_mul_ps(_mm512_movehdup_ps(av), _mm512_permute_ps(bv, 0xB1)));
  return c ? cVec(_mm512_add_ps(prod, *c)) : cVec(prod);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 av = a, bv = b;
  const __m256 prod = _mm256_fmaddsub_ps(_mm256_moveldup_ps(av), bv,
                                         _mm256_mul_ps(_mm256_movehdup_ps(av), _mm256_permute_ps(bv, 0xB1)));
  return c ? cVec(_mm256_add_ps(prod, *c)) : cVec(prod);
#else
  return c ? a * b + *c : a * b;
#endif
}
inline cVec mul_add(const cVec& a, const cVec& b, const cVec& c) { return cmul_add(a, b, &c); }
// a * b
inline fVec mul(const fVec& a, const fVec& b) { return a * b; }
inline cVec mul(const cVec& a, const cVec& b) { return cmul_add(a, b, nullptr); }

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

// ---- output buffers: the output cache ---------------------------------------------------------
//
// A fresh large output is mapped by the allocator and faulted in as the kernel first writes it:
// the kernel zeroes every page and, in a virtual machine, the host may have to back the page too
// (a guest that reports free memory to its host - virtio-balloon free page reporting - gets it
// back unbacked). At one thread that costs about as much as the scan itself (measured: a 134 MB
// dL/dA took 65 ms of 4 KiB page faults, the sweep about 30 ms), and it varies from call to call
// with what the host did meanwhile. A training or decoding loop asks for the same output sizes
// on every step, so the extension keeps the large outputs it handed out once they are freed and
// hands them out again: a cache of mapped blocks, keyed by their size, as PyTorch's CUDA caching
// allocator does on the GPU.
//
// * Only outputs of at least kLargeOutputBytes go through it (smaller ones come from PyTorch's CPU
//   allocator: their page faults are cheap and glibc's heap recycles them already).
// * Blocks are 2 MiB-aligned anonymous mappings of a whole number of 2 MiB pages, advised
//   MADV_HUGEPAGE (unless LINREC_CPP_HUGEPAGES=0), so that the first touch takes 2 MiB faults.
// * A freed block is kept while the cache holds at most its limit in bytes, the oldest blocks
//   unmapped first; otherwise it is unmapped at once. The limit is LINREC_CPP_CACHE_MB (MiB; 0
//   turns the cache off: every block is unmapped when freed), by default an eighth of the
//   physical memory, at most 4 GiB; `set_limit` changes it (Python: linrec._cpp).
// * Outputs are tensors over these blocks, made through OutputAllocator below (a DataPtr whose
//   deleter returns the block): ordinary, resizable CPU tensors.
// * The cache never shrinks a block or hands out a block of another size, so it cannot fragment;
//   `release` unmaps every cached block (linrec._cpp.empty_output_cache()).

// Outputs of at least this many bytes come from the cache (and are backed by huge pages).
constexpr size_t kLargeOutputBytes = size_t(8) << 20;
constexpr size_t kHugePageBytes = size_t(2) << 20;

// Whether large outputs get MADV_HUGEPAGE (LINREC_CPP_HUGEPAGES=0 turns it off; read once).
inline bool hugepages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("LINREC_CPP_HUGEPAGES");
    return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0 ||
                             std::strcmp(v, "no") == 0);
  }();
  return wanted;
}

class OutputCache {
 public:
  struct Info {
    size_t cached_bytes, cached_blocks, limit_bytes, hits, misses;
  };

  // The one cache of the process. Never destroyed: tensors over its blocks may be freed during
  // interpreter shutdown, after static destructors have run.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // A block of `bytes` (a multiple of kHugePageBytes): a cached one of that size, else a new
  // mapping (huge-page advised, not yet touched).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes == bytes) {
          void* p = it->ptr;
          free_.erase(std::next(it).base());
          cached_ -= bytes;
          ++hits_;
          return p;
        }
      }
      ++misses_;
    }
    return map_block(bytes);
  }

  // Returns a block handed out by `take`: cached if the limit allows (the oldest cached blocks
  // unmapped to make room), else unmapped.
  void give_back(void* ptr, size_t bytes) {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        unmap.push_back({ptr, bytes});
      } else {
        free_.push_back({ptr, bytes});
        cached_ += bytes;
        evict_locked(limit_, unmap);
      }
    }
    unmap_all(unmap);
  }

  // Unmaps every cached block (blocks in use are not affected).
  void release() { trim(0); }

  // Sets the limit in bytes (0: no caching) and unmaps the oldest blocks above it; returns the old one.
  size_t set_limit(size_t bytes) {
    size_t old;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = limit_;
      limit_ = bytes;
    }
    trim(bytes);
    return old;
  }

  Info info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, free_.size(), limit_, hits_, misses_};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  OutputCache() : limit_(default_limit()) {}

  static size_t default_limit() {
    if (const char* v = std::getenv("LINREC_CPP_CACHE_MB")) {
      char* end = nullptr;
      const long long mb = std::strtoll(v, &end, 10);
      if (end != v && *end == '\0' && mb >= 0) return size_t(mb) << 20;
      TORCH_WARN("LINREC_CPP_CACHE_MB=", v, " is not a number of MiB >= 0; using the default");
    }
    size_t physical = 0;
#if defined(__linux__)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) physical = size_t(pages) * size_t(page);
#endif
    return physical ? std::min(physical / 8, size_t(4) << 30) : (size_t(1) << 30);
  }

  // Unmaps the oldest cached blocks until at most `keep` bytes stay cached.
  void trim(size_t keep) {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_locked(keep, unmap);
    }
    unmap_all(unmap);
  }

  // With the lock held: moves the oldest cached blocks to `unmap` until at most `keep` bytes stay.
  void evict_locked(size_t keep, std::vector<Block>& unmap) {
    while (cached_ > keep) {
      unmap.push_back(free_.front());
      cached_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  // Outside the lock: munmap of a large block takes a while.
  static void unmap_all(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) unmap_block(b);
  }

  static void* map_block(size_t bytes) {
#if defined(__linux__)
    // Map one huge page more than asked and cut the ends off, so the block starts 2 MiB-aligned
    // and every one of its pages can be a huge page.
    const size_t span = bytes + kHugePageBytes;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "linrec's CPU backend: out of memory mapping an output of ", bytes, " bytes");
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePageBytes - 1) & ~uintptr_t(kHugePageBytes - 1);
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t tail = aligned + bytes, span_end = start + span;
    if (span_end > tail) munmap(reinterpret_cast<void*>(tail), span_end - tail);
#if defined(MADV_HUGEPAGE)
    if (hugepages_wanted()) madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
#endif
    return reinterpret_cast<void*>(aligned);
#else
    void* p = std::aligned_alloc(kHugePageBytes, bytes);
    TORCH_CHECK(p != nullptr, "linrec's CPU backend: out of memory allocating an output of ", bytes, " bytes");
    return p;
#endif
  }

  static void unmap_block(const Block& b) {
#if defined(__linux__)
    munmap(b.ptr, b.bytes);
#else
    std::free(b.ptr);
#endif
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // cached blocks, oldest first
  size_t cached_ = 0;
  size_t limit_;
  size_t hits_ = 0, misses_ = 0;
};

// The allocator of the outputs: blocks from the OutputCache for kLargeOutputBytes or more (the
// DataPtr's context records the block, so that its deleter hands it back), PyTorch's CPU allocator
// below that. Tensors made with it are ordinary CPU tensors: a growing resize_ allocates through
// it again, clone / share_memory_ / torch.save copy out as usual.
class OutputAllocator final : public c10::Allocator {
 public:
  static OutputAllocator* get() {
    static OutputAllocator* allocator = new OutputAllocator();  // never destroyed (see OutputCache::get)
    return allocator;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kLargeOutputBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
    void* p = OutputCache::get().take(bytes);
    return {p, new CachedBlock{p, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct CachedBlock {
    void* ptr;
    size_t bytes;
  };

  static void give_back(void* context) {
    auto* block = static_cast<CachedBlock*>(context);
    OutputCache::get().give_back(block->ptr, block->bytes);
    delete block;
  }
};

// Whether a kernel writes `out` with non-temporal stores: outputs from the output cache that sit on
// huge pages. On 4 KiB pages (LINREC_CPP_HUGEPAGES=0) a fresh output's first touch faults every
// 4 KiB, and the kernel zeroes each page through the caches just before the non-temporal store
// evicts it again: measured slower than ordinary stores there (fwd+bwd 3.5-3.9x the floor, against
// 3.1-3.4x).
inline bool stream_output(const at::Tensor& out) {
  return out.nbytes() >= kLargeOutputBytes && hugepages_wanted();
}

// An uninitialised contiguous output (the kernels write every element of it), from OutputAllocator.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace linrec_cpu
