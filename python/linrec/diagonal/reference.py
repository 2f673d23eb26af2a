"""Sequential reference for the diagonal scan: the oracle every backend is tested against.

It is a plain loop over time in PyTorch, so it runs on any device, in float64 when
given float64 (or complex128), and autograd differentiates it directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import accumulation_dtype


def diagonal_scan_reference(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor] = None, *,
                            cu_seqlens: Optional[torch.Tensor] = None, reverse: bool = False) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + x_t``, one step at a time.

    Args:
        a: (B, T, D), or anything that broadcasts to x's shape; real or complex.
        x: (B, T, D) float32 | bfloat16 | float16 | float64 | complex64 | complex128.
        initial_state: (N, D) or None (zeros); N = B, or the number of packed sequences.
        cu_seqlens: (N + 1,) int offsets of packed sequences along T (then B = 1), or None.
        reverse: run from t = T down to 1, ``h_t = a_t * h_{t+1} + x_t``.

    Returns:
        h: (B, T, D) in x's dtype; accumulated in fp32 (complex64), or fp64 for fp64 inputs.
    """
    acc = accumulation_dtype(x.dtype)
    a = torch.broadcast_to(a, x.shape).to(acc)
    xs = x.to(acc)
    B, T, D = x.shape
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    rows = [[None] * T for _ in range(B)]
    for n, (b, start, end) in enumerate(bounds):
        h = (initial_state[n].to(acc) if initial_state is not None
             else torch.zeros(D, dtype=acc, device=x.device))
        steps = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in steps:
            h = a[b, t] * h + xs[b, t]
            rows[b][t] = h
    out = torch.stack([torch.stack(r) if T else xs.new_zeros(0, D) for r in rows]) if T else xs.new_zeros(B, 0, D)
    return out.to(x.dtype)
