"""Chunked PyTorch form of the Householder-product scan: the CPU (``torch``) backend.

Sub-steps. A token with n factors is n sub-steps of one generalised Householder
update, the gate applied at the first of them only and the output read after
the last. Sub-step s = t * n + j of a sequence therefore carries k, v, beta of
factor j of token t and the log-gate ``lg_s = log_gate_t`` if j = 0, else 0.
The factors are handled natively: the (B, T, n, H, K) layout is viewed as
(B, T * n, H, K) at no copy, and chunks always hold whole tokens.

Chunks. A chunk holds C tokens = L = C * n sub-steps. Write G_i for the
cumulative log-gate inside the chunk (inclusive), Gamma_i = exp(G_i), S0 for the
state entering the chunk. Unrolling ``S_i = g_i S_{i-1} + beta_i k_i d_i^T`` with
``d_i = v_i - g_i S_{i-1}^T k_i`` gives the compact WY (UT) representation::

    A[i, m] = beta_i exp(G_i - G_m) k_i . k_m      (m < i; strictly lower triangular)
    Tinv    = (I + A)^{-1}                          (unit lower triangular)
    u = Tinv diag(beta) V,   w = Tinv diag(beta Gamma) K          (L, V), (L, K)
    d = u - w S0                                     the chunk's corrected values
    S_end = Gamma_L S0 + sum_m exp(G_L - G_m) k_m d_m^T
    o_c = scale (Gamma_r q_c^T S0 + sum_{m <= r} exp(G_r - G_m) (q_c . k_m) d_m),  r = c n + n - 1

Every exponent is a difference G_i - G_m with i >= m (or G itself), so it is <= 0
for decaying gates: no division by products of gates is ever taken, log_gate = 0
and very negative gates are as exact as the sequential loop. G is summed in
float64 (L numbers per chunk and head, so it costs nothing): in fp32, a hard reset
(log_gate = -1e4) followed by small gates would round those gates away.

Three passes: (1) all chunks at once: A, the triangular solves, u and w;
(2) the chunk states, sequentially over the T / C chunks (S_end is affine in S0);
(3) all chunks at once: d and the outputs. The backward is autograd through
these passes (the ``torch`` backend's op recomputes them under autograd).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._common import HOUSEHOLDER_SUBSTEPS_PER_CHUNK, accumulation_dtype


def _causal_product(scores: torch.Tensor, d: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``scores @ d`` for causally masked scores: (..., C, L) @ (..., L, V) -> (..., C, V).

    Row c of scores is zero past sub-step r(c) = ``last[c]``, but a matmul still adds
    0 * d[m] for the later m, and 0 * NaN = NaN: a non-finite value at sub-step t
    would reach the outputs of earlier tokens. When d holds non-finite values, they
    are zeroed for the product and put back as NaN exactly where causality says:
    output (c, v) is NaN iff some d[m, v] with m <= r(c) is not finite.
    """
    finite = torch.isfinite(d)
    if bool(finite.all()):
        return scores @ d
    rows = torch.arange(d.shape[-2], device=d.device)
    # First sub-step with a non-finite value, per column (L where none).
    first_bad = torch.where(finite, d.shape[-2], rows[:, None]).amin(dim=-2, keepdim=True)  # (..., 1, V)
    out = scores @ torch.where(finite, d, 0.0)
    return torch.where(last[:, None] >= first_bad, float("nan"), out)


