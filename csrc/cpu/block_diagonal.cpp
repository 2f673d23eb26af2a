// Block-diagonal scan on the CPU: h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g] for G blocks of size
// b <= 16 (reverse: h_{t+1} on the right).
//
// One task per (sequence, block of groups) walks its sequence once in time: per step and group a
// b x b matrix-vector product in fp32 with A_t[g] read once, the group's state in a local array.
// The block size is a template parameter for b = 1, 2, 4, 8, 16 (fully unrolled products) and a
// runtime value otherwise. With AVX-512, b = 4 in fp32 takes four groups at a time in 512-bit
// registers (one register is a 4 x 4 block, or the states of four groups): the products of a
// block with its group's state broadcast, then row sums by two pairwise shuffle-add levels and
// one permutation (see quad_matvec / quad_matvec_transposed below).
//
// Backward (forward-in-time scan; mirrored for reverse), with u_t = A_t^T g_t:
//   g_t = dL/dh_t + u_{t+1},  dL/dA_t = g_t h_{t-1}^T,  dL/dh0 = u at the first step,
// all in one sweep that reads A_t once (for u_t). dL/dA_t at the first step is g h0^T, or exactly
// 0 without an initial state. A broadcast A (size-1 batch, time or group dimension) has its
// gradient summed in fp32 into one partial buffer per thread partition.

#include "common.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
#include <immintrin.h>
#define LINREC_BLOCK4_AVX512 1
#else
#define LINREC_BLOCK4_AVX512 0
#endif

