// Householder-product scan on the CPU, step by step (the decoding path, and a sequential scan
// for small heads). Per head the state S is a (K, V) fp32 matrix, row-major (K rows of V);
// per token t with n factors:
//
//   S <- exp(g_t) S                                      (when a log-gate is given)
//   for j = 0..n-1:  w = S^T k_j,  d_j = v_j - w,  S <- S + beta_j k_j d_j^T
//   o_t = scale S^T q_t
//
// One task per (sequence, head) walks its sequence once; every product is a loop over the K
// rows of S vectorised along V (an axpy to read S^T r, an axpy to update a row, a dot product
// to read S c), so S is streamed from L1/L2 and never leaves the task.
//
// Backward, per sub-step (S the state before it, dS' the gradient of the state after it,
// p = dS'^T k):
//   dv = beta p,  dbeta = d . p,  dk = beta (dS' d - S p),  dS = dS' - beta k p^T;
// per token: dq = scale S_t do_t, dS_t += scale q do_t^T; gate: dg = <dS_g, S_g> (S_g the gated
// state), dS_prev = exp(g) dS_g; dL/dh0 is dS at the start. The states before every sub-step
// are recomputed, not inverted (a gate of 0 is a reset that cannot be undone): the forward pass
// keeps S at the start of every segment of L tokens (a checkpoint), then each segment, last
// first, is replayed from its checkpoint with the states before every sub-step kept in a
// scratch buffer of (n + 1) L (K, V) matrices.
//
// Inputs q, k, v in float32 | bfloat16 | float16 (converted to fp32 one token at a time);
// beta, log_gate, initial_state, grad_o, grad_final in fp32 (the launcher converts them).

#include "common.h"

#include <cmath>
#include <cstring>

