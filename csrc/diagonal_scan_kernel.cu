// CUDA diagonal scan h_t = a_t * h_{t-1} + x_t: one pass over memory, any T, any number of channels.
//
// Algorithm
// ---------
// Each step is the affine map h -> a h + x, and maps compose associatively:
//
//     (A1, X1) then (A2, X2)  =  (A2 A1, A2 X1 + X2)
//
// so a scan over time is a prefix "sum" of maps under this composition.
//
// Tiling. The (B, T, D) tensors have channels innermost. A thread block owns a tile of
// kChunk consecutive time steps ("a chunk") by CW channels: 8 "channel lanes" of a warp each
// load one vector of V channels (16 bytes: 4 fp32 or 2 complex64; 8 bytes: 4 bf16/fp16), and
// the other 4 lanes of the warp (its "time lanes") sit at different times, so one load
// instruction of a warp reads 4 full rows of CW = 8 V channels (128 or 64 contiguous bytes).
// Each thread walks kSteps = 4 consecutive steps of its channels (kChunk = 32 * 4 = 128 steps):
//
//   1. Thread: the map of its own steps, from registers (the raw vectors stay there).
//   2. Warp:   an inclusive scan of those maps over the 4 time lanes with __shfl_up_sync.
//   3. Block:  warps exchange their totals in shared memory; each thread composes the totals of
//              the warps before it, which gives the map from the chunk's start to its first step.
//   4. Grid:   the state entering the chunk comes from the chunks before it by decoupled
//              look-back (Merrill & Garland, "Single-pass Parallel Prefix Scan with Decoupled
//              Look-back"): the block publishes its chunk's map ("aggregate"), then walks back
//              over the preceding chunks, composing their aggregates until it meets one that
//              has published its inclusive state ("prefix"), and finally publishes its own
//              prefix. Blocks take chunks in order from an atomic ticket, so every chunk a block
//              waits for is already running: there is no deadlock whatever the launch order.
//   5. Thread: applies its entering map to the chunk's carry and re-walks its steps from
//              registers, writing every state.
//
// The look-back runs on a ninth warp that holds no data, synchronised with the eight data warps
// by named barriers, so waiting for a predecessor adds no registers to the data warps (<= 96
// registers: two blocks per SM, one computing while the other waits).
//
// So long sequences with few channels spread over many blocks, while a, x and h each cross
// memory once.
//
// Sequence starts and packed sequences (cu_seqlens). At the first step of a sequence (in scan
// order) the coefficient is replaced by 0 and the initial state is folded into the input,
// x' = x + a * h0. The scan then needs no special carry for the start: chunk boundaries may fall
// anywhere, and packed sequences are simply one long scan with resets.
//
// Backward. dL/dx is the same scan run in the opposite direction with the next step's conjugated
// coefficient (0 past a sequence's end), on the incoming gradient. dL/da_t = g_t conj(h_{t-1})
// (h0 at the sequence start) and dL/dh0 = conj(a_first) g_first are fused into the second walk.

#include "diagonal_scan.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