namespace linrec_cpu {
namespace {

#if LINREC_BLOCK4_AVX512
// Four groups of b = 4 at once. A register of states holds lane 4 i + c = h_i[c] (group i of the
// four); a register of one group's block holds lane 4 r + c = A[r][c] (row-major, as stored).

// The state of group i of the four in every 128-bit lane: lane 4 r + c = h_i[c].
template <int I> inline __m512 lanes_of_group(__m512 H) { return _mm512_shuffle_f32x4(H, H, I * 0x55); }

// Lane 4 r + c = g_i[r]: group i's entries each repeated along a row.
template <int I> inline __m512 rows_of_group(__m512 G) {
  const __m512i idx = _mm512_setr_epi32(4 * I, 4 * I, 4 * I, 4 * I, 4 * I + 1, 4 * I + 1, 4 * I + 1, 4 * I + 1,
                                        4 * I + 2, 4 * I + 2, 4 * I + 2, 4 * I + 2, 4 * I + 3, 4 * I + 3, 4 * I + 3,
                                        4 * I + 3);
  return _mm512_permutexvar_ps(idx, G);
}

// (A_i h_i) for the four groups, lane 4 i + r. P_i = A_i * h_i broadcast (lane 4 r + c =
// A_i[r][c] h_i[c]); two levels of per-128-bit-lane pairwise sums (shuffle 0x88 takes elements
// 0, 2 of each operand, 0xDD elements 1, 3) leave lane 4 r + i = sum_c P_i[r][c]; a permutation
// transposes that to lane 4 i + r.
inline __m512 quad_matvec(const float* A, int64_t sg, __m512 H) {
  const __m512 P0 = _mm512_mul_ps(_mm512_loadu_ps(A), lanes_of_group<0>(H));
  const __m512 P1 = _mm512_mul_ps(_mm512_loadu_ps(A + sg), lanes_of_group<1>(H));
  const __m512 P2 = _mm512_mul_ps(_mm512_loadu_ps(A + 2 * sg), lanes_of_group<2>(H));
  const __m512 P3 = _mm512_mul_ps(_mm512_loadu_ps(A + 3 * sg), lanes_of_group<3>(H));
  const __m512 Q01 = _mm512_add_ps(_mm512_shuffle_ps(P0, P1, 0x88), _mm512_shuffle_ps(P0, P1, 0xDD));
  const __m512 Q23 = _mm512_add_ps(_mm512_shuffle_ps(P2, P3, 0x88), _mm512_shuffle_ps(P2, P3, 0xDD));
  const __m512 R = _mm512_add_ps(_mm512_shuffle_ps(Q01, Q23, 0x88), _mm512_shuffle_ps(Q01, Q23, 0xDD));
  const __m512i transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(transpose, R);
}

// (A_i^T g_i) for the four groups, lane 4 i + c, given P_i = A_i * rows_of_group<i>(G) (lane
// 4 r + c = A_i[r][c] g_i[r]): the column sums are sums of the four 128-bit blocks of each P_i,
// taken pairwise by 128-bit block shuffles (0x88: blocks 0, 2 of each operand; 0xDD: 1, 3).
inline __m512 quad_column_sums(__m512 P0, __m512 P1, __m512 P2, __m512 P3) {
  const __m512 S01 = _mm512_add_ps(_mm512_shuffle_f32x4(P0, P1, 0x88), _mm512_shuffle_f32x4(P0, P1, 0xDD));
  const __m512 S23 = _mm512_add_ps(_mm512_shuffle_f32x4(P2, P3, 0x88), _mm512_shuffle_f32x4(P2, P3, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(S01, S23, 0x88), _mm512_shuffle_f32x4(S01, S23, 0xDD));
}
#endif

#if LINREC_BLOCK4_AVX512
// Store of one output register: non-temporal (no read of the line before it is overwritten, no
// cache pollution: every output element is written once) where the address is 64-byte aligned.
inline void store_out(float* p, __m512 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}
#endif

// Whether the four-groups-at-a-time AVX-512 path runs for this instantiation.
template <int BS, typename S, typename SA>
constexpr bool use_quads() {
  return LINREC_BLOCK4_AVX512 && BS == 4 && std::is_same_v<S, float> && std::is_same_v<SA, float>;
}

constexpr int64_t kMaxBlock = 16;
// Floats of state per task at most (4 KiB): groups per task = kStateFloats / b at most.
constexpr int64_t kStateFloats = 1024;

struct BlockShape {
  int64_t G;
  int64_t gblock;  // groups per task
  int64_t nblk;    // tasks per sequence
};

BlockShape group_blocks(int64_t G, int64_t b, int64_t rows) {
  const int64_t per = units_per_block(G, rows, std::max<int64_t>(kStateFloats / b, 1), 4);
  return {G, per, std::max<int64_t>((G + per - 1) / per, 1)};
}

template <typename S> inline float f32(S v) { return static_cast<float>(v); }

template <int BS, typename S, typename SA>
void forward_kernel(const SA* A, int64_t A_sb, int64_t A_st, int64_t A_sg, const S* x, int64_t x_sb, int64_t x_st,
                    const float* h0, S* out, int64_t T, int64_t b_rt, const std::vector<Seq>& seqs, BlockShape shp,
                    bool reverse) {
  const int64_t b = BS > 0 ? BS : b_rt;
  const int64_t G = shp.G;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * shp.nblk;
  parallel_tasks(ntasks, total_steps(seqs) * G * b * b, [&](int64_t begin, int64_t end) {
    float state[kStateFloats + kMaxBlock];
    for (int64_t task = begin; task < end; ++task) {
      const Seq& sq = seqs[task / shp.nblk];
      const int64_t g0 = (task % shp.nblk) * shp.gblock;
      const int64_t gn = std::min(shp.gblock, G - g0);
      if (gn <= 0 || sq.len == 0) continue;
      for (int64_t k = 0; k < gn * b; ++k) state[k] = h0 != nullptr ? h0[(sq.state * G + g0) * b + k] : 0.f;
      const int64_t step = reverse ? -1 : 1;
      int64_t t = reverse ? sq.start + sq.len - 1 : sq.start;
      for (int64_t i = 0; i < sq.len; ++i, t += step) {
        const SA* Ap = A + sq.row * A_sb + t * A_st + g0 * A_sg;
        const S* xp = x + sq.row * x_sb + t * x_st + g0 * b;
        S* op = out + ((sq.row * T + t) * G + g0) * b;
        int64_t g = 0;
#if LINREC_BLOCK4_AVX512
        if constexpr (use_quads<BS, S, SA>()) {
          for (; g + 4 <= gn; g += 4) {
            const __m512 hn = _mm512_add_ps(quad_matvec(Ap + g * A_sg, A_sg, _mm512_loadu_ps(state + g * 4)),
                                            _mm512_loadu_ps(xp + g * 4));
            _mm512_storeu_ps(state + g * 4, hn);
            store_out(op + g * 4, hn);
          }
        }
#endif
        for (; g < gn; ++g) {
          const SA* Ag = Ap + g * A_sg;
          float* hs = state + g * b;
          float hv[kMaxBlock], hn[kMaxBlock];
          for (int64_t c = 0; c < b; ++c) hv[c] = hs[c];
          for (int64_t r = 0; r < b; ++r) {
            float s = 0.f;
            for (int64_t c = 0; c < b; ++c) s += f32(Ag[r * b + c]) * hv[c];
            hn[r] = s + f32(xp[g * b + r]);
          }
          for (int64_t r = 0; r < b; ++r) hs[r] = hn[r];
          for (int64_t r = 0; r < b; ++r) op[g * b + r] = static_cast<S>(hn[r]);
        }
      }
    }
#if LINREC_BLOCK4_AVX512
    if constexpr (use_quads<BS, S, SA>()) _mm_sfence();  // order the streaming stores
#endif
  });
}

// grad_A: fp32, stored once per element (accumulate = false: A of the full shape, ga_* its
// contiguous strides) or added into zero-filled partial slabs (one per partition).
template <int BS, typename S, typename SA>
void backward_kernel(const SA* A, int64_t A_sb, int64_t A_st, int64_t A_sg, const S* h, int64_t h_sb, int64_t h_st,
                     const S* gh, int64_t gh_sb, int64_t gh_st, const float* h0, S* gx, float* ga, int64_t ga_sb,
                     int64_t ga_st, int64_t ga_sg, int64_t ga_slab, int64_t partitions, bool accumulate, float* gh0,
                     int64_t T, int64_t b_rt, const std::vector<Seq>& seqs, BlockShape shp, bool reverse) {
  const int64_t b = BS > 0 ? BS : b_rt;
  const int64_t G = shp.G;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * shp.nblk;

  auto run_task = [&](int64_t task, float* ga_base, float* u) {
    const Seq& sq = seqs[task / shp.nblk];
    const int64_t g0 = (task % shp.nblk) * shp.gblock;
    const int64_t gn = std::min(shp.gblock, G - g0);
    if (gn <= 0 || sq.len == 0) return;
    for (int64_t k = 0; k < gn * b; ++k) u[k] = 0.f;
    const int64_t dir = reverse ? -1 : 1;
    int64_t t = reverse ? sq.start : sq.start + sq.len - 1;  // the forward's last step
    for (int64_t i = 0; i < sq.len; ++i, t -= dir) {
      const bool first_step = (i == sq.len - 1);
      const SA* Ap = A + sq.row * A_sb + t * A_st + g0 * A_sg;
      const S* ghp = gh + sq.row * gh_sb + t * gh_st + g0 * b;
      const S* hp = first_step ? nullptr : h + sq.row * h_sb + (t - dir) * h_st + g0 * b;
      const float* h0p = (first_step && h0 != nullptr) ? h0 + (sq.state * G + g0) * b : nullptr;
      S* gxp = gx + ((sq.row * T + t) * G + g0) * b;
      float* gap = ga_base + sq.row * ga_sb + t * ga_st + g0 * ga_sg;
      int64_t g = 0;
#if LINREC_BLOCK4_AVX512
      if constexpr (use_quads<BS, S, SA>()) {
        const bool have_prev = hp != nullptr || h0p != nullptr;
        for (; g + 4 <= gn; g += 4) {
          // g_t = dL/dh_t + u_{t+1} for four groups; dL/dx_t = g_t.
          const __m512 Gv = _mm512_add_ps(_mm512_loadu_ps(ghp + g * 4), _mm512_loadu_ps(u + g * 4));
          store_out(gxp + g * 4, Gv);
          const __m512 Hp = hp != nullptr ? _mm512_loadu_ps(hp + g * 4)
                                          : (h0p != nullptr ? _mm512_loadu_ps(h0p + g * 4) : _mm512_setzero_ps());
          const __m512 R0 = rows_of_group<0>(Gv), R1 = rows_of_group<1>(Gv);
          const __m512 R2 = rows_of_group<2>(Gv), R3 = rows_of_group<3>(Gv);
          // dL/dA_t = g_t h_{t-1}^T: lane 4 r + c = g[r] h[c], one register per group.
          const __m512 O0 = _mm512_mul_ps(R0, lanes_of_group<0>(Hp)), O1 = _mm512_mul_ps(R1, lanes_of_group<1>(Hp));
          const __m512 O2 = _mm512_mul_ps(R2, lanes_of_group<2>(Hp)), O3 = _mm512_mul_ps(R3, lanes_of_group<3>(Hp));
          float* gaa = gap + g * ga_sg;
          if (accumulate) {
            if (have_prev) {  // groups in order: with a group-broadcast A (ga_sg = 0) they add up
              _mm512_storeu_ps(gaa, _mm512_add_ps(_mm512_loadu_ps(gaa), O0));
              _mm512_storeu_ps(gaa + ga_sg, _mm512_add_ps(_mm512_loadu_ps(gaa + ga_sg), O1));
              _mm512_storeu_ps(gaa + 2 * ga_sg, _mm512_add_ps(_mm512_loadu_ps(gaa + 2 * ga_sg), O2));
              _mm512_storeu_ps(gaa + 3 * ga_sg, _mm512_add_ps(_mm512_loadu_ps(gaa + 3 * ga_sg), O3));
            }
          } else {  // Hp = 0 without a previous state: exact zeros
            store_out(gaa, O0);
            store_out(gaa + ga_sg, O1);
            store_out(gaa + 2 * ga_sg, O2);
            store_out(gaa + 3 * ga_sg, O3);
          }
          // u_t = A_t^T g_t.
          const SA* Ag = Ap + g * A_sg;
          const __m512 U = quad_column_sums(_mm512_mul_ps(_mm512_loadu_ps(Ag), R0),
                                            _mm512_mul_ps(_mm512_loadu_ps(Ag + A_sg), R1),
                                            _mm512_mul_ps(_mm512_loadu_ps(Ag + 2 * A_sg), R2),
                                            _mm512_mul_ps(_mm512_loadu_ps(Ag + 3 * A_sg), R3));
          _mm512_storeu_ps(u + g * 4, U);
        }
      }
#endif
      for (; g < gn; ++g) {
        // Local copies (no aliasing between the state, the outputs and the inputs), so that
        // the fixed-size loops below stay in registers and vectorise.
        float* ug = u + g * b;
        float gv[kMaxBlock], hv[kMaxBlock], nu[kMaxBlock];
        for (int64_t r = 0; r < b; ++r) gv[r] = f32(ghp[g * b + r]) + ug[r];
        for (int64_t r = 0; r < b; ++r) gxp[g * b + r] = static_cast<S>(gv[r]);
        float* gaa = gap + g * ga_sg;
        const bool have_prev = hp != nullptr || h0p != nullptr;
        if (have_prev) {
          if (hp != nullptr) {
            for (int64_t c = 0; c < b; ++c) hv[c] = f32(hp[g * b + c]);
          } else {
            for (int64_t c = 0; c < b; ++c) hv[c] = h0p[g * b + c];
          }
        } else {
          for (int64_t c = 0; c < b; ++c) hv[c] = 0.f;
        }
        if (accumulate) {
          if (have_prev) {
            for (int64_t r = 0; r < b; ++r)
              for (int64_t c = 0; c < b; ++c) gaa[r * b + c] += gv[r] * hv[c];
          }
        } else {  // exactly 0 at the first step without an initial state (hv = 0 and no product)
          for (int64_t r = 0; r < b; ++r)
            for (int64_t c = 0; c < b; ++c) gaa[r * b + c] = have_prev ? gv[r] * hv[c] : 0.f;
        }
        // u_t = A_t^T g_t: rows of A_t scaled by g and summed.
        const SA* Ag = Ap + g * A_sg;
        for (int64_t c = 0; c < b; ++c) nu[c] = 0.f;
        for (int64_t r = 0; r < b; ++r) {
          const float gr = gv[r];
          for (int64_t c = 0; c < b; ++c) nu[c] += f32(Ag[r * b + c]) * gr;
        }
        for (int64_t c = 0; c < b; ++c) ug[c] = nu[c];
      }
    }
    float* out = gh0 + (sq.state * G + g0) * b;
    for (int64_t k = 0; k < gn * b; ++k) out[k] = u[k];
  };

  if (!accumulate) {
    parallel_tasks(ntasks, total_steps(seqs) * G * b * b, [&](int64_t begin, int64_t end) {
      float u[kStateFloats + kMaxBlock];
      for (int64_t task = begin; task < end; ++task) run_task(task, ga, u);
#if LINREC_BLOCK4_AVX512
      if constexpr (use_quads<BS, S, SA>()) _mm_sfence();  // order the streaming stores
#endif
    });
  } else {
    parallel_tasks(partitions, total_steps(seqs) * G * b * b, [&](int64_t begin, int64_t end) {
      float u[kStateFloats + kMaxBlock];
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t task = p; task < ntasks; task += partitions) run_task(task, ga + p * ga_slab, u);
      }
#if LINREC_BLOCK4_AVX512
      if constexpr (use_quads<BS, S, SA>()) _mm_sfence();  // order the streaming stores
#endif
    });
  }
}

void check_inputs(const at::Tensor& A, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && A.device().is_cpu(), "A and x must be CPU tensors");
  TORCH_CHECK(x.dim() == 4, "x must be (B, T, G, b), got ", x.sizes());
  TORCH_CHECK(A.dim() == 5, "A must be 5-D (Ba, Ta, Ga, b, b), got ", A.sizes());
  const int64_t b = x.size(3);
  TORCH_CHECK(b >= 1 && b <= kMaxBlock, "the cpu block-diagonal scan takes b <= ", kMaxBlock, ", got b = ", b);
  TORCH_CHECK(A.size(3) == b && A.size(4) == b, "A's blocks must be (b, b) = (", b, ", ", b, "), got ", A.sizes());
  for (int64_t d = 0; d < 3; ++d)
    TORCH_CHECK(A.size(d) == 1 || A.size(d) == x.size(d), "A of shape ", A.sizes(), " does not broadcast to x ",
                x.sizes());
  TORCH_CHECK((b == 1 || A.stride(4) == 1) && (A.stride(3) == b || b == 1), "A's (b, b) blocks must be contiguous");
}

