"""Sequential reference for the Householder-product scan: the oracle every backend is tested against.

A plain loop over tokens and, within a token, over its n factors. It runs on any
device, in float64 when given float64, and autograd differentiates it directly
(the ``reference`` backend's backward is autograd through this loop).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import accumulation_dtype


def householder_scan_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                               log_gate: Optional[torch.Tensor] = None,
                               initial_state: Optional[torch.Tensor] = None, *,
                               cu_seqlens: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token t of every sequence, with the state S a (K, V) matrix per head::

        S <- exp(log_gate_t) * S
        for j in 1..n:  S <- S - beta_tj k_tj (k_tj^T S) + beta_tj k_tj v_tj^T
        o_t = scale * S^T q_t

    Args:
        q: (B, T, H, K) float32 | bfloat16 | float16 | float64.
        k: (B, T, n, H, K), same dtype kind as q. v: (B, T, n, H, V). beta: (B, T, n, H).
        log_gate: (B, T, H) or None (no decay, alpha = 1).
        initial_state: (N, H, K, V) or None (zeros); N = B, or the number of packed sequences.
        scale: multiplies the read-out; default K ** -0.5.
        cu_seqlens: (N + 1,) int offsets of N sequences packed along T (B = 1), or None.

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (N, H, K, V) in the accumulation dtype
        (float32, or float64 for float64 inputs). Accumulation is in that dtype throughout.
    """
    acc = accumulation_dtype(q.dtype)
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    ga = log_gate.to(acc) if log_gate is not None else None
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    outs = [[None] * T for _ in range(B)]
    finals = []
    for seq, (b, start, end) in enumerate(bounds):
        S = (initial_state[seq].to(acc) if initial_state is not None
             else torch.zeros(H, K, V, dtype=acc, device=q.device))
        for t in range(start, end):
            if ga is not None:
                S = torch.exp(ga[b, t])[:, None, None] * S
            for j in range(n):
                kj, vj, bj = ka[b, t, j], va[b, t, j], ba[b, t, j]          # (H, K), (H, V), (H,)
                ktS = torch.einsum("hk,hkv->hv", kj, S)                      # k^T S: (H, V)
                S = S + bj[:, None, None] * kj[:, :, None] * (vj - ktS)[:, None, :]
            outs[b][t] = scale * torch.einsum("hkv,hk->hv", S, qa[b, t])
        finals.append(S)
    if T == 0:
        o = q.new_zeros(B, 0, H, V, dtype=acc)
    else:
        o = torch.stack([torch.stack(row) for row in outs])
    final_state = torch.stack(finals) if finals else q.new_zeros(0, H, K, V, dtype=acc)
    return o.to(q.dtype), final_state
