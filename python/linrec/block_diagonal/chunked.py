"""Chunked PyTorch form of the block-diagonal scan: the CPU backend.

A per-step loop over T launches ~2T small batched matrix-vector products. Here
time is cut into n chunks of C steps (C ~ sqrt(T)) and the work is done in
three vectorised passes, each a loop of C (or n) steps over large tensors:

1. within every chunk at once, the chunk's local end state ``s_k`` (the scan of
   the chunk started from zero) and the product of its transitions
   ``P_k = A_{kC+C-1} ... A_{kC}`` (a batched b x b matrix product per step);
2. across chunks, the carries: ``c_k = P_k c_{k-1} + s_k`` (n small steps);
3. within every chunk at once, the scan again, now started from the true carry
   and written straight into the output.

Pass 3 recomputes the states instead of storing every prefix product, so the
extra memory is one (b x b) matrix per chunk rather than one per time step.
Nothing is ever inverted, so singular transitions (resets) are exact.

Chunking costs a b x b matrix product per block and step on top of the two
matrix-vector products, and PyTorch's batched products of tiny matrices are
slow on the CPU (tens of ns each). So a cost model (``_auto_chunk_size``) picks,
per call, between chunking (few blocks: a per-step loop would be all launch
overhead) and a lean step-by-step loop (many blocks: one fused ``baddbmm`` per
step on time-major blocks, ``_scan_stepwise``). Both are exact and tested.

The backward pass is the same scan run in the other direction with transposed
blocks (see ``block_diagonal_scan_chunked_backward``).

Internally every tensor keeps its five (or four) leading dimensions and A keeps
its size-1 (broadcast) dimensions, so a time-invariant A of shape (G, b, b) is
never materialised at (B, T, G, b, b).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._common import accumulation_dtype, num_sequences


def _matvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``A @ v`` for A (..., b, b) and v (..., b) of the same rank.

    A's leading dimensions are v's or 1 (broadcast). Dense A goes through one
    batched matmul; a broadcast A goes through einsum with the size-1 dimensions
    dropped, so it is never expanded (copied) to v's batch shape.
    """
    lead = v.dim() - 1
    if tuple(A.shape[:lead]) == tuple(v.shape[:lead]):
        return torch.matmul(A, v.unsqueeze(-1)).squeeze(-1)
    letters = "abcdefgh"[:lead]
    kept = "".join(c for c, n in zip(letters, A.shape[:lead]) if n != 1)
    A_sq = A.reshape(tuple(n for n in A.shape[:lead] if n != 1) + tuple(A.shape[-2:]))
    return torch.einsum(f"{kept}ij,{letters}j->{letters}i", A_sq, v)


def _as5d(A: torch.Tensor) -> torch.Tensor:
    """A broadcastable to (B, T, G, b, b), as a 5-D view with its size-1 dimensions kept."""
    while A.dim() < 5:
        A = A.unsqueeze(0)
    return A


def _chunk_size(T: int) -> int:
    """C ~ sqrt(T), so the C-step passes and the n-step carry pass are balanced."""
    return max(4, int(math.sqrt(T)))