namespace linrec {
namespace {

constexpr int kWarps = 8;                         // warps that load, scan and store the data
constexpr int kThreads = kWarps * 32;
constexpr int kBlockThreads = kThreads + 32;      // plus one warp for the look-back
constexpr int kChanLanes = 8;                     // lanes across channels in a warp
constexpr int kTimeLanes = 32 / kChanLanes;       // lanes across time in a warp
constexpr int kGroups = kWarps * kTimeLanes;      // time groups per block
constexpr int kMinBlocksPerSM = 2;

// Status of a chunk in the look-back.
constexpr int kNotReady = 0;
constexpr int kAggregateReady = 1;
constexpr int kPrefixReady = 2;

// Named barriers between the data warps and the look-back warp (0 is __syncthreads).
constexpr int kTotalsReady = 1;
constexpr int kCarryReady = 2;

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- accumulation arithmetic: float, or complex float ----------------------------------------

struct cfloat {
  float re, im;
};

__device__ __forceinline__ float mul(float a, float b) { return a * b; }
__device__ __forceinline__ cfloat mul(cfloat a, cfloat b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
// Product of two coefficient aggregates, clamped to a finite range (NaN stays NaN): an
// aggregate that overflowed (|a| > 1 over many steps) would meet a zero state as
// inf * 0 = NaN where the sequential loop is exact (0).
constexpr float kProductBound = 3.0e38f;
__device__ __forceinline__ float saturate(float v) {
  return fabsf(v) > kProductBound ? copysignf(kProductBound, v) : v;
}
__device__ __forceinline__ float mul_coef(float a, float b) { return saturate(a * b); }
__device__ __forceinline__ cfloat mul_coef(cfloat a, cfloat b) {
  const cfloat p = mul(a, b);
  return {saturate(p.re), saturate(p.im)};
}
// a * b + c
__device__ __forceinline__ float mad(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ cfloat mad(cfloat a, cfloat b, cfloat c) {
  return {fmaf(a.re, b.re, fmaf(-a.im, b.im, c.re)), fmaf(a.re, b.im, fmaf(a.im, b.re, c.im))};
}
__device__ __forceinline__ float conj(float a) { return a; }
__device__ __forceinline__ cfloat conj(cfloat a) { return {a.re, -a.im}; }
__device__ __forceinline__ float shfl_up(float v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
__device__ __forceinline__ cfloat shfl_up(cfloat v, int delta) {
  return {__shfl_up_sync(0xffffffffu, v.re, delta), __shfl_up_sync(0xffffffffu, v.im, delta)};
}
// L2-only loads for values another block published (L1 is not coherent across SMs).
__device__ __forceinline__ float load_published(const float* p) { return __ldcg(p); }
__device__ __forceinline__ cfloat load_published(const cfloat* p) {
  const float2 v = __ldcg(reinterpret_cast<const float2*>(p));
  return {v.x, v.y};
}

template <typename Acc> __device__ __forceinline__ Acc acc_zero();
template <> __device__ __forceinline__ float acc_zero<float>() { return 0.f; }
template <> __device__ __forceinline__ cfloat acc_zero<cfloat>() { return {0.f, 0.f}; }
template <typename Acc> __device__ __forceinline__ Acc acc_one();
template <> __device__ __forceinline__ float acc_one<float>() { return 1.f; }
template <> __device__ __forceinline__ cfloat acc_one<cfloat>() { return {1.f, 0.f}; }

// ---- storage dtypes ----------------------------------------------------------------------------

template <typename S> struct Storage;
template <> struct Storage<float> {
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(Acc v) { return v; }
};
template <> struct Storage<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(Acc v) { return __float2bfloat16_rn(v); }
};
template <> struct Storage<__half> {
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(Acc v) { return __float2half_rn(v); }
};
template <> struct Storage<cfloat> {
  using Acc = cfloat;
  static __device__ __forceinline__ Acc to_acc(cfloat v) { return v; }
  static __device__ __forceinline__ cfloat from_acc(Acc v) { return v; }
};

// A vector of consecutive channels, the unit of every load and store: 16 bytes (4 fp32, 2
// complex64), or 8 bytes (4 bf16 / fp16) so that every thread accumulates at most 4 fp32 lanes.
template <typename S> struct PackTraits {
  static constexpr int kBytes = sizeof(S) == 2 ? 8 : 16;
  using Raw = typename std::conditional<kBytes == 16, uint4, uint2>::type;
};
template <typename S> struct alignas(PackTraits<S>::kBytes) Pack {
  static constexpr int kSize = PackTraits<S>::kBytes / sizeof(S);
  S e[kSize];
};

// Consecutive time steps walked by one thread. The raw vectors of its steps stay in registers
// between the two walks; 4 steps (with the look-back warp kept apart) fit two blocks per SM
// (<= 96 registers) without spills for every dtype.
constexpr int kSteps = 4;
constexpr int kChunk = kGroups * kSteps;          // time steps per block

template <typename S> __device__ __forceinline__ Pack<S> zero_pack() {
  Pack<S> p;
  memset(&p, 0, sizeof(p));
  return p;
}

// Loads channels c0 .. c0 + kSize - 1 of a row. kVectorized: one vector load, the caller
// guarantees alignment, unit stride and D % kSize == 0; otherwise element by element.
template <typename S, bool kVectorized>
__device__ __forceinline__ Pack<S> load_pack(const S* row, int64_t c0, int64_t dim, int64_t stride) {
  if constexpr (kVectorized) {
    if (c0 >= dim) return zero_pack<S>();
    using Raw = typename PackTraits<S>::Raw;
    const Raw raw = __ldg(reinterpret_cast<const Raw*>(row + c0));
    Pack<S> p;
    memcpy(&p, &raw, sizeof(p));
    return p;
  } else {
    Pack<S> p = zero_pack<S>();
#pragma unroll
    for (int v = 0; v < Pack<S>::kSize; ++v) {
      if (c0 + v < dim) p.e[v] = row[(c0 + v) * stride];
    }
    return p;
  }
}

// Vector stores. A struct assignment such as *reinterpret_cast<uint4*>(p) = v is split by the
// compiler into four scalar 4-byte st.global (it stores the struct field by field); inline PTX
// states the vector store outright. The caller guarantees the alignment (16 or 8 bytes).
__device__ __forceinline__ void store_global_v4(void* ptr, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void store_global_v2(void* ptr, const uint2& v) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(ptr), "r"(v.x), "r"(v.y) : "memory");
}
__device__ __forceinline__ void store_global_vec(void* ptr, const uint4& v) { store_global_v4(ptr, v); }
__device__ __forceinline__ void store_global_vec(void* ptr, const uint2& v) { store_global_v2(ptr, v); }

// Stores channels c0 .. c0 + kSize - 1 of a row: one 16-byte (fp32, complex64) or 8-byte
// (bf16, fp16) vector store when kVectorized, element by element otherwise.
template <typename S, bool kVectorized>
__device__ __forceinline__ void store_pack(S* row, int64_t c0, int64_t dim, const Pack<S>& p) {
  if constexpr (kVectorized) {
    if (c0 >= dim) return;
    using Raw = typename PackTraits<S>::Raw;
    Raw raw;
    memcpy(&raw, &p, sizeof(p));
    store_global_vec(row + c0, raw);
  } else {
#pragma unroll
    for (int v = 0; v < Pack<S>::kSize; ++v) {
      if (c0 + v < dim) row[c0 + v] = p.e[v];
    }
  }
}

// Stores kV accumulation-dtype values of consecutive channels (dL/da), 16 bytes at a time when
// vectorized.
template <typename Acc, int kV, bool kVectorized>
__device__ __forceinline__ void store_acc(Acc* row, int64_t c0, int64_t dim, const Acc (&vals)[kV]) {
  if constexpr (kVectorized) {
    if (c0 >= dim) return;
    static_assert((sizeof(Acc) * kV) % 16 == 0, "vector store of whole 16-byte words");
    constexpr int kWords = sizeof(Acc) * kV / 16;
    uint4 words[kWords];
    memcpy(words, vals, sizeof(words));
#pragma unroll
    for (int w = 0; w < kWords; ++w) store_global_v4(reinterpret_cast<uint4*>(row + c0) + w, words[w]);
  } else {
#pragma unroll
    for (int v = 0; v < kV; ++v) {
      if (c0 + v < dim) row[c0 + v] = vals[v];
    }
  }
}

// The look-back's flags under the PTX memory model. A publisher's lanes store the payload and
// meet at __syncwarp (a barrier: their stores happen before whatever lane 0 does next); lane 0
// then writes the flag with release semantics, so a reader that reads the flag with an acquire
// load (every lane its own) sees the whole payload. An acquire read by lane 0 alone, handed to
// the other lanes by __shfl_sync, would order nothing for them: a shuffle is not a memory
// operation, and a fence after it orders nothing against a store the lane never observed.
__device__ __forceinline__ int load_flag_acquire(const int* flag) {
  int value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
  return value;
}
__device__ __forceinline__ void store_flag_release(int* flag, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(flag), "r"(value) : "memory");
}

// Index of the packed sequence that holds time step t: the largest n < N with cu[n] <= t
// (that sequence is non-empty, since t < cu[N]).
__device__ __forceinline__ int64_t sequence_of(const int64_t* cu, int64_t num_seqs, int64_t t) {
  int64_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (__ldg(cu + mid) <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct Workspace {
  int* ticket;     // next chunk to hand out
  int* flags;      // one status per (row, channel tile, chunk)
  void* aggregates;  // per status: CW coefficients A then CW inputs X of the chunk's map
  void* prefixes;    // per status: CW states at the chunk's end
  int64_t channel_tiles;
  int64_t chunks;
};

// Step 4 of the algorithm, run by the first kChanLanes lanes of the look-back warp: composes the
// chunk's map from the warp totals, publishes it, walks back over the preceding chunks of the same
// (row, channel tile) to find the state entering this chunk, publishes this chunk's end state and
// leaves the entering state in carry_sm. Lane `lane` owns channels lane * V .. lane * V + V - 1.
template <typename Acc, int V, int CW>
__device__ __forceinline__ void look_back(const Workspace& ws, int lane, int64_t b, int64_t ctile, int64_t chunk,
                                          const Acc (*warp_A)[CW], const Acc (*warp_X)[CW], Acc* carry_sm) {
  const unsigned mask = (1u << kChanLanes) - 1u;
  Acc tot_A[V], tot_X[V];  // the whole chunk's map
#pragma unroll
  for (int v = 0; v < V; ++v) {
    tot_A[v] = acc_one<Acc>();
    tot_X[v] = acc_zero<Acc>();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const Acc W_A = warp_A[w][lane * V + v], W_X = warp_X[w][lane * V + v];
      tot_X[v] = mad(W_A, tot_X[v], W_X);
      tot_A[v] = mul_coef(W_A, tot_A[v]);
    }
  }
  const int64_t status = ((b * ws.channel_tiles) + ctile) * ws.chunks + chunk;
  Acc* aggregates = static_cast<Acc*>(ws.aggregates);
  Acc* prefixes = static_cast<Acc*>(ws.prefixes);
  Acc carry[V];
#pragma unroll
  for (int v = 0; v < V; ++v) carry[v] = acc_zero<Acc>();  // every sequence starts in chunk 0

  // Only the chunks after this one read its status; the last chunk (e.g. every chunk of a
  // sequence shorter than kChunk) publishes nothing.
  const bool has_successor = chunk + 1 < ws.chunks;
  if (chunk > 0) {
    if (has_successor) {
      Acc* agg = aggregates + status * 2 * CW;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        agg[lane * V + v] = tot_A[v];
        agg[CW + lane * V + v] = tot_X[v];
      }
      __syncwarp(mask);
      if (lane == 0) store_flag_release(ws.flags + status, kAggregateReady);
    }

    // Walk back: R is the map of the chunks between the one looked at and this one.
    Acc R_A[V], R_X[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      R_A[v] = acc_one<Acc>();
      R_X[v] = acc_zero<Acc>();
    }
    for (int64_t j = status - 1;; --j) {  // chunk 0 always publishes a prefix: j stays in range
      // Every lane acquires the flag itself (see load_flag_acquire). Lanes may see different
      // values (a chunk's flag goes 1 -> 2); a lane that saw the prefix also sees the aggregate,
      // published before it, so the warp takes the prefix only when every lane saw it and
      // otherwise composes the aggregate, and stays converged.
      int flag;
      while ((flag = load_flag_acquire(ws.flags + j)) == kNotReady) __nanosleep(64);
      if (__all_sync(mask, flag == kPrefixReady)) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          carry[v] = mad(R_A[v], load_published(prefixes + j * CW + lane * V + v), R_X[v]);
        }
        break;
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {  // R = (chunk j) then R
        const Acc J_A = load_published(aggregates + j * 2 * CW + lane * V + v);
        const Acc J_X = load_published(aggregates + j * 2 * CW + CW + lane * V + v);
        R_X[v] = mad(R_A[v], J_X, R_X[v]);
        R_A[v] = mul_coef(R_A[v], J_A);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) carry_sm[lane * V + v] = carry[v];
  if (has_successor) {  // publish this chunk's end state for the chunks after it
#pragma unroll
    for (int v = 0; v < V; ++v) prefixes[status * CW + lane * V + v] = mad(tot_A[v], carry[v], tot_X[v]);
    __syncwarp(mask);
    if (lane == 0) store_flag_release(ws.flags + status, kPrefixReady);
  }
}

template <typename S, bool kBackward, bool kVectorized>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
diagonal_scan_kernel(const DiagonalScanParams p, const Workspace ws) {
  using Tr = Storage<S>;
  using Acc = typename Tr::Acc;
  constexpr int V = Pack<S>::kSize;   // channels per thread
  constexpr int CW = kChanLanes * V;  // channels per block

  __shared__ int ticket_sm;
  __shared__ Acc warp_A[kWarps][CW];
  __shared__ Acc warp_X[kWarps][CW];
  __shared__ Acc carry_sm[CW];

  // Chunks are handed out in scan order (the chunk index varies slowest), so the chunks this
  // block will wait for were handed out, and started, before it.
  if (threadIdx.x == 0) ticket_sm = atomicAdd(ws.ticket, 1);
  __syncthreads();
  const int64_t rows = p.cu_seqlens != nullptr ? 1 : p.batch;
  const int64_t tile = ticket_sm;
  const int64_t chunk = tile / (rows * ws.channel_tiles);
  const int64_t b = (tile / ws.channel_tiles) % rows;
  const int64_t ctile = tile % ws.channel_tiles;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (warp == kWarps) {
    // The look-back warp holds none of the data, so its waiting costs the data warps no registers.
    named_barrier_sync(kTotalsReady, kBlockThreads);
    if (lane < kChanLanes) look_back<Acc, V, CW>(ws, lane, b, ctile, chunk, warp_A, warp_X, carry_sm);
    __syncwarp();
    named_barrier_sync(kCarryReady, kBlockThreads);
    return;
  }
  const int chan_lane = lane % kChanLanes;
  const int time_lane = lane / kChanLanes;
  const int group = warp * kTimeLanes + time_lane;

  const int64_t T = p.seqlen, D = p.dim;
  const int64_t c0 = ctile * CW + chan_lane * V;  // this thread's first channel
  // The scan walks time downwards for a reverse forward pass and for the backward of a
  // forward-in-time pass; `dir` is its time step, `pos` counts steps in scan order.
  const bool down = p.reverse != p.backward;
  const int64_t dir = down ? -1 : 1;
  const int64_t pos0 = chunk * kChunk + group * kSteps;  // scan position of this thread's step 0
  const int nvalid = static_cast<int>(max(int64_t(0), min(int64_t(kSteps), T - pos0)));
  auto time_of = [&](int i) -> int64_t { return down ? T - 1 - (pos0 + i) : pos0 + i; };

  const S* a = static_cast<const S*>(p.a);
  const S* x = static_cast<const S*>(p.x);
  const Acc* h0 = static_cast<const Acc*>(p.h0);
  const int64_t x_row0 = b * T;  // row of (b, t = 0)
  const S* a_b = a + b * p.a_stride_b;

  // Steps of this thread that begin (first) or end (last) a sequence, in scan order: bit i.
  uint32_t first_mask = 0, last_mask = 0;
  if (nvalid > 0) {
    if (p.cu_seqlens == nullptr) {
      if (pos0 == 0) first_mask = 1u;
      if (T - 1 - pos0 < nvalid) last_mask = 1u << (T - 1 - pos0);
    } else {
      const int64_t t_lo = down ? time_of(nvalid - 1) : time_of(0);
      const int64_t t_hi = t_lo + nvalid - 1;
      auto bit = [&](int64_t t) -> uint32_t {
        return 1u << static_cast<int>(down ? time_of(0) - t : t - pos0);
      };
      for (int64_t n = sequence_of(p.cu_seqlens, p.num_seqs, t_lo); n < p.num_seqs; ++n) {
        const int64_t s = __ldg(p.cu_seqlens + n), e = __ldg(p.cu_seqlens + n + 1);
        if (s > t_hi) break;
        if (e == s) continue;
        const int64_t t_first = down ? e - 1 : s, t_last = down ? s : e - 1;
        if (t_first >= t_lo && t_first <= t_hi) first_mask |= bit(t_first);
        if (t_last >= t_lo && t_last <= t_hi) last_mask |= bit(t_last);
      }
    }
  }
  auto seq_of = [&](int64_t t) -> int64_t {
    return p.cu_seqlens == nullptr ? b : sequence_of(p.cu_seqlens, p.num_seqs, t);
  };

  // ---- 1. load this thread's steps and compose their maps -------------------------------------
  Pack<S> coef[kSteps], input[kSteps];
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    coef[i] = zero_pack<S>();
    input[i] = zero_pack<S>();
    if (i < nvalid) {
      const int64_t t = time_of(i);
      input[i] = load_pack<S, kVectorized>(x + (x_row0 + t) * D, c0, D, 1);
      // Forward: a_t. Backward: a of the previous step in scan order (the next forward step),
      // absent at a sequence's first scan step.
      const bool first = (first_mask >> i) & 1u;
      if (!kBackward || !first) {
        const int64_t tc = kBackward ? t - dir : t;
        coef[i] = load_pack<S, kVectorized>(a_b + tc * p.a_stride_t, c0, D, p.a_stride_d);
      }
    }
  }

  // The initial-state row that enters at step i (forward pass, where a sequence starts), or null.
  auto h0_row_at = [&](int i) -> const Acc* {
    if (kBackward || h0 == nullptr || !((first_mask >> i) & 1u)) return nullptr;
    return h0 + seq_of(time_of(i)) * D;
  };
  // The effective (coefficient, input) of step i, channel v.
  auto step_map = [&](int i, int v, const Acc* h0_row, Acc& c, Acc& u) {
    c = Tr::to_acc(coef[i].e[v]);
    u = Tr::to_acc(input[i].e[v]);
    if (kBackward) c = conj(c);
    if ((first_mask >> i) & 1u) {
      // A sequence starts here: no carry in; the initial state enters through the input.
      if (h0_row != nullptr && c0 + v < D) u = mad(c, h0_row[c0 + v], u);
      c = acc_zero<Acc>();
    }
  };

  Acc A[V], X[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    A[v] = acc_one<Acc>();
    X[v] = acc_zero<Acc>();
  }
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    if (i < nvalid) {
      const Acc* h0_row = h0_row_at(i);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        Acc c, u;
        step_map(i, v, h0_row, c, u);
        A[v] = mul_coef(c, A[v]);
        X[v] = mad(c, X[v], u);
      }
    }
  }

