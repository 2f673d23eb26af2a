"""Chunked PyTorch form of the selective scan: the CPU backend (``backend="torch"``).

The expanded state (D x N per sequence) is materialised one block of time at a time, never for
the whole (B, T, D, N) at once: every sequence is cut into blocks of K steps (K chosen so that a
block's expanded tensors stay under ``BLOCK_ELEMENTS`` elements); within a block the N-fold
expanded diagonal recurrence ``h_t = abar_t h_{t-1} + dt_t B_t x_t`` runs as one call of the
diagonal family's chunked scan on (B, K, D * N) (vectorised passes over chunks, section 7 of
docs/design.md), started from the state carried out of the previous block, and the read-out
``y_t = C_t . h_t + D x_t`` is a reduction over N. Accumulation is fp32 (float64 for float64).

Reverse scans flip each sequence's span in time and run the same forward code.

The backward is explicit (no autograd): one forward pass keeps only the state entering every
block (N_seq x blocks x D x N); then the blocks are visited in reverse, each recomputing its
states from its entering state and running the adjoint recurrence
``g_t = C_t dL/dy_t + abar_{t+1} g_{t+1}`` (the same diagonal scan in the other direction),
from which every gradient follows in closed form (see ``selective_scan_chunked_backward``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._common import accumulation_dtype
from ..diagonal.chunked import diagonal_scan_chunked
from .reference import discretize, expand_groups

# Elements of one block's expanded (rows, K, D, N) tensor; the backward holds about eight of them.
BLOCK_ELEMENTS = 1 << 21


def _block_steps(rows: int, D: int, N: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, rows * D * N))


def _spans(Bsz: int, T: int, cu_seqlens: Optional[torch.Tensor]):
    """(batch rows, time slice, state rows) of every sequence: the whole batch, or each packed one."""
    if cu_seqlens is None:
        return [(slice(0, Bsz), slice(0, T), slice(0, Bsz))]
    offsets = cu_seqlens.tolist()
    return [(slice(0, 1), slice(s, e), slice(n, n + 1)) for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:]))]


class _Span:
    """One sequence span in sweep order (flipped in time when ``reverse``), in the accumulation dtype."""

    def __init__(self, rows, times, x, delta, B, C, z, reverse, acc):
        def take(t):
            if t is None:
                return None
            t = t[rows, times].to(acc)
            return t.flip(1) if reverse else t
        self.x, self.delta, self.B, self.C, self.z = (take(t) for t in (x, delta, B, C, z))
        self.reverse = reverse

    def put(self, out: torch.Tensor, rows, times, value: torch.Tensor) -> None:
        out[rows, times] = value.flip(1) if self.reverse else value


def _block_states(span: _Span, s: int, e: int, A, delta_bias, delta_softplus, neg, h_in):
    """States of steps [s, e) of a span from the entering state ``h_in`` (rows, D, N).

    Returns (dt (rows, K, D), e^{dt A} (rows, K, D, N), abar, Bx (rows, K, D, N), h (rows, K, D, N))."""
    x, delta = span.x[:, s:e], span.delta[:, s:e]
    rows, K, D = x.shape
    dt, expo = discretize(delta, A, delta_bias, delta_softplus, False)
    abar = 2.0 * expo - 1.0 if neg else expo
    Bx = expand_groups(span.B[:, s:e], D)
    u = (dt * x)[..., None] * Bx
    h = diagonal_scan_chunked(abar.flatten(2), u.flatten(2), h_in.flatten(1)).view(rows, K, D, -1)
    return dt, expo, abar, Bx, h


def _prepare(x, A, D, delta_bias, initial_state, cu_seqlens):
    acc = accumulation_dtype(x.dtype)
    Bsz, T, Dch = x.shape
    N_seq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = (torch.zeros((N_seq, Dch, A.shape[-1]), dtype=acc, device=x.device) if initial_state is None
          else initial_state.to(acc))
    return (acc, A.to(acc), None if D is None else D.to(acc), None if delta_bias is None else delta_bias.to(acc), h0)


def selective_scan_chunked(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                           delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                           initial_state: Optional[torch.Tensor] = None, reverse: bool = False,
                           cu_seqlens: Optional[torch.Tensor] = None, negative_eigenvalues: bool = False,
                           block_elements: int = BLOCK_ELEMENTS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan; same arguments and results as ``selective_scan_reference``.

    Args:
        x, delta, z: (B, T, D); A: (D, N); B, C: (B, T, G, N) (or (B, T, N)); D, delta_bias: (D,) or None;
        initial_state: (N_seq, D, N) or None; cu_seqlens: (N_seq + 1,) with B = 1, or None.
        block_elements: bound on the elements of one block's expanded (rows, K, D, N) tensors.

    Returns:
        y: (B, T, D) in x's dtype; final_state: (N_seq, D, N) in the accumulation dtype.
    """
    B = B.unsqueeze(2) if B.dim() == 3 else B
    C = C.unsqueeze(2) if C.dim() == 3 else C
    acc, A_, D_, bias, h0 = _prepare(x, A, D, delta_bias, initial_state, cu_seqlens)
    Bsz, T, Dch = x.shape
    y = torch.empty((Bsz, T, Dch), dtype=acc, device=x.device)
    final = h0.clone()
    for rows, times, states in _spans(Bsz, T, cu_seqlens):
        span = _Span(rows, times, x, delta, B, C, z, reverse, acc)
        L = span.x.shape[1]
        K = _block_steps(span.x.shape[0], Dch, A.shape[-1], block_elements)
        h = h0[states]
        ys = []
        for s in range(0, L, K):
            e = min(s + K, L)
            _, _, _, _, hb = _block_states(span, s, e, A_, bias, delta_softplus, negative_eigenvalues, h)
            yb = (expand_groups(span.C[:, s:e], Dch) * hb).sum(-1)
            if D_ is not None:
                yb = yb + D_ * span.x[:, s:e]
            if span.z is not None:
                yb = yb * F.silu(span.z[:, s:e])
            ys.append(yb)
            h = hb[:, -1]
        if L:
            span.put(y, rows, times, torch.cat(ys, dim=1))
        final[states] = h
    return y.to(x.dtype), final