void check_rows(const char* name, const at::Tensor& t) {
  const int64_t b = t.size(3);
  TORCH_CHECK((b == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == b),
              name, "'s (G, b) rows must be contiguous");
}

const float* state_ptr(const c10::optional<at::Tensor>& h0, int64_t N, int64_t G, int64_t b) {
  if (!h0.has_value()) return nullptr;
  TORCH_CHECK(h0->scalar_type() == at::kFloat && h0->is_contiguous() && h0->dim() == 3 && h0->size(0) == N &&
                  h0->size(1) == G && h0->size(2) == b,
              "initial_state must be a contiguous (", N, ", ", G, ", ", b, ") float32 tensor, got ", h0->sizes(),
              " ", h0->scalar_type());
  return h0->data_ptr<float>();
}

template <typename S, typename SA>
at::Tensor forward_typed(const at::Tensor& A, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                         const c10::optional<at::Tensor>& cu, bool reverse) {
  const int64_t B = x.size(0), T = x.size(1), G = x.size(2), b = x.size(3);
  const auto seqs = make_seqs(B, T, cu);
  const float* h0p = state_ptr(h0, static_cast<int64_t>(seqs.size()), G, b);
  at::Tensor out = empty_output({B, T, G, b}, x.options());
  if (out.numel() == 0) return out;
  const BlockShape shp = group_blocks(G, b, static_cast<int64_t>(seqs.size()));
  auto run = [&](auto bs) {
    constexpr int BS = decltype(bs)::value;
    forward_kernel<BS, S, SA>(reinterpret_cast<const SA*>(A.data_ptr()), bstride(A, 0), bstride(A, 1),
                              bstride(A, 2), reinterpret_cast<const S*>(x.data_ptr()), bstride(x, 0), bstride(x, 1),
                              h0p, reinterpret_cast<S*>(out.data_ptr()), T, b, seqs, shp, reverse);
  };
  switch (b) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    case 16: run(std::integral_constant<int, 16>{}); break;
    default: run(std::integral_constant<int, 0>{}); break;
  }
  return out;
}