  // ---- 2. inclusive scan over the warp's time lanes (lanes kChanLanes apart) ------------------
#pragma unroll
  for (int offset = kChanLanes; offset < 32; offset *= 2) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const Acc prev_A = shfl_up(A[v], offset);
      const Acc prev_X = shfl_up(X[v], offset);
      if (lane >= offset) {  // (prev) then (mine)
        X[v] = mad(A[v], prev_X, X[v]);
        A[v] = mul_coef(A[v], prev_A);
      }
    }
  }
  // Exclusive map: from the warp's first step up to (not including) this thread's first step.
  Acc E_A[V], E_X[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    E_A[v] = shfl_up(A[v], kChanLanes);
    E_X[v] = shfl_up(X[v], kChanLanes);
    if (time_lane == 0) {
      E_A[v] = acc_one<Acc>();
      E_X[v] = acc_zero<Acc>();
    }
  }
  if (time_lane == kTimeLanes - 1) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      warp_A[warp][chan_lane * V + v] = A[v];
      warp_X[warp][chan_lane * V + v] = X[v];
    }
  }
  named_barrier_sync(kTotalsReady, kBlockThreads);

  // ---- 3. compose the totals of the warps before this one -------------------------------------
#pragma unroll
  for (int v = 0; v < V; ++v) {
    Acc P_A = acc_one<Acc>(), P_X = acc_zero<Acc>();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) {
        const Acc W_A = warp_A[w][chan_lane * V + v], W_X = warp_X[w][chan_lane * V + v];
        P_X = mad(W_A, P_X, W_X);
        P_A = mul_coef(W_A, P_A);
      }
    }
    // Entering map of this thread = (warps before) then (lanes before).
    E_X[v] = mad(E_A[v], P_X, E_X[v]);
    E_A[v] = mul_coef(E_A[v], P_A);
  }

  // ---- 4. wait for the look-back warp to publish the state entering this chunk -----------------
  named_barrier_sync(kCarryReady, kBlockThreads);

  // ---- 5. re-walk this thread's steps from the entering state, writing every state ------------
  Acc state[V];