def selective_scan_chunked_backward(x, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                                    initial_state, reverse: bool, cu_seqlens, negative_eigenvalues: bool,
                                    grad_y: torch.Tensor, grad_final: Optional[torch.Tensor],
                                    block_elements: int = BLOCK_ELEMENTS) -> List[Optional[torch.Tensor]]:
    """Gradients of the selective scan, all in the accumulation dtype.

    In sweep order (steps i = 0..L-1 of a sequence), with ``a_i = abar_i``, ``e_i = exp(dt_i A)``,
    ``g^y_i = dL/dy_i * silu(z_i)`` and the adjoint ``g_i = C_i g^y_i + a_{i+1} g_{i+1}`` (started
    from dL/dfinal_state)::

        dL/dz_i     = dL/dy_i * y_i^pre * silu'(z_i)          (y^pre: before the gate)
        dL/dC_i[n]  = sum_{d in group} g^y_i[d] h_i[d, n]
        dL/dB_i[n]  = sum_{d in group} g_i[d, n] dt_i[d] x_i[d]
        dL/dx_i     = sum_n g_i B_i dt_i + D g^y_i
        s_i         = g_i h_{i-1} e_i (x 2 with negative eigenvalues)     = dL/d(dt_i A)
        dL/ddt_i    = sum_n (g_i B_i x_i + s_i A)
        dL/dA       = sum_i s_i dt_i;   dL/dD = sum_i g^y_i x_i;   dL/dh_{-1} = a_0 g_0
        dL/ddelta   = dL/ddt * sigmoid(delta + bias) (softplus) or dL/ddt;   dL/dbias = sum dL/ddelta

    Args:
        as ``selective_scan_chunked``; grad_y: (B, T, D); grad_final: (N_seq, D, N) or None.

    Returns:
        [grad_x, grad_delta, grad_A, grad_B (B, T, G, N), grad_C, grad_D or None, grad_z or None,
        grad_delta_bias or None, grad_initial_state (N_seq, D, N)].
    """
    B = B.unsqueeze(2) if B.dim() == 3 else B
    C = C.unsqueeze(2) if C.dim() == 3 else C
    acc, A_, D_, bias, h0 = _prepare(x, A, D, delta_bias, initial_state, cu_seqlens)
    Bsz, T, Dch = x.shape
    G, Nst = B.shape[-2], B.shape[-1]
    dev = x.device
    gx = torch.zeros((Bsz, T, Dch), dtype=acc, device=dev)
    gdelta = torch.zeros_like(gx)
    gz = torch.zeros_like(gx) if z is not None else None
    gB = torch.zeros((Bsz, T, G, Nst), dtype=acc, device=dev)
    gC = torch.zeros_like(gB)
    gA = torch.zeros((Dch, Nst), dtype=acc, device=dev)
    gD = torch.zeros((Dch,), dtype=acc, device=dev) if D is not None else None
    gh0 = torch.zeros_like(h0)
    gy_all = grad_y.to(acc)
    for rows, times, states in _spans(Bsz, T, cu_seqlens):
        span = _Span(rows, times, x, delta, B, C, z, reverse, acc)
        gy_span = gy_all[rows, times]
        gy_span = gy_span.flip(1) if reverse else gy_span
        L = span.x.shape[1]
        nrows = span.x.shape[0]
        m = (grad_final[states].to(acc) if grad_final is not None
             else torch.zeros((nrows, Dch, Nst), dtype=acc, device=dev))
        if L == 0:
            gh0[states] = m
            continue
        K = _block_steps(nrows, Dch, Nst, block_elements)
        starts = list(range(0, L, K))
        # Pass 1: the state entering every block.
        entering, h = [], h0[states]
        for s in starts:
            entering.append(h)
            h = _block_states(span, s, min(s + K, L), A_, bias, delta_softplus, negative_eigenvalues, h)[-1][:, -1]
        # Pass 2: blocks in reverse, recomputing their states; m = a_{i+1} g_{i+1} enters each.
        parts = {k: [] for k in ("x", "delta", "z", "B", "C")}
        for s, h_in in zip(reversed(starts), reversed(entering)):
            e = min(s + K, L)
            dt, expo, abar, Bx, hb = _block_states(span, s, e, A_, bias, delta_softplus, negative_eigenvalues, h_in)
            xb, gyo = span.x[:, s:e], gy_span[:, s:e]
            Cx = expand_groups(span.C[:, s:e], Dch)
            if span.z is not None:
                zb = span.z[:, s:e]
                sig = torch.sigmoid(zb)
                y_pre = (Cx * hb).sum(-1) + (D_ * xb if D_ is not None else 0.0)
                parts["z"].append(gyo * y_pre * sig * (1.0 + zb * (1.0 - sig)))
                gyb = gyo * zb * sig
            else:
                gyb = gyo
            # Adjoint: g_i = C_i g^y_i + a_{i+1} g_{i+1}, a reverse scan with the next step's transition.
            a_next = torch.cat([abar[:, 1:], torch.ones_like(abar[:, :1])], dim=1)
            g = diagonal_scan_chunked(a_next.flatten(2), (gyb[..., None] * Cx).flatten(2), m.flatten(1),
                                      reverse=True).view(hb.shape)
            m = abar[:, 0] * g[:, 0]
            h_prev = torch.cat([h_in[:, None], hb[:, :-1]], dim=1)
            s_dA = g * h_prev * expo
            if negative_eigenvalues:
                s_dA = 2.0 * s_dA
            gA += torch.einsum("bkdn,bkd->dn", s_dA, dt)
            gBx = (g * Bx).sum(-1)                                                   # (rows, K, D)
            gdt = gBx * xb + (s_dA * A_).sum(-1)
            gxb = gBx * dt
            if D_ is not None:
                gxb = gxb + D_ * gyb
                gD += (gyb * xb).sum((0, 1))
            if delta_softplus:
                pre = span.delta[:, s:e] + (bias if bias is not None else 0.0)
                gdt = gdt * torch.sigmoid(pre)
            rows_, K_ = xb.shape[:2]
            parts["x"].append(gxb)
            parts["delta"].append(gdt)
            parts["B"].append((g * (dt * xb)[..., None]).view(rows_, K_, G, Dch // G, Nst).sum(3))
            parts["C"].append((gyb[..., None] * hb).view(rows_, K_, G, Dch // G, Nst).sum(3))
        gh0[states] = m
        for key, out in (("x", gx), ("delta", gdelta), ("z", gz), ("B", gB), ("C", gC)):
            if parts[key]:
                span.put(out, rows, times, torch.cat(parts[key][::-1], dim=1))
    gbias = gdelta.sum((0, 1)) if delta_bias is not None else None
    return [gx, gdelta, gA, gB, gC, gD, gz, gbias, gh0]