template <typename S, typename SA>
std::vector<at::Tensor> backward_typed(const at::Tensor& A, const at::Tensor& h, const at::Tensor& gh,
                                       const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                       bool reverse, bool accumulate) {
  const int64_t B = h.size(0), T = h.size(1), G = h.size(2), b = h.size(3);
  const auto seqs = make_seqs(B, T, cu);
  const int64_t N = static_cast<int64_t>(seqs.size());
  const float* h0p = state_ptr(h0, N, G, b);
  const int64_t Ba = A.size(0), Ta = A.size(1), Ga = A.size(2);
  at::Tensor gx = empty_output({B, T, G, b}, h.options());
  at::Tensor gh0 = at::zeros({N, G, b}, h.options().dtype(at::kFloat));
  const BlockShape shp = group_blocks(G, b, N);
  const int64_t ntasks = N * shp.nblk;
  const int64_t partitions = accumulate ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks)) : 1;
  at::Tensor ga;
  int64_t ga_sb, ga_st, ga_sg;
  if (accumulate) {
    ga = at::zeros({partitions, Ba, Ta, Ga, b, b}, h.options().dtype(at::kFloat));
    ga_sb = Ba == 1 ? 0 : Ta * Ga * b * b;
    ga_st = Ta == 1 ? 0 : Ga * b * b;
    ga_sg = Ga == 1 ? 0 : b * b;
  } else {
    TORCH_CHECK(Ba == B && Ta == T && Ga == G, "dL/dA without partial sums needs A of the full shape");
    ga = empty_output({B, T, G, b, b}, h.options().dtype(at::kFloat));
    ga_sb = T * G * b * b;
    ga_st = G * b * b;
    ga_sg = b * b;
  }
  if (gx.numel() > 0) {
    auto run = [&](auto bs) {
      constexpr int BS = decltype(bs)::value;
      backward_kernel<BS, S, SA>(reinterpret_cast<const SA*>(A.data_ptr()), bstride(A, 0), bstride(A, 1),
                                 bstride(A, 2), reinterpret_cast<const S*>(h.data_ptr()), bstride(h, 0),
                                 bstride(h, 1), reinterpret_cast<const S*>(gh.data_ptr()), bstride(gh, 0),
                                 bstride(gh, 1), h0p, reinterpret_cast<S*>(gx.data_ptr()), ga.data_ptr<float>(), ga_sb,
                                 ga_st, ga_sg, Ba * Ta * Ga * b * b, partitions, accumulate, gh0.data_ptr<float>(), T,
                                 b, seqs, shp, reverse);
    };
    switch (b) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 16: run(std::integral_constant<int, 16>{}); break;
      default: run(std::integral_constant<int, 0>{}); break;
    }
  }
  if (accumulate) ga = partitions == 1 ? ga[0] : ga.sum(0);
  return {ga, gx, gh0};
}

}  // namespace