namespace linrec_cpu {
namespace {

constexpr int64_t kW = fVec::size();

// y[0:n] += alpha x[0:n]
inline void axpy(int64_t n, float alpha, const float* __restrict__ x, float* __restrict__ y) {
  const fVec va(alpha);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) at::vec::fmadd(va, fVec::loadu(x + i), fVec::loadu(y + i)).store(y + i);
  if (i < n) {
    const int64_t r = n - i;
    at::vec::fmadd(va, fVec::loadu(x + i, r), fVec::loadu(y + i, r)).store(y + i, r);
  }
}

inline float hsum(const fVec& v) {
  float buf[kW];
  v.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += buf[i];
  return s;
}

// x[0:n] . y[0:n]
inline float dot(int64_t n, const float* __restrict__ x, const float* __restrict__ y) {
  fVec acc(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc = at::vec::fmadd(fVec::loadu(x + i), fVec::loadu(y + i), acc);
  if (i < n) {
    const int64_t r = n - i;
    acc = at::vec::fmadd(fVec::loadu(x + i, r), fVec::loadu(y + i, r), acc);
  }
  return hsum(acc);
}

inline void scale_inplace(int64_t n, float alpha, float* y) {
  const fVec va(alpha);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (va * fVec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

// out[0:V] = S^T r for S (K, V) and r (K,)
inline void read_state(const float* S, int64_t K, int64_t V, const float* r, float* out) {
  std::fill(out, out + V, 0.f);
  for (int64_t i = 0; i < K; ++i) axpy(V, r[i], S + i * V, out);
}

// One pass over the rows of S: S[i] += c[i] d, then out = S^T r with the updated rows.
inline void update_and_read(float* S, int64_t K, int64_t V, const float* c, const float* d, const float* r,
                            float* out) {
  std::fill(out, out + V, 0.f);
  for (int64_t i = 0; i < K; ++i) {
    float* row = S + i * V;
    axpy(V, c[i], d, row);
    axpy(V, r[i], row, out);
  }
}

template <typename S> inline void to_f32(const S* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Shapes and pointers of one call (all tensors contiguous).
template <typename S>
struct Problem {
  int64_t T, H, K, V, n;
  float scale;
  const S* q;        // (B, T, H, K)
  const S* k;        // (B, T, n, H, K)
  const S* v;        // (B, T, n, H, V)
  const float* beta; // (B, T, n, H)
  const float* g;    // (B, T, H) or null
  const float* h0;   // (N, H, K, V) or null

  int64_t tok(const Seq& sq, int64_t t) const { return sq.row * T + t; }
  const S* q_at(const Seq& sq, int64_t t, int64_t h) const { return q + (tok(sq, t) * H + h) * K; }
  const S* k_at(const Seq& sq, int64_t t, int64_t j, int64_t h) const {
    return k + ((tok(sq, t) * n + j) * H + h) * K;
  }
  const S* v_at(const Seq& sq, int64_t t, int64_t j, int64_t h) const {
    return v + ((tok(sq, t) * n + j) * H + h) * V;
  }
  float beta_at(const Seq& sq, int64_t t, int64_t j, int64_t h) const { return beta[(tok(sq, t) * n + j) * H + h]; }
  float gate_at(const Seq& sq, int64_t t, int64_t h) const { return std::exp(g[tok(sq, t) * H + h]); }
};

// Per-task fp32 vectors of one token: kf (n, K), vf (n, V), qf (K), c (K), w / d (V).
struct TokenBuffers {
  std::vector<float> kf, vf, qf, c, w, d;
  TokenBuffers(int64_t n, int64_t K, int64_t V) : kf(n * K), vf(n * V), qf(K), c(K), w(V), d(V) {}
};

// Advances S (K, V) through token t of sequence sq, head h; writes scale S^T q into o_out (V
// floats) when it is not null; keeps the state before every sub-step (after the gate) in
// states[j * KV] and the state after the token in states[n * KV], and d_j in ds[j * V], when
// those are not null.
template <typename S>
void token_forward(const Problem<S>& P, const Seq& sq, int64_t t, int64_t h, float* St, TokenBuffers& buf,
                   float* o_out, float* states, float* ds) {
  const int64_t K = P.K, V = P.V, n = P.n, KV = K * V;
  for (int64_t j = 0; j < n; ++j) {
    to_f32(P.k_at(sq, t, j, h), K, buf.kf.data() + j * K);
    to_f32(P.v_at(sq, t, j, h), V, buf.vf.data() + j * V);
  }
  to_f32(P.q_at(sq, t, h), K, buf.qf.data());
  if (P.g != nullptr) scale_inplace(KV, P.gate_at(sq, t, h), St);
  read_state(St, K, V, buf.kf.data(), buf.w.data());  // w = S^T k_0
  for (int64_t j = 0; j < n; ++j) {
    if (states != nullptr) std::memcpy(states + j * KV, St, sizeof(float) * KV);
    const float bj = P.beta_at(sq, t, j, h);
    const float* kj = buf.kf.data() + j * K;
    const float* vj = buf.vf.data() + j * V;
    float* d = ds != nullptr ? ds + j * V : buf.d.data();
    for (int64_t l = 0; l < V; ++l) d[l] = vj[l] - buf.w[l];
    for (int64_t i = 0; i < K; ++i) buf.c[i] = bj * kj[i];
    // The update pass also reads what comes next: S^T k_{j+1}, or S^T q after the last factor.
    const bool last = j + 1 == n;
    update_and_read(St, K, V, buf.c.data(), d, last ? buf.qf.data() : kj + K, buf.w.data());
  }
  if (states != nullptr) std::memcpy(states + n * KV, St, sizeof(float) * KV);
  if (o_out != nullptr) {
    for (int64_t l = 0; l < V; ++l) o_out[l] = P.scale * buf.w[l];
  }
}

template <typename S>
void forward_typed(const Problem<S>& P, const std::vector<Seq>& seqs, S* o, float* final_state) {
  const int64_t H = P.H, K = P.K, V = P.V, KV = K * V;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * H;
  parallel_tasks(ntasks, total_steps(seqs) * H * P.n * KV, [&](int64_t begin, int64_t end) {
    TokenBuffers buf(P.n, K, V);
    std::vector<float> ovec(V);
    for (int64_t task = begin; task < end; ++task) {
      const Seq& sq = seqs[task / H];
      const int64_t h = task % H;
      float* St = final_state + (sq.state * H + h) * KV;  // the state lives in the output
      if (P.h0 != nullptr) {
        std::memcpy(St, P.h0 + (sq.state * H + h) * KV, sizeof(float) * KV);
      } else {
        std::fill(St, St + KV, 0.f);
      }
      for (int64_t i = 0; i < sq.len; ++i) {
        const int64_t t = sq.start + i;
        token_forward(P, sq, t, h, St, buf, ovec.data(), nullptr, nullptr);
        S* op = o + (P.tok(sq, t) * H + h) * V;
        for (int64_t l = 0; l < V; ++l) op[l] = static_cast<S>(ovec[l]);
      }
    }
  });
}

// Tokens per replayed segment of the backward: all of a decoding call, about sqrt(T) otherwise.
int64_t segment_tokens(int64_t max_len) {
  int64_t L = 8;
  while (L * L < max_len) L *= 2;
  return std::min<int64_t>(L, std::max<int64_t>(max_len, 1));
}

template <typename S>
void backward_typed(const Problem<S>& P, const std::vector<Seq>& seqs, const float* grad_o, const float* grad_final,
                    S* dq, S* dk, S* dv, float* dbeta, float* dg, float* dh0) {
  const int64_t H = P.H, K = P.K, V = P.V, n = P.n, KV = K * V;
  int64_t max_len = 0;
  for (const Seq& sq : seqs) max_len = std::max(max_len, sq.len);
  const int64_t L = segment_tokens(max_len);
  const int64_t max_segments = (max_len + L - 1) / L;
  const int64_t ntasks = static_cast<int64_t>(seqs.size()) * H;
  parallel_tasks(ntasks, total_steps(seqs) * H * P.n * KV, [&](int64_t begin, int64_t end) {
    TokenBuffers buf(n, K, V);
    std::vector<float> checkpoints(std::max<int64_t>(max_segments, 1) * KV);
    std::vector<float> states(std::min(L, std::max<int64_t>(max_len, 1)) * (n + 1) * KV);
    std::vector<float> ds(std::min(L, std::max<int64_t>(max_len, 1)) * n * V);
    std::vector<float> St(KV), dS(KV), dof(V), p(V), kq(K);
    for (int64_t task = begin; task < end; ++task) {
      const Seq& sq = seqs[task / H];
      const int64_t h = task % H;
      const int64_t state_off = (sq.state * H + h) * KV;
      // Forward: the state at the start of every segment.
      if (P.h0 != nullptr) {
        std::memcpy(St.data(), P.h0 + state_off, sizeof(float) * KV);
      } else {
        std::fill(St.begin(), St.end(), 0.f);
      }
      const int64_t nseg = (sq.len + L - 1) / L;
      for (int64_t s = 0; s < nseg; ++s) {
        std::memcpy(checkpoints.data() + s * KV, St.data(), sizeof(float) * KV);
        if (s + 1 == nseg) break;  // the last segment is replayed from its checkpoint anyway
        for (int64_t i = s * L; i < (s + 1) * L; ++i) token_forward(P, sq, sq.start + i, h, St.data(), buf, nullptr,
                                                                    nullptr, nullptr);
      }
      // Backward: dS is dL/d(state after the current token), starting from dL/dfinal.
      if (grad_final != nullptr) {
        std::memcpy(dS.data(), grad_final + state_off, sizeof(float) * KV);
      } else {
        std::fill(dS.begin(), dS.end(), 0.f);
      }
      for (int64_t s = nseg - 1; s >= 0; --s) {
        const int64_t i0 = s * L, i1 = std::min(sq.len, (s + 1) * L);
        std::memcpy(St.data(), checkpoints.data() + s * KV, sizeof(float) * KV);
        for (int64_t i = i0; i < i1; ++i) {
          token_forward(P, sq, sq.start + i, h, St.data(), buf, nullptr, states.data() + (i - i0) * (n + 1) * KV,
                        ds.data() + (i - i0) * n * V);
        }
        for (int64_t i = i1 - 1; i >= i0; --i) {
          const int64_t t = sq.start + i;
          const int64_t tk = P.tok(sq, t);
          const float* Sx = states.data() + (i - i0) * (n + 1) * KV;  // Sx + j KV: before sub-step j
          // Read-out: o = scale S_t^T q.
          const float* go = grad_o + (tk * H + h) * V;
          for (int64_t l = 0; l < V; ++l) dof[l] = P.scale * go[l];
          to_f32(P.q_at(sq, t, h), K, kq.data());
          const float* S_after = Sx + n * KV;
          S* dqp = dq + (tk * H + h) * K;
          for (int64_t r = 0; r < K; ++r) {
            dqp[r] = static_cast<S>(dot(V, S_after + r * V, dof.data()));
            axpy(V, kq[r], dof.data(), dS.data() + r * V);
          }
          // The factors, last first.
          for (int64_t j = n - 1; j >= 0; --j) {
            const float* Sj = Sx + j * KV;
            const float* d = ds.data() + ((i - i0) * n + j) * V;
            const float bj = P.beta_at(sq, t, j, h);
            to_f32(P.k_at(sq, t, j, h), K, kq.data());
            read_state(dS.data(), K, V, kq.data(), p.data());  // p = dS'^T k
            S* dvp = dv + ((tk * n + j) * H + h) * V;
            for (int64_t l = 0; l < V; ++l) dvp[l] = static_cast<S>(bj * p[l]);
            dbeta[(tk * n + j) * H + h] = dot(V, d, p.data());
            S* dkp = dk + ((tk * n + j) * H + h) * K;
            for (int64_t r = 0; r < K; ++r) {
              float* row = dS.data() + r * V;
              const float dk_r = bj * (dot(V, row, d) - dot(V, Sj + r * V, p.data()));
              dkp[r] = static_cast<S>(dk_r);
              axpy(V, -bj * kq[r], p.data(), row);
            }
          }
          if (P.g != nullptr) {  // dS is now dL/dS_g, S_g = exp(g) S_prev the gated state
            dg[tk * H + h] = dot(KV, dS.data(), Sx);
            scale_inplace(KV, P.gate_at(sq, t, h), dS.data());
          }
        }
      }
      std::memcpy(dh0 + state_off, dS.data(), sizeof(float) * KV);
    }
  });
}

struct Dims {
  int64_t B, T, H, K, V, n, N;
};

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& h0,
                  const std::vector<Seq>& seqs) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 5 && v.dim() == 5 && beta.dim() == 4,
              "householder cpu: q (B, T, H, K), k (B, T, n, H, K), v (B, T, n, H, V), beta (B, T, n, H) expected");
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(4), k.size(2), static_cast<int64_t>(seqs.size())};
  TORCH_CHECK(k.sizes() == at::IntArrayRef({d.B, d.T, d.n, d.H, d.K}), "k must be (B, T, n, H, K), got ", k.sizes());
  TORCH_CHECK(v.sizes() == at::IntArrayRef({d.B, d.T, d.n, d.H, d.V}), "v must be (B, T, n, H, V), got ", v.sizes());
  TORCH_CHECK(beta.sizes() == at::IntArrayRef({d.B, d.T, d.n, d.H}), "beta must be (B, T, n, H), got ", beta.sizes());
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && beta.is_contiguous(),
              "householder cpu: q, k, v, beta must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k, v must have q's dtype");
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "beta must be float32");
  if (g.has_value()) {
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->is_contiguous() &&
                    g->sizes() == at::IntArrayRef({d.B, d.T, d.H}),
                "log_gate must be a contiguous (B, T, H) float32 tensor");
  }
  if (h0.has_value()) {
    TORCH_CHECK(h0->scalar_type() == at::kFloat && h0->is_contiguous() &&
                    h0->sizes() == at::IntArrayRef({d.N, d.H, d.K, d.V}),
                "initial_state must be a contiguous (N, H, K, V) float32 tensor, got ", h0->sizes());
  }
  return d;
}