#pragma unroll
  for (int v = 0; v < V; ++v) state[v] = mad(E_A[v], carry_sm[chan_lane * V + v], E_X[v]);

  S* out = static_cast<S*>(p.out);
  const S* h = static_cast<const S*>(p.h);
  Acc* grad_a = static_cast<Acc*>(p.grad_a);
  Acc* grad_h0 = static_cast<Acc*>(p.grad_h0);
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    if (i < nvalid) {
      const int64_t t = time_of(i);
      const Acc* h0_row = h0_row_at(i);
      Pack<S> result;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        Acc c, u;
        step_map(i, v, h0_row, c, u);
        state[v] = mad(c, state[v], u);
        result.e[v] = Tr::from_acc(state[v]);
      }
      store_pack<S, kVectorized>(out + (x_row0 + t) * D, c0, D, result);

      if constexpr (kBackward) {
        // dL/da_t = g_t conj(h_prev), h_prev the forward state before t: the next step in scan
        // order, or the initial state at the sequence's last scan step (its forward start).
        const bool last = (last_mask >> i) & 1u;
        Acc h_prev[V];
        if (!last) {
          const Pack<S> hp = load_pack<S, kVectorized>(h + (x_row0 + t + dir) * D, c0, D, 1);
#pragma unroll
          for (int v = 0; v < V; ++v) h_prev[v] = Tr::to_acc(hp.e[v]);
        } else {
          const int64_t n = seq_of(t);
          const Pack<S> a_first = load_pack<S, kVectorized>(a_b + t * p.a_stride_t, c0, D, p.a_stride_d);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const bool ok = c0 + v < D;
            h_prev[v] = (h0 != nullptr && ok) ? h0[n * D + c0 + v] : acc_zero<Acc>();
            // dL/dh0 = conj(a_first) g_first
            if (ok) grad_h0[n * D + c0 + v] = mul(conj(Tr::to_acc(a_first.e[v])), state[v]);
          }
        }
        Acc ga[V];