def tokens_per_chunk(n: int, substeps: int = HOUSEHOLDER_SUBSTEPS_PER_CHUNK) -> int:
    """C: whole tokens per chunk, so that a chunk holds at most ``substeps`` sub-steps."""
    return max(1, substeps // n)


def _scan_dense(q, k, v, beta, log_gate, h0, scale, chunk_tokens):
    """One batch of equal-length sequences, all tensors already in the accumulation dtype.

    q: (B, T, H, K); k: (B, T, n, H, K); v: (B, T, n, H, V); beta: (B, T, n, H);
    log_gate: (B, T, H) or None; h0: (B, H, K, V) or None.
    Returns o: (B, T, H, V) and the final state (B, H, K, V).
    """
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    C = chunk_tokens
    NT = -(-T // C)
    pad = NT * C - T
    # Padded tokens are identity steps (beta = 0, gate 1): they leave the state alone.
    if pad:
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad))
        beta = F.pad(beta, (0, 0, 0, 0, 0, pad))
        if log_gate is not None:
            log_gate = F.pad(log_gate, (0, 0, 0, pad))
    L = C * n
    # Sub-step layout per chunk: (B, H, NT, L, .)
    ks = k.reshape(B, NT, L, H, K).permute(0, 3, 1, 2, 4)
    vs = v.reshape(B, NT, L, H, V).permute(0, 3, 1, 2, 4)
    bs = beta.reshape(B, NT, L, H).permute(0, 3, 1, 2)
    qs = q.reshape(B, NT, C, H, K).permute(0, 3, 1, 2, 4)            # (B, H, NT, C, K)
    if log_gate is not None:
        lg = torch.zeros(B, NT, C, n, H, dtype=q.dtype, device=q.device)
        lg = torch.cat([log_gate.reshape(B, NT, C, 1, H), lg[:, :, :, 1:]], dim=3)
        # The cumulative gate is summed in float64: after a hard reset (log_gate = -1e4, say)
        # an fp32 sum would have lost the small gates that follow it, and with them the
        # differences G_i - G_m that set the decays.
        G = lg.reshape(B, NT, L, H).permute(0, 3, 1, 2).double().cumsum(-1)   # (B, H, NT, L)
    else:
        G = torch.zeros(B, H, NT, L, dtype=torch.float64, device=q.device)

    idx = torch.arange(L, device=q.device)
    strict = idx[:, None] > idx[None, :]
    diff = (G[..., :, None] - G[..., None, :]).to(q.dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    decay_strict = torch.exp(torch.where(strict, diff, neg_inf))       # exp(G_i - G_m), m < i
    # Masks are applied with where, not by multiplying: 0 * NaN would carry a NaN (or inf)
    # of a later sub-step back to earlier ones.
    A = torch.where(strict, bs[..., :, None] * decay_strict * (ks @ ks.transpose(-1, -2)), 0.0)
    # Pass 1: u = (I + A)^{-1} diag(beta) V and w = (I + A)^{-1} diag(beta Gamma) K.
    gamma = torch.exp(G).to(q.dtype)
    rhs = torch.cat([bs[..., None] * vs, (bs * gamma)[..., None] * ks], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :V], sol[..., V:]
    gamma_last = gamma[..., -1]                                         # (B, H, NT)
    k_decayed = torch.exp(G[..., -1:] - G).to(q.dtype)[..., None] * ks              # exp(G_L - G_m) k_m

    # Pass 2: states entering each chunk.
    S = h0 if h0 is not None else torch.zeros(B, H, K, V, dtype=q.dtype, device=q.device)
    starts = []
    for c in range(NT):
        starts.append(S)
        d_c = u[:, :, c] - w[:, :, c] @ S
        S = gamma_last[:, :, c, None, None] * S + k_decayed[:, :, c].transpose(-1, -2) @ d_c
    S0 = torch.stack(starts, dim=2)                                    # (B, H, NT, K, V)

    # Pass 3: outputs of every chunk from its entering state.
    d = u - w @ S0
    last = idx[n - 1 :: n]                                             # r(c) = c n + n - 1
    G_r = G[..., last]                                                 # (B, H, NT, C)
    read = idx[None, :] <= last[:, None]                               # (C, L): m <= r(c)
    decay_read = torch.exp(torch.where(read, (G_r[..., :, None] - G[..., None, :]).to(q.dtype), neg_inf))
    scores = torch.where(read, decay_read * (qs @ ks.transpose(-1, -2)), 0.0)  # (B, H, NT, C, L)
    o = scale * (torch.exp(G_r).to(q.dtype)[..., None] * (qs @ S0) + _causal_product(scores, d, last))
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, S


def householder_scan_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             log_gate: Optional[torch.Tensor] = None,
                             initial_state: Optional[torch.Tensor] = None, *,
                             cu_seqlens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None,
                             chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked Householder-product scan; same arguments and results as the reference.

    Args:
        q: (B, T, H, K); k: (B, T, n, H, K); v: (B, T, n, H, V); beta: (B, T, n, H);
        log_gate: (B, T, H) or None; initial_state: (N, H, K, V) or None;
        scale: default K ** -0.5; cu_seqlens: (N + 1,) offsets with B = 1, or None;
        chunk_tokens: tokens per chunk, default ``tokens_per_chunk(n)`` (64 sub-steps).

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (N, H, K, V) float32 (float64 for float64 q).
    """
    acc = accumulation_dtype(q.dtype)
    B, T, H, K = q.shape
    n = k.shape[2]
    if scale is None:
        scale = K ** -0.5
    C = chunk_tokens if chunk_tokens is not None else tokens_per_chunk(n)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    ga = log_gate.to(acc) if log_gate is not None else None
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, final = _scan_dense(qa, ka, va, ba, ga, h0, scale, C)
        return o.to(q.dtype), final
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    V = v.shape[-1]
    for seq, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        init = h0[seq : seq + 1] if h0 is not None else None
        if e == s:
            finals.append(init if init is not None else qa.new_zeros(1, H, K, V))
            continue
        o_s, f_s = _scan_dense(qa[:, s:e], ka[:, s:e], va[:, s:e], ba[:, s:e],
                               ga[:, s:e] if ga is not None else None, init, scale, C)
        outs.append(o_s)
        finals.append(f_s)
    o = torch.cat(outs, dim=1) if outs else qa.new_zeros(1, 0, H, V)
    final = torch.cat(finals, dim=0) if finals else qa.new_zeros(0, H, K, V)
    return o.to(q.dtype), final
