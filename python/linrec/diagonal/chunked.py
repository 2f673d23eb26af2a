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
negative a are as exact as in the sequential loop. Reverse scans walk the same
chunks in the other order (no flipped copies), and the backward is the same scan
run in the other direction over shifted views of the coefficients, written
straight into the gradient buffers: on the CPU, fresh allocations (page faults)
cost as much as the arithmetic, so the code avoids temporaries of the full size.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import accumulation_dtype

CHUNK_SIZE = 64


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float64 (complex128): the dtype long chunk products and the carries are formed in."""
    return torch.complex128 if dtype.is_complex else torch.float64


# Above this many chunks in one carry chain the chunk products are formed in float64.
# Why: with |a| near 1 a chunk product's fp32 rounding is nearly the same in every chunk,
# so the carry pass compounds it linearly with the number of chunks it chains. Measured
# (a in [0.99999 - 1e-6, 0.99999], relative RMS against float64): 64 chunks 3.9e-6,
# 128 chunks 1.3e-5, 1093 chunks (T = 70000) 8.7e-5 with fp32 products; 4e-7 with
# float64 ones at every length. float64 products cost about twice the fp32 ones, so
# short chains (T <= 4096 at C = 64), already within the 1e-5 bound, keep fp32.
WIDE_PRODUCTS_ABOVE_CHUNKS = 64

# Bound on |running product| in the overflow-safe product: any float32 coefficient
# (below 3.4e38) times it stays finite in float64, so no step makes inf, nor inf * 0.
_PRODUCT_BOUND = 1e150


def _chunk_products(av: torch.Tensor, positions) -> torch.Tensor:
    """Product of every chunk's coefficients: (B, n, D) from av (B, n, C, D).

    fp32 (complex64) for short carry chains, float64 (complex128) for long ones (see
    WIDE_PRODUCTS_ABOVE_CHUNKS). A product that overflows (|a| > 1 for a whole chunk)
    would turn a zero carry, or a reset later in the chunk, into inf * 0 = NaN where
    the sequential loop is exact; one isfinite check over the (B, n, D) products finds
    that, and then the products are formed step by step in float64, saturating at a
    large finite bound, so that a zero factor or a zero carry still gives an exact zero.
    NaN coefficients stay NaN.
    """
    n = av.shape[1]
    if n > WIDE_PRODUCTS_ABOVE_CHUNKS:  # in groups of 8 positions: a bounded float64 temporary
        prod = None
        for i in range(0, av.shape[2], 8):
            part = av[:, :, i : i + 8].to(_wide(av.dtype)).prod(dim=2)
            prod = part if prod is None else prod.mul_(part)
    else:
        prod = av.prod(dim=2)
    if bool(torch.isfinite(prod).all()):
        return prod
    prod = torch.ones(prod.shape, dtype=_wide(av.dtype), device=av.device)
    for i in positions:
        prod.mul_(av[:, :, i])
        if prod.is_complex():
            magnitude = prod.abs()
            prod = torch.where(magnitude > _PRODUCT_BOUND, prod * (_PRODUCT_BOUND / magnitude), prod)
        else:
            prod.clamp_(-_PRODUCT_BOUND, _PRODUCT_BOUND)
    return prod


def _scan_into(out: torch.Tensor, a: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor],
               reverse: bool, chunk_size: int) -> None:
    """Writes ``out[:, t] = a[:, t] * out[:, t -+ 1] + x[:, t]`` for a (B, L, D) span.

    All tensors are in the accumulation dtype; ``a`` may have stride-0 (broadcast)
    dimensions, ``out`` may be a view into a larger tensor; ``h0`` is (B, D) or None.
    The sweep runs from t = 0 up, or from t = L - 1 down when ``reverse``.
    """
    B, L, D = x.shape
    if L == 0:
        return
    carry = h0 if h0 is not None else torch.zeros((B, D), dtype=x.dtype, device=x.device)
    C = chunk_size
    n = L // C if L >= 2 * C else 0
    # The chunked part covers the first n*C steps of the sweep; the rest runs step by step.
    span = slice(L - n * C, L) if reverse else slice(0, n * C)
    if n:
        av, xv, hv = (t[:, span].unflatten(1, (n, C)) for t in (a, x, out))  # (B, n, C, D)
        positions = range(C - 1, -1, -1) if reverse else range(C)
        chunks = range(n - 1, -1, -1) if reverse else range(n)
        first, *rest = positions
        # Pass 1: local end state and coefficient product of every chunk.
        local_end = xv[:, :, first].clone()
        for i in rest:
            local_end.mul_(av[:, :, i]).add_(xv[:, :, i])
        chunk_prod = _chunk_products(av, positions)
        # Pass 2: carries into each chunk, sequentially over the n chunks, in the wide dtype
        # of the products (see _chunk_products); pass 3 starts from them rounded to acc.
        carries = torch.empty((B, n, D), dtype=x.dtype, device=x.device)
        carry = carry.to(chunk_prod.dtype)
        for k in chunks:
            carries[:, k] = carry
            carry = torch.addcmul(local_end[:, k], chunk_prod[:, k], carry)
        carry = carry.to(x.dtype)
        # Pass 3: the scan within every chunk, from its true carry.
        prev = carries
        for i in positions:
            torch.addcmul(xv[:, :, i], av[:, :, i], prev, out=hv[:, :, i])
            prev = hv[:, :, i]
    rest_steps = range(L - n * C - 1, -1, -1) if reverse else range(n * C, L)
    for t in rest_steps:
        carry = torch.addcmul(x[:, t], a[:, t], carry)
        out[:, t] = carry


def _spans(B: int, T: int, cu_seqlens: Optional[torch.Tensor]):
    """(batch rows, time slice, state rows) of every sequence: the whole batch, or each packed one."""
    if cu_seqlens is None:
        return [(slice(0, B), slice(0, T), slice(0, B))]
    offsets = cu_seqlens.tolist()
    return [(slice(0, 1), slice(s, e), slice(n, n + 1)) for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:]))]


def diagonal_scan_chunked(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor] = None, *,
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
    xs = x.to(acc)
    h0 = None if initial_state is None else initial_state.to(acc)
    h = torch.empty(x.shape, dtype=acc, device=x.device)
    for rows, times, states in _spans(x.shape[0], x.shape[1], cu_seqlens):
        _scan_into(h[rows, times], a[rows, times], xs[rows, times], None if h0 is None else h0[states],
                   reverse, chunk_size)
    return h.to(x.dtype)


def diagonal_scan_chunked_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                   initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                                   reverse: bool, chunk_size: int = CHUNK_SIZE
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan, all in the accumulation dtype.

    With ``g_t = dL/dx_t``, a forward-in-time scan has
    ``g_t = grad_h_t + conj(a_{t+1}) g_{t+1}`` (a reverse scan, same code),
    ``dL/da_t = g_t conj(h_{t-1})`` and ``dL/dh_0 = conj(a_1) g_1``; a reverse scan
    mirrors every index. Per sequence of length L (forward case), the backward
    sweep is g_{L-1} = grad_h_{L-1}, then the reverse scan of the views
    ``a[1:]``, ``grad_h[:L-1]`` started from it: no shifted copies are made.

    Args:
        a: (B, T, D) broadcast coefficients; h: (B, T, D) forward output;
        grad_h: (B, T, D); initial_state: (N, D) or None; cu_seqlens, reverse as forward.

    Returns:
        (grad_a (B, T, D), grad_x (B, T, D), grad_initial_state (N, D)).
    """
    acc = accumulation_dtype(h.dtype)
    B, T, D = h.shape
    a = torch.broadcast_to(a, h.shape).to(acc)
    h = h.to(acc)
    grad_h = grad_h.to(acc)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    g = torch.empty((B, T, D), dtype=acc, device=h.device)
    grad_a = torch.empty((B, T, D), dtype=acc, device=h.device)
    grad_h0 = torch.zeros((N, D), dtype=acc, device=h.device)
    for rows, times, states in _spans(B, T, cu_seqlens):
        a_s, h_s, gh_s, g_s, ga_s = (t[rows, times] for t in (a, h, grad_h, g, grad_a))
        L = g_s.shape[1]
        if L == 0:
            continue
        init = None if initial_state is None else initial_state[states].to(acc)
        if reverse:  # forward sweep went down: the backward sweep goes up from t = 0
            first, later, earlier = 0, slice(1, L), slice(0, L - 1)
        else:        # forward sweep went up: the backward sweep goes down from t = L - 1
            first, later, earlier = L - 1, slice(0, L - 1), slice(1, L)
        # The step the forward sweep took last is where the backward sweep starts.
        g_s[:, first] = gh_s[:, first]
        _scan_into(g_s[:, later], a_s[:, earlier].conj(), gh_s[:, later], g_s[:, first], not reverse, chunk_size)
        # dL/da_t = g_t * conj(h of the forward step before t); h0 before the first step.
        t_first_fwd = L - 1 if reverse else 0
        if reverse:
            torch.mul(g_s[:, : L - 1], h_s[:, 1:].conj(), out=ga_s[:, : L - 1])
        else:
            torch.mul(g_s[:, 1:], h_s[:, : L - 1].conj(), out=ga_s[:, 1:])
        if init is not None:
            ga_s[:, t_first_fwd] = g_s[:, t_first_fwd] * init.conj()
            grad_h0[states] = a_s[:, t_first_fwd].conj() * g_s[:, t_first_fwd]
        else:
            ga_s[:, t_first_fwd] = 0
    return grad_a, g, grad_h0