// A: (Ba, Ta, Ga, b, b), each in {1, full}, contiguous (b, b) blocks, x's dtype or float32;
// x: (B, T, G, b) float32 | bfloat16 | float16 with contiguous (G, b) rows; initial_state:
// (N, G, b) contiguous float32. Returns h: (B, T, G, b) contiguous in x's dtype.
at::Tensor block_diagonal_forward(const at::Tensor& A, const at::Tensor& x, const c10::optional<at::Tensor>& h0,
                                  const c10::optional<at::Tensor>& cu, bool reverse) {
  check_inputs(A, x);
  check_rows("x", x);
  const auto xs = x.scalar_type(), as = A.scalar_type();
  if (xs == at::kFloat && as == at::kFloat) return forward_typed<float, float>(A, x, h0, cu, reverse);
  if (xs == at::kBFloat16 && as == at::kBFloat16) return forward_typed<c10::BFloat16, c10::BFloat16>(A, x, h0, cu, reverse);
  if (xs == at::kBFloat16 && as == at::kFloat) return forward_typed<c10::BFloat16, float>(A, x, h0, cu, reverse);
  if (xs == at::kHalf && as == at::kHalf) return forward_typed<c10::Half, c10::Half>(A, x, h0, cu, reverse);
  if (xs == at::kHalf && as == at::kFloat) return forward_typed<c10::Half, float>(A, x, h0, cu, reverse);
  TORCH_CHECK(false, "linrec cpu block-diagonal scan: unsupported dtypes x ", xs, ", A ", as,
              " (x float32 | bfloat16 | float16; A x's dtype or float32)");
}

