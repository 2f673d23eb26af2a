"""Sequential reference for the block-diagonal scan: the oracle every backend is tested against.

A plain loop over time in PyTorch: one batched matrix-vector product per step.
It runs on any device, in float64 when given float64, and autograd
differentiates it directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import accumulation_dtype


def block_diagonal_scan_reference(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor] = None, *,
                                  cu_seqlens: Optional[torch.Tensor] = None, reverse: bool = False) -> torch.Tensor:
    """``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``, one step at a time.

    Args:
        A: (B, T, G, b, b), or anything that broadcasts to it, e.g. (G, b, b); real.
        x: (B, T, G, b) float32 | bfloat16 | float16 | float64.
        initial_state: (N, G, b) or None (zeros); N = B, or the number of packed sequences.
        cu_seqlens: (N + 1,) int offsets of packed sequences along T (then B = 1), or None.
        reverse: run from t = T down to 1, ``h_t = A_t @ h_{t+1} + x_t``.

    Returns:
        h: (B, T, G, b) in x's dtype; accumulated in fp32, or fp64 for fp64 inputs.
    """
    acc = accumulation_dtype(x.dtype)
    B, T, G, b = x.shape
    A = torch.broadcast_to(A, (B, T, G, b, b)).to(acc)
    xs = x.to(acc)
    if cu_seqlens is None:
        bounds = [(n, 0, T) for n in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    rows = [[None] * T for _ in range(B)]
    for n, (row, start, end) in enumerate(bounds):
        h = (initial_state[n].to(acc) if initial_state is not None
             else torch.zeros((G, b), dtype=acc, device=x.device))
        steps = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in steps:
            h = torch.matmul(A[row, t], h.unsqueeze(-1)).squeeze(-1) + xs[row, t]
            rows[row][t] = h
    if T == 0:
        return x.new_zeros((B, 0, G, b))
    return torch.stack([torch.stack(r) for r in rows]).to(x.dtype)