def _time_slice(A: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A[:, start:end] unless A is constant in time (size-1 time dimension)."""
    return A if A.shape[1] == 1 else A[:, start:end]


def _scan_dense(A: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Forward-in-time scan, all in the accumulation dtype.

    Args:
        A: 5-D, broadcastable to (B, T, G, b, b) (size-1 dimensions kept).
        x: (B, T, G, b).  h0: (B, G, b) or None for zeros.

    Returns:
        h: a new contiguous (B, T, G, b) tensor.
    """
    B, T, G, b = x.shape
    h = torch.empty((B, T, G, b), dtype=x.dtype, device=x.device)
    carry = h0 if h0 is not None else torch.zeros((B, G, b), dtype=x.dtype, device=x.device)
    C = chunk_size
    n = T // C
    done = 0
    if n >= 2:
        done = n * C
        xv = x[:, :done].unflatten(1, (n, C))  # (B, n, C, G, b)
        hv = h[:, :done].unflatten(1, (n, C))
        if A.shape[1] == 1:  # time-invariant: the same (B|1, 1, 1, G|1, b, b) at every step
            Av = A.unsqueeze(2)
        else:
            Av = A[:, :done].unflatten(1, (n, C))  # (B|1, n, C, G|1, b, b)

        def step(i):  # transitions at position i of every chunk: (B|1, n|1, G|1, b, b)
            return Av[:, :, 0] if Av.shape[2] == 1 else Av[:, :, i]

        # Pass 1: local end state (B, n, G, b) and transition product (B|1, n|1, G|1, b, b) of every chunk.
        local_end = xv[:, :, 0].clone()
        prod = step(0)
        for i in range(1, C):
            Ai = step(i)
            local_end = _matvec(Ai, local_end).add_(xv[:, :, i])
            prod = torch.matmul(Ai, prod)
        if not bool(torch.isfinite(prod).all()):
            prod = _saturated_product(step, C)
        # Pass 2: the carry into every chunk, sequentially over the n chunks (in prod's dtype).
        carries = torch.empty((B, n, G, b), dtype=x.dtype, device=x.device)
        carry = carry.to(prod.dtype)
        for k in range(n):
            carries[:, k] = carry
            carry = _matvec(prod[:, k if prod.shape[1] > 1 else 0], carry).add_(local_end[:, k])
        carry = carry.to(x.dtype)
        # Pass 3: the scan within every chunk, from its true carry.
        prev = carries
        for i in range(C):
            hv[:, :, i] = _matvec(step(i), prev).add_(xv[:, :, i])
            prev = hv[:, :, i]
    # The tail (shorter than a chunk, or all of a sequence when stepping is cheaper) runs step by step.
    if done < T:
        _scan_stepwise(_time_slice(A, done, T), x[:, done:], carry, h[:, done:])
    return h


# Bound on the entries of the overflow-safe chunk product (see _saturated_product): a
# float32 block (entries below 3.4e38, b <= 64) times it stays finite in float64.
_PRODUCT_BOUND = 1e150


def _saturated_product(step, C: int) -> torch.Tensor:
    """Chunk products ``step(C-1) @ ... @ step(0)`` in float64, entries clamped to +-1e150.

    Used only when the accumulation-dtype products overflowed: a chunk that grows
    (say A = 1000 I) and then meets a zero carry or a reset would otherwise give
    inf * 0 = NaN where the step-by-step loop is exact. Clamped, a zero row or a zero
    carry still yields exact zeros; NaN entries stay NaN.
    """
    prod = step(0).double()
    for i in range(1, C):
        prod = torch.matmul(step(i).double(), prod).clamp_(-_PRODUCT_BOUND, _PRODUCT_BOUND)
    return prod


# Elements of A re-laid out per block by the stepwise loop: PyTorch runs copies up to
# its grain size (32768) on one thread; larger multi-threaded copies measured 10-40x
# slower on a busy 2-core machine, and smaller blocks add per-op overhead.
STEP_BLOCK_ELEMS = 32768


def _scan_stepwise(A: torch.Tensor, x: torch.Tensor, carry: torch.Tensor, out: torch.Tensor) -> None:
    """Sequential scan with one fused ``baddbmm`` per step, written into ``out``.

    Time is taken in blocks of K steps (K * B * G * b * b ~ STEP_BLOCK_ELEMS); each
    block of A and x is copied once into time-major, contiguous (K, B*G, b, b) /
    (K, B*G, b, 1) buffers, so that every step is a single batched ``x_t + A_t @ h``.

    Args:
        A: 5-D, broadcastable to (B, T', G, b, b); x: (B, T', G, b); carry: (B, G, b)
        the state before the first step; out: (B, T', G, b) view the states go to.
    """
    B, T, G, b = x.shape
    h = carry.reshape(B * G, b, 1).clone()
    step_block = max(1, STEP_BLOCK_ELEMS // max(1, B * G * b * b))
    for t0 in range(0, T, step_block):
        t1 = min(T, t0 + step_block)
        K = t1 - t0
        A_blk = _time_slice(A, t0, t1).expand(B, K, G, b, b).movedim(1, 0).reshape(K, B * G, b, b)
        x_blk = x[:, t0:t1].movedim(1, 0).reshape(K, B * G, b, 1)
        h_blk = torch.empty((K, B * G, b, 1), dtype=x.dtype, device=x.device)
        for i in range(K):
            h = torch.baddbmm(x_blk[i], A_blk[i], h, out=h_blk[i])
        out[:, t0:t1] = h_blk.view(K, B, G, b).movedim(0, 1)


def _auto_chunk_size(B: int, T: int, G: int, b: int) -> int:
    """Chooses C for ``_scan_dense``; C = T means "step through time" (no chunking).

    A rough CPU cost model, fitted on a 2-core machine (B=8, G=64, T=4096, b=1..4):
    stepping costs ~15 us per step (dispatch and re-layout) plus ~(20 + 2 b^2) ns per
    block and step; chunking runs ~3 sqrt(T) rounds of a few ops (~25 us each) but
    pays a b x b matrix product per block and step, ~(30 + 4 b^3) ns. So chunking
    wins only when the blocks are few (B*G small: stepping is all overhead).
    Chunking is also skipped when its per-step tensors would be large (beyond a few
    times PyTorch's parallel grain), where multi-threaded ops on a busy machine
    were measured up to 50x slower.
    """
    C = _chunk_size(T)
    n = T // C
    if n < 2:
        return max(T, 1)
    bg = B * G
    if bg * n * b * b > 8 * STEP_BLOCK_ELEMS:
        return max(T, 1)
    cost_step = T * (15e-6 + bg * (20 + 2 * b * b) * 1e-9)
    cost_chunk = (3 * C + n) * 25e-6 + T * bg * (30 + 4 * b ** 3) * 1e-9
    return C if cost_chunk < cost_step else max(T, 1)


def _scan_sequences(A, x, h0, cu_seqlens, reverse, chunk_size):
    """Dispatches dense or packed inputs to ``_scan_dense``, in either direction.

    A is 5-D (broadcast dimensions of size 1), x is (B, T, G, b), h0 is (N, G, b) or None.
    """
    if cu_seqlens is None:
        B, T, G, b = x.shape
        C = chunk_size or _auto_chunk_size(B, T, G, b)
        if reverse:
            A_rev = A.flip(1) if A.shape[1] > 1 else A
            return _scan_dense(A_rev, x.flip(1), h0, C).flip(1)
        return _scan_dense(A, x, h0, C)
    out = torch.empty_like(x)
    offsets = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        if e > s:
            init = None if h0 is None else h0[n : n + 1]
            out[:, s:e] = _scan_sequences(_time_slice(A, s, e), x[:, s:e], init, None, reverse, chunk_size)
    return out


def block_diagonal_scan_chunked(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor] = None, *,
                                cu_seqlens: Optional[torch.Tensor] = None, reverse: bool = False,
                                chunk_size: Optional[int] = None) -> torch.Tensor:
    """Chunked ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``; same arguments and result as the reference.

    Args:
        A: (B, T, G, b, b) or broadcastable to it, e.g. (G, b, b); real.
        x: (B, T, G, b) float32 | bfloat16 | float16 | float64.
        initial_state: (N, G, b) or None; cu_seqlens: (N + 1,) offsets with B = 1, or None.
        reverse: scan from T down to 1.  chunk_size: C; default: ~sqrt(T), or T (a plain
            step-by-step loop) where a cost model says that is faster (many or large blocks).

    Returns:
        h: (B, T, G, b) in x's dtype (accumulated in fp32, fp64 for fp64 inputs).
    """
    acc = accumulation_dtype(x.dtype)
    A5 = _as5d(A).to(acc)
    h0 = None if initial_state is None else initial_state.to(acc)
    h = _scan_sequences(A5, x.to(acc), h0, cu_seqlens, reverse, chunk_size)
    return h.to(x.dtype)


def shift_in_time(t: torch.Tensor, cu_seqlens: Optional[torch.Tensor], step: int,
                  fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Moves (B, T, ...) ``t`` by ``step`` = +-1 along time within each sequence.

    ``out[:, i] = t[:, i - step]``; the position that falls off a sequence's start
    (in the direction of travel) gets ``fill`` ((N, ...) per sequence), or zero.
    """
    out = torch.zeros_like(t)
    T = t.shape[1]
    spans = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    for n, (s, e) in enumerate(spans):
        if e <= s:
            continue
        if step > 0:
            out[:, s + 1 : e] = t[:, s : e - 1]
        else:
            out[:, s : e - 1] = t[:, s + 1 : e]
        if fill is not None:
            first = s if step > 0 else e - 1
            out[:, first] = fill if cu_seqlens is None else fill[n]
    return out


def grad_A_from(g: torch.Tensor, h_prev: torch.Tensor, A_shape: torch.Size) -> torch.Tensor:
    """``dL/dA_t = g_t h_{t-1}^T``, summed over the dimensions along which A was broadcast.

    Args:
        g: (B, T, G, b) dL/dx; h_prev: (B, T, G, b) the state each step multiplied;
        both in the accumulation dtype. A_shape: A's own (broadcastable) shape.

    Returns:
        grad_A with shape A_shape, in the accumulation dtype. The sum runs inside
        one einsum, so a time-invariant A never gets a (B, T, G, b, b) gradient.
    """
    full = tuple(g.shape[:3])
    lead = (1,) * (5 - len(A_shape)) + tuple(A_shape[:-2])
    lead = lead[-3:]
    keep = "".join(c for c, n_a, n_full in zip("btg", lead, full) if n_a == n_full)
    grad = torch.einsum(f"btgi,btgj->{keep}ij", g, h_prev)
    # Put back the size-1 dimensions that were summed, then A's own rank.
    shape5 = tuple(n if c in keep else 1 for c, n in zip("btg", full)) + tuple(A_shape[-2:])
    return grad.reshape(shape5).reshape(A_shape)


def block_diagonal_scan_chunked_backward(A: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                         initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                                         reverse: bool, chunk_size: Optional[int] = None
                                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block-diagonal scan, all in the accumulation dtype.

    For a forward-in-time scan, ``g_t = dL/dx_t = grad_h_t + A_{t+1}^T g_{t+1}``,
    ``dL/dA_t = g_t h_{t-1}^T`` and ``dL/dh_0 = A_1^T g_1``. Writing
    ``u_t = A_t^T g_t`` turns this into a scan with *unshifted* transposed blocks,
    ``u_t = A_t^T u_{t+1} + A_t^T grad_h_t`` (reverse time), after which
    ``g_t = grad_h_t + u_{t+1}`` and ``dL/dh_0 = u_1``; so A is never shifted or
    materialised at full size. A reverse scan mirrors every index.

    Args:
        A: broadcastable to (B, T, G, b, b); h: (B, T, G, b) forward output;
        grad_h: (B, T, G, b); initial_state: (N, G, b) or None; cu_seqlens, reverse as forward.

    Returns:
        (None, grad_x (B, T, G, b), grad_initial_state (N, G, b)). dL/dA = g_t h_{t-1}^T is formed
        by the op (``grad_A_from``), summed over A's broadcast dimensions, for every backend alike.
    """
    acc = accumulation_dtype(h.dtype)
    A5t = _as5d(A).to(acc).transpose(-1, -2)
    h = h.to(acc)
    grad_h = grad_h.to(acc)
    B, T, G, b = h.shape
    N = num_sequences(B, cu_seqlens)
    step = -1 if reverse else 1  # direction of the forward scan
    y = _matvec(A5t, grad_h)
    u = _scan_sequences(A5t, y, None, cu_seqlens, not reverse, chunk_size)
    g = grad_h + shift_in_time(u, cu_seqlens, -step, None)
    # dL/dh0 = u at the first forward step of each sequence (zero for empty sequences).
    grad_h0 = torch.zeros((N, G, b), dtype=acc, device=h.device)
    if T > 0:
        if cu_seqlens is None:
            grad_h0 = u[:, -1] if reverse else u[:, 0]
        else:
            offsets = cu_seqlens.tolist()
            for n, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
                if e > s:
                    grad_h0[n] = u[0, e - 1] if reverse else u[0, s]
    return None, g, grad_h0
