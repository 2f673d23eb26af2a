"""Chunked PyTorch form of the diagonal scan: the CPU backend.

A per-step loop over T launches 2T small ops. Here time is cut into chunks of C
steps and the work is done in three vectorised passes, each a loop of C (or T/C)
steps over large tensors:

1. within every chunk at once, the chunk's local end state ``s_k`` (the scan of
   the chunk started from zero) and the product of its coefficients ``p_k``;
2. across chunks, the carries: ``c_k = p_k * c_{k-1} + s_k`` (T/C small steps);
3. within every chunk at once, the scan again, now started from the true carry,
   written straight into the output.

No division by products of coefficients is ever taken, so a = 0 (a reset) and
negative a are as exact as in the sequential loop. The backward is the same scan
run in the other direction on the shifted, conjugated coefficients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import accumulation_dtype

CHUNK_SIZE = 64


def _scan_dense(a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Forward-in-time scan of (B, T, D) tensors already in the accumulation dtype.

    ``a`` may have stride-0 (broadcast) dimensions; ``h0`` is (B, D) or None.
    Returns a new contiguous (B, T, D) tensor.
    """
    B, T, D = x.shape
    h = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    carry = h0 if h0 is not None else torch.zeros((B, D), dtype=x.dtype, device=x.device)
    C = chunk_size
    n = T // C
    if n >= 2:
        av = a[:, : n * C].unflatten(1, (n, C))  # (B, n, C, D)
        xv = x[:, : n * C].unflatten(1, (n, C))
        hv = h[:, : n * C].unflatten(1, (n, C))
        # Pass 1: local end state and coefficient product of every chunk.
        local_end = xv[:, :, 0].clone()
        for i in range(1, C):
            local_end = torch.addcmul(xv[:, :, i], av[:, :, i], local_end)
        chunk_prod = av.prod(dim=2)
        # Pass 2: carries into each chunk, sequentially over the n chunks.
        carries = torch.empty((B, n, D), dtype=x.dtype, device=x.device)
        for k in range(n):
            carries[:, k] = carry
            carry = torch.addcmul(local_end[:, k], chunk_prod[:, k], carry)
        # Pass 3: the scan within every chunk, from its true carry.
        prev = carries
        for i in range(C):
            torch.addcmul(xv[:, :, i], av[:, :, i], prev, out=hv[:, :, i])
            prev = hv[:, :, i]
        done = n * C
    else:
        done = 0
    # The tail shorter than two chunks runs step by step.
    for t in range(done, T):
        carry = torch.addcmul(x[:, t], a[:, t], carry)
        h[:, t] = carry
    return h


def _scan_sequences(a, x, h0, cu_seqlens, reverse, chunk_size):
    """Dispatches dense or packed (B, T, D) inputs to ``_scan_dense``, in either direction."""
    if cu_seqlens is None:
        if reverse:
            return _scan_dense(a.flip(1), x.flip(1), h0, chunk_size).flip(1)
        return _scan_dense(a, x, h0, chunk_size)
    out = torch.empty_like(x)
    offsets = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        if e > s:
            init = None if h0 is None else h0[n : n + 1]
            out[:, s:e] = _scan_sequences(a[:, s:e], x[:, s:e], init, None, reverse, chunk_size)
    return out


def diagonal_scan_chunked(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                          cu_seqlens: Optional[torch.Tensor] = None, reverse: bool = False,
                          chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Chunked ``h_t = a_t * h_{t-1} + x_t``; same arguments and result as the reference.

    Args:
        a: broadcastable to x, (B, T, D); x: (B, T, D); initial_state: (N, D) or None;
        cu_seqlens: (N + 1,) offsets with B = 1, or None; reverse: scan from T down to 1.

    Returns:
        h: (B, T, D) in x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    a = torch.broadcast_to(a, x.shape).to(acc)
    h0 = None if initial_state is None else initial_state.to(acc)
    h = _scan_sequences(a, x.to(acc), h0, cu_seqlens, reverse, chunk_size)
    return h.to(x.dtype)


def _shift(t: torch.Tensor, cu_seqlens: Optional[torch.Tensor], step: int, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Moves (B, T, D) ``t`` by ``step`` = +-1 along time within each sequence.

    ``out[:, i] = t[:, i - step]``; the position that falls off a sequence's start
    (in the direction of travel) gets ``fill`` (N, D), or zero when ``fill`` is None.
    """
    out = torch.zeros_like(t)
    B, T, _ = t.shape
    spans = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    for n, (s, e) in enumerate(spans):
        if e <= s:
            continue
        first = s if step > 0 else e - 1
        if step > 0:
            out[:, s + 1 : e] = t[:, s : e - 1]
        else:
            out[:, s : e - 1] = t[:, s + 1 : e]
        if fill is not None:
            out[:, first] = fill if cu_seqlens is None else fill[n]
    return out


def diagonal_scan_chunked_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                   initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                                   reverse: bool, chunk_size: int = CHUNK_SIZE
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan, all in the accumulation dtype.

    With ``g_t = dL/dx_t``, a forward-in-time scan has
    ``g_t = grad_h_t + conj(a_{t+1}) g_{t+1}`` (a reverse scan, same kernel),
    ``dL/da_t = g_t conj(h_{t-1})`` and ``dL/dh_0 = conj(a_1) g_1``; a reverse scan
    mirrors every index.

    Args:
        a: (B, T, D) broadcast coefficients; h: (B, T, D) forward output;
        grad_h: (B, T, D); initial_state: (N, D) or None; cu_seqlens, reverse as forward.

    Returns:
        (grad_a (B, T, D), grad_x (B, T, D), grad_initial_state (N, D)).
    """
    acc = accumulation_dtype(grad_h.dtype if grad_h.is_complex() else h.dtype)
    a = torch.broadcast_to(a, h.shape).to(acc)
    h = h.to(acc)
    step = -1 if reverse else 1  # direction of the forward scan
    # Coefficient of the backward recurrence at t: conj(a) of the forward step after t.
    a_next = _shift(a.conj(), cu_seqlens, -step, None)
    g = _scan_sequences(a_next, grad_h.to(acc), None, cu_seqlens, not reverse, chunk_size)
    N = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = (initial_state.to(acc) if initial_state is not None
          else torch.zeros((N, h.shape[2]), dtype=acc, device=h.device))
    h_prev = _shift(h, cu_seqlens, step, h0)
    grad_a = g * h_prev.conj()
    # dL/dh0 = conj(a_first) * g_first, with "first" the first step of each sequence.
    if cu_seqlens is None:
        first = torch.full((N,), h.shape[1] - 1 if reverse else 0, device=h.device)
        batch = torch.arange(N, device=h.device)
    else:
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        first = ends - 1 if reverse else starts
        batch = torch.zeros(N, dtype=torch.long, device=h.device)
    nonempty = (first >= 0) & (first < h.shape[1])
    if cu_seqlens is not None:
        nonempty &= cu_seqlens[1:] > cu_seqlens[:-1]
    first = first.clamp(0, max(h.shape[1] - 1, 0))
    if h.shape[1] == 0:
        grad_h0 = torch.zeros_like(h0)
    else:
        grad_h0 = (a[batch, first].conj() * g[batch, first]) * nonempty[:, None]
    return grad_a, g, grad_h0