template <typename S>
Problem<S> make_problem(const Dims& d, double scale, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                        const c10::optional<at::Tensor>& h0) {
  return Problem<S>{d.T, d.H, d.K, d.V, d.n, static_cast<float>(scale),
                    reinterpret_cast<const S*>(q.data_ptr()), reinterpret_cast<const S*>(k.data_ptr()),
                    reinterpret_cast<const S*>(v.data_ptr()), beta.data_ptr<float>(),
                    g.has_value() ? g->data_ptr<float>() : nullptr, h0.has_value() ? h0->data_ptr<float>() : nullptr};
}

}  // namespace

// q (B, T, H, K), k (B, T, n, H, K), v (B, T, n, H, V) float32 | bfloat16 | float16, contiguous;
// beta (B, T, n, H), log_gate (B, T, H) or None, initial_state (N, H, K, V) or None: float32.
// Returns (o (B, T, H, V) in q's dtype, final_state (N, H, K, V) float32).
std::vector<at::Tensor> householder_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& beta, const c10::optional<at::Tensor>& log_gate,
                                            const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& cu,
                                            double scale) {
  const auto seqs = make_seqs(q.size(0), q.size(1), cu);
  const Dims d = check_inputs(q, k, v, beta, log_gate, h0, seqs);
  at::Tensor o = empty_output({d.B, d.T, d.H, d.V}, q.options());
  at::Tensor final_state = empty_output({d.N, d.H, d.K, d.V}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "householder_forward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      forward_typed<scalar_t>(make_problem<scalar_t>(d, scale, q, k, v, beta, log_gate, h0), seqs,
                              reinterpret_cast<scalar_t*>(o.data_ptr()), final_state.data_ptr<float>());
    } else {
      TORCH_CHECK(false, "householder cpu: float64 is the reference backend's");
    }
  });
  return {o, final_state};
}