// Returns (grad_A (Ba, Ta, Ga, b, b) float32, grad_x (B, T, G, b) in h's dtype, grad_h0 (N, G, b)
// float32: u at each sequence's first step, also without an initial state).
std::vector<at::Tensor> block_diagonal_backward(const at::Tensor& A, const at::Tensor& h, const at::Tensor& gh,
                                                const c10::optional<at::Tensor>& h0,
                                                const c10::optional<at::Tensor>& cu, bool reverse, bool accumulate) {
  check_inputs(A, h);
  check_rows("h", h);
  check_rows("grad_h", gh);
  TORCH_CHECK(gh.sizes() == h.sizes() && gh.scalar_type() == h.scalar_type(), "grad_h must match h: ", h.sizes(),
              " ", h.scalar_type(), ", got ", gh.sizes(), " ", gh.scalar_type());
  const auto xs = h.scalar_type(), as = A.scalar_type();
  if (xs == at::kFloat && as == at::kFloat) return backward_typed<float, float>(A, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kBFloat16 && as == at::kBFloat16)
    return backward_typed<c10::BFloat16, c10::BFloat16>(A, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kBFloat16 && as == at::kFloat)
    return backward_typed<c10::BFloat16, float>(A, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kHalf && as == at::kHalf)
    return backward_typed<c10::Half, c10::Half>(A, h, gh, h0, cu, reverse, accumulate);
  if (xs == at::kHalf && as == at::kFloat)
    return backward_typed<c10::Half, float>(A, h, gh, h0, cu, reverse, accumulate);
  TORCH_CHECK(false, "linrec cpu block-diagonal scan backward: unsupported dtypes h ", xs, ", A ", as);
}

}  // namespace linrec_cpu
