"""Sequential reference for the selective scan (Mamba): the oracle every backend is tested against.

A plain loop over time in PyTorch: it runs on any device, in float64 when given float64, and
autograd differentiates it directly (its gradients are the tests' independent oracle for the
hand-written backwards of the chunked form and the Triton kernels).

Per channel d and state n, with ``dt = softplus(delta + delta_bias)`` (or ``delta + delta_bias``)::

    abar_t[d, n] = exp(dt_t[d] A[d, n])            (negative_eigenvalues: 2 abar - 1)
    h_t[d, n]    = abar_t[d, n] h_{t-1}[d, n] + dt_t[d] B_t[g(d), n] x_t[d]
    y_t[d]       = sum_n C_t[g(d), n] h_t[d, n] + D[d] x_t[d]     (y <- y * silu(z_t) with z)

where channel d reads group ``g(d) = d // (D / G)`` of B and C (contiguous groups, as in mamba-ssm).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._common import accumulation_dtype


def discretize(delta: torch.Tensor, A: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool,
               negative_eigenvalues: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step sizes and transitions of the selective scan, in delta's (accumulation) dtype.

    Args:
        delta: (..., D); A: (D, N); delta_bias: (D,) or None.

    Returns:
        dt: (..., D) ``softplus(delta + delta_bias)`` or ``delta + delta_bias``;
        abar: (..., D, N) ``exp(dt A)``, or ``2 exp(dt A) - 1`` with ``negative_eigenvalues``.
    """
    dt = delta if delta_bias is None else delta + delta_bias
    if delta_softplus:
        dt = F.softplus(dt)
    abar = torch.exp(dt[..., None] * A)
    if negative_eigenvalues:
        abar = 2.0 * abar - 1.0
    return dt, abar


def expand_groups(BC: torch.Tensor, D: int) -> torch.Tensor:
    """(..., G, N) -> (..., D, N): channel d reads group d // (D / G)."""
    G = BC.shape[-2]
    return BC.repeat_interleave(D // G, dim=-2) if G > 1 else BC.expand(*BC.shape[:-2], D, BC.shape[-1])


def selective_scan_reference(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                             delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                             initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
                             cu_seqlens: Optional[torch.Tensor] = None, negative_eigenvalues: bool = False
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selective scan, one step at a time (see the module doc for the recurrence).

    Args:
        x: (B, T, D) float32 | bfloat16 | float16 | float64.
        delta: (B, T, D) any float dtype.
        A: (D, N) real, meant to be <= 0.
        B, C: (B, T, N) or grouped (B, T, G, N) with G dividing D.
        D: (D,) skip connection, or None.
        z: (B, T, D) gate, or None.
        delta_bias: (D,) or None. delta_softplus: dt = softplus(delta + delta_bias).
        initial_state: (N_seq, D, N) or None (zeros); N_seq = B, or the number of packed sequences.
        reverse: run from t = T down to 1 (``h_t = abar_t h_{t+1} + ...``).
        cu_seqlens: (N_seq + 1,) int offsets of sequences packed along T (B = 1), or None.
        negative_eigenvalues: abar -> 2 abar - 1, in (-1, 1] for A <= 0.

    Returns:
        y: (B, T, D) in x's dtype;
        final_state: (N_seq, D, N) in the accumulation dtype (float32; float64 for float64 x), the
        state after the last step of every sequence (the initial state for an empty one).
    """
    acc = accumulation_dtype(x.dtype)
    Bsz, T, Dch = x.shape
    Nst = A.shape[-1]
    if B.dim() == 3:
        B = B.unsqueeze(2)
    if C.dim() == 3:
        C = C.unsqueeze(2)
    xs, A_, Bs, Cs = x.to(acc), A.to(acc), B.to(acc), C.to(acc)
    dt, abar = discretize(delta.to(acc), A_, None if delta_bias is None else delta_bias.to(acc), delta_softplus,
                          negative_eigenvalues)                                  # (B, T, D), (B, T, D, N)
    Bx = expand_groups(Bs, Dch)                                                  # (B, T, D, N)
    Cx = expand_groups(Cs, Dch)
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(Bsz)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    ys = [[None] * T for _ in range(Bsz)]
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        h = (initial_state[n].to(acc) if initial_state is not None
             else torch.zeros(Dch, Nst, dtype=acc, device=x.device))
        steps = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in steps:
            h = abar[b, t] * h + (dt[b, t] * xs[b, t])[:, None] * Bx[b, t]
            y = (Cx[b, t] * h).sum(-1)
            if D is not None:
                y = y + D.to(acc) * xs[b, t]
            if z is not None:
                y = y * F.silu(z[b, t].to(acc))
            ys[b][t] = y
        finals.append(h)
    if T:
        y = torch.stack([torch.stack(row) for row in ys])
    else:
        y = xs.new_zeros(Bsz, 0, Dch)
    final = torch.stack(finals) if finals else xs.new_zeros(0, Dch, Nst)
    return y.to(x.dtype), final
