// Diagonal scan on the CPU: h_t = a_t * h_{t-1} + x_t (reverse: h_t = a_t * h_{t+1} + x_t).
//
// One task per (sequence, channel block) walks its sequence once in time; the block's state
// lives in a small local array of vectors (fp32 or complex64 whatever the storage type), so each
// step reads a_t and x_t once and writes h_t once: the traffic of one elementwise op.
//
// The backward is the same sweep in the other direction with dL/dx, dL/da and dL/dh0 fused:
//   g_t = dL/dh_t + conj(a_{t+1}) g_{t+1},  dL/da_t = g_t conj(h_{t-1}),  dL/dh0 = conj(a_1) g_1
// (indices mirrored for a reverse scan), with dL/da_1 = g_1 conj(h0), or exactly 0 without h0.
// A broadcast a (size-1 batch or time dimension) has its gradient summed in fp32 into one
// partial buffer per thread partition (not one per element of the full shape).

#include "common.h"

namespace linrec_cpu {
namespace {

// Software prefetch of the rows kPrefetchSteps steps ahead in time (the hardware prefetcher sees
// one short run per page per step of each stream).
constexpr int64_t kPrefetchSteps = 4;

template <typename T>
inline void prefetch_ahead(const T* p, int64_t offset_elems, size_t bytes) {
  const char* q = reinterpret_cast<const char*>(p) + offset_elems * static_cast<int64_t>(sizeof(T));
  for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(q + i, 0, 3);
}

// Channel tiles per block at most: 32 tiles of 2 vectors (4 KiB of fp32 state with AVX-512, 8 KiB
// of complex64, held in L1: a row of D = 512 channels, complex64 included, is one block, so that
// each stream of the sweep reads whole contiguous rows).
constexpr int64_t kMaxTiles = 32;

struct DiagShape {
  int64_t D;
  int64_t block;   // channels per block (a multiple of the tile width)
  int64_t nblk;    // blocks per sequence
};

template <typename S>
DiagShape diag_blocks(int64_t D, int64_t rows) {
  constexpr int64_t W = tile_width<S>();
  const int64_t tiles = (D + W - 1) / W;
  const int64_t per = units_per_block(tiles, rows, kMaxTiles, 2);
  const int64_t block = per * W;
  return {D, block, std::max<int64_t>((D + block - 1) / block, 1)};
}

// x, out: storage S; a: SA (S or the accumulation type); h0: (N, D) accumulation type or null.
template <typename S, typename SA>
void forward_kernel(const SA* a, int64_t a_sb, int64_t a_st, const S* x, int64_t x_sb, int64_t x_st,
                    const acc_t<S>* h0, S* out, int64_t T, const std::vector<Seq>& seqs, DiagShape shp,
                    bool reverse, bool stream) {
  using V = vec_t<S>;
  constexpr int64_t W = tile_width<S>();
  const int64_t D = shp.D;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * shp.nblk;
  parallel_tasks(ntasks, total_steps(seqs) * D, [&](int64_t begin, int64_t end) {
    V state[2 * kMaxTiles];
    for (int64_t task = begin; task < end; ++task) {
      const Seq& sq = seqs[task / shp.nblk];
      const int64_t d0 = (task % shp.nblk) * shp.block;
      const int64_t dn = std::min(shp.block, D - d0);
      if (dn <= 0 || sq.len == 0) continue;
      const int64_t full = dn / W, rem = dn - full * W, ntiles = full + (rem > 0);
      for (int64_t k = 0; k < ntiles; ++k) {
        if (h0 != nullptr) {
          load2(h0 + sq.state * D + d0 + k * W, std::min(W, dn - k * W), state[2 * k], state[2 * k + 1]);
        } else {
          state[2 * k] = V(acc_t<S>(0));
          state[2 * k + 1] = V(acc_t<S>(0));
        }
      }
      const int64_t step = reverse ? -1 : 1;
      int64_t t = reverse ? sq.start + sq.len - 1 : sq.start;
      for (int64_t i = 0; i < sq.len; ++i, t += step) {
        const SA* ap = a + sq.row * a_sb + t * a_st + d0;
        const S* xp = x + sq.row * x_sb + t * x_st + d0;
        S* op = out + (sq.row * T + t) * D + d0;
        for (int64_t k = 0; k < full; ++k) {
          prefetch_ahead(ap + k * W, kPrefetchSteps * step * a_st, sizeof(SA) * W);
          prefetch_ahead(xp + k * W, kPrefetchSteps * step * x_st, sizeof(S) * W);
          V alo, ahi, xlo, xhi;
          load2(ap + k * W, W, alo, ahi);
          load2(xp + k * W, W, xlo, xhi);
          state[2 * k] = mul_add(alo, state[2 * k], xlo);
          state[2 * k + 1] = mul_add(ahi, state[2 * k + 1], xhi);
          store_tile(op + k * W, W, state[2 * k], state[2 * k + 1], stream);
        }
        if (rem) {
          const int64_t k = full;
          V alo, ahi, xlo, xhi;
          load2(ap + k * W, rem, alo, ahi);
          load2(xp + k * W, rem, xlo, xhi);
          state[2 * k] = mul_add(alo, state[2 * k], xlo);
          state[2 * k + 1] = mul_add(ahi, state[2 * k + 1], xhi);
          store2(op + k * W, rem, state[2 * k], state[2 * k + 1]);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// h, grad_h, grad_x: storage S; a: SA; grad_a: SG, either SA written once per element
// (accumulate = false: a has the full (B, T, D) shape) or the accumulation type, added into
// (accumulate = true: zero-filled partial sums, one (Ba, Ta, D) slab per partition).
template <typename S, typename SA, typename SG>
void backward_kernel(const SA* a, int64_t a_sb, int64_t a_st, const S* h, int64_t h_sb, int64_t h_st,
                     const S* gh, int64_t gh_sb, int64_t gh_st, const acc_t<S>* h0, S* gx, SG* ga,
                     int64_t ga_sb, int64_t ga_st, int64_t ga_slab, int64_t partitions, bool accumulate,
                     acc_t<S>* gh0, int64_t T, const std::vector<Seq>& seqs, DiagShape shp, bool reverse,
                     bool stream) {
  using V = vec_t<S>;
  using A = acc_t<S>;
  constexpr int64_t W = tile_width<S>();
  constexpr bool can_accumulate = std::is_same_v<SG, A>;
  TORCH_CHECK(can_accumulate || !accumulate, "linrec cpu: partial sums of dL/da need the accumulation dtype");
  const int64_t D = shp.D;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * shp.nblk;

  auto run_task = [&](int64_t task, SG* ga_base, V* state) {
    const Seq& sq = seqs[task / shp.nblk];
    const int64_t d0 = (task % shp.nblk) * shp.block;
    const int64_t dn = std::min(shp.block, D - d0);
    if (dn <= 0 || sq.len == 0) return;
    const int64_t ntiles = (dn + W - 1) / W;
    // dir: the forward scan's direction. The backward sweep starts at the forward's last step.
    const int64_t dir = reverse ? -1 : 1;
    const int64_t t_first = reverse ? sq.start + sq.len - 1 : sq.start;
    const int64_t t_last = reverse ? sq.start : sq.start + sq.len - 1;
    int64_t t = t_last;
    for (int64_t i = 0; i < sq.len; ++i, t -= dir) {
      const S* ghp = gh + sq.row * gh_sb + t * gh_st + d0;
      const SA* anext = a + sq.row * a_sb + (t + dir) * a_st + d0;  // read only when i > 0
      const bool first_step = (i == sq.len - 1);                       // t == t_first
      const S* hprev = first_step ? nullptr : h + sq.row * h_sb + (t - dir) * h_st + d0;
      const A* h0p = (first_step && h0 != nullptr) ? h0 + sq.state * D + d0 : nullptr;
      S* gxp = gx + (sq.row * T + t) * D + d0;
      SG* gap = ga_base + sq.row * ga_sb + t * ga_st + d0;
      for (int64_t k = 0; k < ntiles; ++k) {
        const int64_t n = std::min(W, dn - k * W);
        prefetch_ahead(ghp + k * W, -kPrefetchSteps * dir * gh_st, sizeof(S) * W);
        prefetch_ahead(anext + k * W, -kPrefetchSteps * dir * a_st, sizeof(SA) * W);
        if (hprev != nullptr) prefetch_ahead(hprev + k * W, -kPrefetchSteps * dir * h_st, sizeof(S) * W);
        V glo, ghi;
        load2(ghp + k * W, n, glo, ghi);
        if (i > 0) {
          V alo, ahi;
          load2(anext + k * W, n, alo, ahi);
          glo = mul_add(conj_(alo), state[2 * k], glo);
          ghi = mul_add(conj_(ahi), state[2 * k + 1], ghi);
        }
        state[2 * k] = glo;
        state[2 * k + 1] = ghi;
        store_tile(gxp + k * W, n, glo, ghi, stream);
        V dlo, dhi;
        if (hprev != nullptr || h0p != nullptr) {
          V plo, phi;
          if (hprev != nullptr) {
            load2(hprev + k * W, n, plo, phi);
          } else {
            load2(h0p + k * W, n, plo, phi);
          }
          dlo = mul(glo, conj_(plo));
          dhi = mul(ghi, conj_(phi));
        } else {
          dlo = V(A(0));
          dhi = V(A(0));
        }
        if constexpr (can_accumulate) {
          if (accumulate) {
            V slo, shi;
            load2(gap + k * W, n, slo, shi);
            dlo = dlo + slo;
            dhi = dhi + shi;
          }
        }
        store_tile(gap + k * W, n, dlo, dhi, stream && !accumulate);
      }
    }
    if (h0 != nullptr) {  // dL/dh0 = conj(a at the forward's first step) * g there
      const SA* ap = a + sq.row * a_sb + t_first * a_st + d0;
      A* out = gh0 + sq.state * D + d0;
      for (int64_t k = 0; k < ntiles; ++k) {
        const int64_t n = std::min(W, dn - k * W);
        V alo, ahi;
        load2(ap + k * W, n, alo, ahi);
        store2(out + k * W, n, mul(conj_(alo), state[2 * k]), mul(conj_(ahi), state[2 * k + 1]));
      }
    }
  };

  if (!accumulate) {
    parallel_tasks(ntasks, total_steps(seqs) * D, [&](int64_t begin, int64_t end) {
      V state[2 * kMaxTiles];
      for (int64_t task = begin; task < end; ++task) run_task(task, ga, state);
      if (stream) stream_fence();
    });
  } else {  // partition p runs tasks p, p + P, ... and sums into its own slab
    parallel_tasks(partitions, total_steps(seqs) * D, [&](int64_t begin, int64_t end) {
      V state[2 * kMaxTiles];
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t task = p; task < ntasks; task += partitions) run_task(task, ga + p * ga_slab, state);
      }
      if (stream) stream_fence();
    });
  }
}

void check_common(const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must be contiguous along its last dimension");
}

template <typename S>
const acc_t<S>* state_ptr(const c10::optional<at::Tensor>& h0, int64_t N, int64_t D) {
  if (!h0.has_value()) return nullptr;
  const at::ScalarType acc = std::is_same_v<S, cfloat> ? at::kComplexFloat : at::kFloat;
  TORCH_CHECK(h0->scalar_type() == acc && h0->is_contiguous() && h0->dim() == 2 && h0->size(0) == N &&
                  h0->size(1) == D,
              "initial_state must be a contiguous (", N, ", ", D, ") tensor in ", acc, ", got ", h0->sizes(), " ",
              h0->scalar_type());
  return reinterpret_cast<const acc_t<S>*>(h0->data_ptr());
}

template <typename S, typename SA>
at::Tensor forward_typed(const at::Tensor& a, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                         const c10::optional<at::Tensor>& cu, bool reverse) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const auto seqs = make_seqs(B, T, cu);
  const auto* h0p = state_ptr<S>(h0, static_cast<int64_t>(seqs.size()), D);
  at::Tensor out = empty_output({B, T, D}, x.options());
  if (out.numel() == 0) return out;
  forward_kernel<S, SA>(reinterpret_cast<const SA*>(a.data_ptr()), bstride(a, 0), bstride(a, 1),
                        reinterpret_cast<const S*>(x.data_ptr()), bstride(x, 0), bstride(x, 1), h0p,
                        reinterpret_cast<S*>(out.data_ptr()), T, seqs, diag_blocks<S>(D, seqs.size()), reverse,
                        stream_output(out));
  return out;
}

template <typename S, typename SA>
std::vector<at::Tensor> backward_typed(const at::Tensor& a, const at::Tensor& h, const at::Tensor& gh,
                                       const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                       bool reverse, bool accumulate) {
  using A = acc_t<S>;
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  const auto seqs = make_seqs(B, T, cu);
  const int64_t N = static_cast<int64_t>(seqs.size());
  const auto* h0p = state_ptr<S>(h0, N, D);
  const at::ScalarType acc = std::is_same_v<S, cfloat> ? at::kComplexFloat : at::kFloat;
  const int64_t Ba = a.size(0), Ta = a.size(1);
  at::Tensor gx = empty_output({B, T, D}, h.options());
  at::Tensor gh0 = at::zeros({N, D}, h.options().dtype(acc));
  const DiagShape shp = diag_blocks<S>(D, N);
  const int64_t ntasks = N * shp.nblk;
  if (!accumulate) {
    TORCH_CHECK(Ba == B && Ta == T, "dL/da without partial sums needs a of the full shape");
    at::Tensor ga = empty_output({B, T, D}, a.options());
    if (ga.numel() > 0) {
      backward_kernel<S, SA, SA>(reinterpret_cast<const SA*>(a.data_ptr()), bstride(a, 0), bstride(a, 1),
                                 reinterpret_cast<const S*>(h.data_ptr()), bstride(h, 0), bstride(h, 1),
                                 reinterpret_cast<const S*>(gh.data_ptr()), bstride(gh, 0), bstride(gh, 1), h0p,
                                 reinterpret_cast<S*>(gx.data_ptr()), reinterpret_cast<SA*>(ga.data_ptr()), T * D, D,
                                 0, 1, false, reinterpret_cast<A*>(gh0.data_ptr()), T, seqs, shp, reverse,
                                 stream_output(gx));
    }
    return {ga, gx, gh0};
  }
  const int64_t partitions = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::Tensor partial = at::zeros({partitions, Ba, Ta, D}, h.options().dtype(acc));
  if (gx.numel() > 0) {
    backward_kernel<S, SA, A>(reinterpret_cast<const SA*>(a.data_ptr()), bstride(a, 0), bstride(a, 1),
                              reinterpret_cast<const S*>(h.data_ptr()), bstride(h, 0), bstride(h, 1),
                              reinterpret_cast<const S*>(gh.data_ptr()), bstride(gh, 0), bstride(gh, 1), h0p,
                              reinterpret_cast<S*>(gx.data_ptr()), reinterpret_cast<A*>(partial.data_ptr()),
                              Ba == 1 ? 0 : Ta * D, Ta == 1 ? 0 : D, Ba * Ta * D, partitions, true,
                              reinterpret_cast<A*>(gh0.data_ptr()), T, seqs, shp, reverse,
                              stream_output(gx));
  }
  at::Tensor ga = partitions == 1 ? partial[0] : partial.sum(0);
  return {ga, gx, gh0};
}

void check_pair(const at::Tensor& a, const at::Tensor& x) {
  check_common("x", x, 3);
  check_common("a", a, 3);
  TORCH_CHECK(a.size(2) == x.size(2), "a must be expanded along channels to D = ", x.size(2), ", got ", a.sizes());
  TORCH_CHECK((a.size(0) == 1 || a.size(0) == x.size(0)) && (a.size(1) == 1 || a.size(1) == x.size(1)),
              "a of shape ", a.sizes(), " does not broadcast to ", x.sizes());
}

}  // namespace

// a: (Ba, Ta, D) with Ba in {1, B}, Ta in {1, T}, a's dtype x's or the accumulation dtype;
// x: (B, T, D) float32 | bfloat16 | float16 | complex64 (any batch/time strides, unit channel
// stride); initial_state: (N, D) contiguous in the accumulation dtype; cu_seqlens: int64.
// Returns h: (B, T, D) contiguous in x's dtype.
at::Tensor diagonal_forward(const at::Tensor& a, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& cu, bool reverse) {
  check_pair(a, x);
  const auto xs = x.scalar_type(), as = a.scalar_type();
  if (xs == at::kFloat && as == at::kFloat) return forward_typed<float, float>(a, x, h0, cu, reverse);
  if (xs == at::kBFloat16 && as == at::kBFloat16) return forward_typed<c10::BFloat16, c10::BFloat16>(a, x, h0, cu, reverse);
  if (xs == at::kBFloat16 && as == at::kFloat) return forward_typed<c10::BFloat16, float>(a, x, h0, cu, reverse);
  if (xs == at::kHalf && as == at::kHalf) return forward_typed<c10::Half, c10::Half>(a, x, h0, cu, reverse);
  if (xs == at::kHalf && as == at::kFloat) return forward_typed<c10::Half, float>(a, x, h0, cu, reverse);
  if (xs == at::kComplexFloat && as == at::kComplexFloat) return forward_typed<cfloat, cfloat>(a, x, h0, cu, reverse);
  TORCH_CHECK(false, "linrec cpu diagonal scan: unsupported dtypes x ", xs, ", a ", as,
              " (x float32 | bfloat16 | float16 | complex64; a x's dtype or the accumulation dtype)");
}

// a: as forward; h, grad_h: (B, T, D) in one dtype (x's); accumulate: a is broadcast (Ba < B or
// Ta < T), dL/da is summed in fp32 partials. Returns (grad_a (Ba, Ta, D): a's dtype, or the
// accumulation dtype when accumulated; grad_x (B, T, D) in h's dtype; grad_h0 (N, D) in the
// accumulation dtype, zeros without an initial state).
std::vector<at::Tensor> diagonal_backward(const at::Tensor& a, const at::Tensor& h, const at::Tensor& gh,
                                          const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                          bool reverse, bool accumulate) {
  check_pair(a, h);
  check_common("grad_h", gh, 3);
  TORCH_CHECK(gh.sizes() == h.sizes() && gh.scalar_type() == h.scalar_type(), "grad_h must match h: ", h.sizes(),
              " ", h.scalar_type(), ", got ", gh.sizes(), " ", gh.scalar_type());
  const auto xs = h.scalar_type(), as = a.scalar_type();
  if (xs == at::kFloat && as == at::kFloat) return backward_typed<float, float>(a, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kBFloat16 && as == at::kBFloat16)
    return backward_typed<c10::BFloat16, c10::BFloat16>(a, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kBFloat16 && as == at::kFloat)
    return backward_typed<c10::BFloat16, float>(a, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kHalf && as == at::kHalf)
    return backward_typed<c10::Half, c10::Half>(a, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kHalf && as == at::kFloat) return backward_typed<c10::Half, float>(a, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kComplexFloat && as == at::kComplexFloat)
    return backward_typed<cfloat, cfloat>(a, h, gh, h0, cu, reverse, accumulate);
  TORCH_CHECK(false, "linrec cpu diagonal scan backward: unsupported dtypes h ", xs, ", a ", as);
}

}  // namespace linrec_cpu