#pragma unroll
        for (int v = 0; v < V; ++v) ga[v] = mul(state[v], conj(h_prev[v]));
        store_acc<Acc, V, kVectorized>(grad_a + (x_row0 + t) * D, c0, D, ga);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------

size_t storage_bytes(ScanDtype dtype) {
  switch (dtype) {
    case ScanDtype::kFloat32: return 4;
    case ScanDtype::kBFloat16:
    case ScanDtype::kFloat16: return 2;
    case ScanDtype::kComplex64: return 8;
  }
  return 4;
}

// Host mirrors of PackTraits / Pack.
int64_t pack_bytes(ScanDtype dtype) { return storage_bytes(dtype) == 2 ? 8 : 16; }
int64_t channels_per_thread(ScanDtype dtype) { return pack_bytes(dtype) / static_cast<int64_t>(storage_bytes(dtype)); }
int64_t channels_per_block(ScanDtype dtype) { return kChanLanes * channels_per_thread(dtype); }

size_t acc_bytes(ScanDtype dtype) { return dtype == ScanDtype::kComplex64 ? 8 : 4; }

struct Layout {
  int64_t rows, channel_tiles, chunks, statuses;
  size_t flag_bytes, aggregate_offset, prefix_offset, total_bytes;
};

size_t round_up16(size_t n) { return (n + 15) / 16 * 16; }