// As householder_forward, plus grad_o (B, T, H, V) and grad_final (N, H, K, V) or None, float32.
// Returns (dq, dk, dv in q's dtype; dbeta (B, T, n, H), dlog_gate (B, T, H) (empty without a
// gate), dh0 (N, H, K, V): float32).
std::vector<at::Tensor> householder_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& beta, const c10::optional<at::Tensor>& log_gate,
                                             const c10::optional<at::Tensor>& h0, const at::Tensor& grad_o,
                                             const c10::optional<at::Tensor>& grad_final,
                                             const c10::optional<at::Tensor>& cu, double scale) {
  const auto seqs = make_seqs(q.size(0), q.size(1), cu);
  const Dims d = check_inputs(q, k, v, beta, log_gate, h0, seqs);
  TORCH_CHECK(grad_o.scalar_type() == at::kFloat && grad_o.is_contiguous() &&
                  grad_o.sizes() == at::IntArrayRef({d.B, d.T, d.H, d.V}),
              "grad_o must be a contiguous (B, T, H, V) float32 tensor");
  if (grad_final.has_value()) {
    TORCH_CHECK(grad_final->scalar_type() == at::kFloat && grad_final->is_contiguous() &&
                    grad_final->sizes() == at::IntArrayRef({d.N, d.H, d.K, d.V}),
                "grad_final must be a contiguous (N, H, K, V) float32 tensor");
  }
  at::Tensor dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  at::Tensor dv = empty_output(v.sizes(), v.options());
  at::Tensor dbeta = at::empty_like(beta);
  at::Tensor dg = log_gate.has_value() ? at::empty_like(*log_gate) : at::empty({0}, beta.options());
  at::Tensor dh0 = empty_output({d.N, d.H, d.K, d.V}, beta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "householder_backward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      backward_typed<scalar_t>(make_problem<scalar_t>(d, scale, q, k, v, beta, log_gate, h0), seqs,
                               grad_o.data_ptr<float>(), grad_final.has_value() ? grad_final->data_ptr<float>() : nullptr,
                               reinterpret_cast<scalar_t*>(dq.data_ptr()), reinterpret_cast<scalar_t*>(dk.data_ptr()),
                               reinterpret_cast<scalar_t*>(dv.data_ptr()), dbeta.data_ptr<float>(),
                               log_gate.has_value() ? dg.data_ptr<float>() : nullptr, dh0.data_ptr<float>());
    } else {
      TORCH_CHECK(false, "householder cpu: float64 is the reference backend's");
    }
  });
  return {dq, dk, dv, dbeta, dg, dh0};
}

}  // namespace linrec_cpu
