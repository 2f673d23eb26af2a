"""Step-by-step form of the Householder-product scan, for decoding (T small).

The chunked form pads every sequence to whole chunks of 64 sub-steps and solves
a 64 x 64 triangular system per chunk; for one or a few new tokens that is
wasted work. This form applies the updates one sub-step at a time, vectorised
over batch and heads, in the accumulation dtype (fp32 for fp32/bf16/fp16 inputs).
The ``torch`` backend uses it when T is at most ``HOUSEHOLDER_RECURRENT_MAX_T`` (``_common``); tests
check that it matches the chunked form.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import accumulation_dtype


def _steps(q, k, v, beta, log_gate, S, scale):
    """q: (B, T, H, K), k: (B, T, n, H, K), v: (B, T, n, H, V), beta: (B, T, n, H),
    log_gate: (B, T, H) or None, S: (B, H, K, V); all in the accumulation dtype."""
    outs = []
    for t in range(q.shape[1]):
        if log_gate is not None:
            S = torch.exp(log_gate[:, t])[..., None, None] * S
        for j in range(k.shape[2]):
            kj, vj, bj = k[:, t, j], v[:, t, j], beta[:, t, j]              # (B, H, K), (B, H, V), (B, H)
            delta = vj - torch.einsum("bhk,bhkv->bhv", kj, S)               # v - S^T k
            S = S + (bj[..., None] * kj)[..., :, None] * delta[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return outs, S


def householder_scan_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                               log_gate: Optional[torch.Tensor] = None,
                               initial_state: Optional[torch.Tensor] = None, *,
                               cu_seqlens: Optional[torch.Tensor] = None,
                               scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``householder_scan_chunked``, one sub-step at a time.

    Args:
        q: (B, T, H, K); k: (B, T, n, H, K); v: (B, T, n, H, V); beta: (B, T, n, H);
        log_gate: (B, T, H) or None; initial_state: (N, H, K, V) or None;
        scale: default K ** -0.5; cu_seqlens: (N + 1,) offsets with B = 1, or None.

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (N, H, K, V) float32 (float64 for float64 q).
    """
    acc = accumulation_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    ga = log_gate.to(acc) if log_gate is not None else None
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        S = h0 if h0 is not None else qa.new_zeros(B, H, K, V)
        outs, S = _steps(qa, ka, va, ba, ga, S, scale)
        o = torch.stack(outs, dim=1) if outs else qa.new_zeros(B, 0, H, V)
        return o.to(q.dtype), S
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for seq, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        S = h0[seq : seq + 1] if h0 is not None else qa.new_zeros(1, H, K, V)
        o_s, S = _steps(qa[:, s:e], ka[:, s:e], va[:, s:e], ba[:, s:e],
                        ga[:, s:e] if ga is not None else None, S, scale)
        outs.extend(o_s)
        finals.append(S)
    o = torch.stack(outs, dim=1) if outs else qa.new_zeros(1, 0, H, V)
    final = torch.cat(finals, dim=0) if finals else qa.new_zeros(0, H, K, V)
    return o.to(q.dtype), final