Layout layout_of(const DiagonalScanParams& p) {
  Layout l;
  const int64_t cw = channels_per_block(p.dtype);
  l.rows = p.cu_seqlens != nullptr ? 1 : p.batch;
  l.channel_tiles = (p.dim + cw - 1) / cw;
  l.chunks = (p.seqlen + kChunk - 1) / kChunk;
  l.statuses = l.rows * l.channel_tiles * l.chunks;
  l.flag_bytes = round_up16(sizeof(int) * (1 + l.statuses));  // ticket, then one flag per status
  l.aggregate_offset = l.flag_bytes;
  l.prefix_offset = l.aggregate_offset + round_up16(l.statuses * 2 * cw * acc_bytes(p.dtype));
  l.total_bytes = l.prefix_offset + round_up16(l.statuses * cw * acc_bytes(p.dtype));
  return l;
}

bool aligned(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename S, bool kBackward>
void launch_typed(const DiagonalScanParams& p, const Workspace& ws, int64_t blocks, bool vectorized,
                  cudaStream_t stream) {
  if (vectorized) {
    diagonal_scan_kernel<S, kBackward, true><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(p, ws);
  } else {
    diagonal_scan_kernel<S, kBackward, false><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(p, ws);
  }
}

template <typename S>
void launch_dtype(const DiagonalScanParams& p, const Workspace& ws, int64_t blocks, bool vectorized,
                  cudaStream_t stream) {
  if (p.backward) launch_typed<S, true>(p, ws, blocks, vectorized, stream);
  else launch_typed<S, false>(p, ws, blocks, vectorized, stream);
}

}  // namespace

size_t diagonal_scan_workspace_bytes(const DiagonalScanParams& params) { return layout_of(params).total_bytes; }

cudaError_t diagonal_scan_launch(const DiagonalScanParams& p, void* workspace, cudaStream_t stream) {
  if (p.seqlen == 0 || p.dim == 0 || p.num_seqs == 0 || p.batch == 0) return cudaSuccess;
  const Layout l = layout_of(p);
  if (l.statuses > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // ticket is an int

  // Vector loads need whole vectors per row, aligned rows and unit-stride channels of a; the
  // fp32 dL/da rows are then 16-byte aligned too.
  const int64_t vec = channels_per_thread(p.dtype), bytes = pack_bytes(p.dtype);
  const bool vectorized = p.dim % vec == 0 && p.a_stride_d == 1 && p.a_stride_t % vec == 0 &&
                          p.a_stride_b % vec == 0 && aligned(p.a, bytes) && aligned(p.x, bytes) &&
                          aligned(p.out, bytes) && aligned(p.h, bytes) && aligned(p.grad_a, 16);

  char* base = static_cast<char*>(workspace);
  Workspace ws;
  ws.ticket = reinterpret_cast<int*>(base);
  ws.flags = ws.ticket + 1;
  ws.aggregates = base + l.aggregate_offset;
  ws.prefixes = base + l.prefix_offset;
  ws.channel_tiles = l.channel_tiles;
  ws.chunks = l.chunks;
  cudaError_t err = cudaMemsetAsync(workspace, 0, l.flag_bytes, stream);
  if (err != cudaSuccess) return err;

  switch (p.dtype) {
    case ScanDtype::kFloat32: launch_dtype<float>(p, ws, l.statuses, vectorized, stream); break;
    case ScanDtype::kBFloat16: launch_dtype<__nv_bfloat16>(p, ws, l.statuses, vectorized, stream); break;
    case ScanDtype::kFloat16: launch_dtype<__half>(p, ws, l.statuses, vectorized, stream); break;
    case ScanDtype::kComplex64: launch_dtype<cfloat>(p, ws, l.statuses, vectorized, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace linrec
