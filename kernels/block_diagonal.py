"""Triton kernels for the block-diagonal scan ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``.

One program owns BLOCK_G blocks g of one sequence and walks its time axis one
step at a time, holding the states h (BLOCK_G, BLOCK_B) in registers in fp32.
Each step loads the (BLOCK_G, BLOCK_B, BLOCK_B) tile of transitions and computes
the matrix-vector products as a broadcast multiply and a sum over the column
axis, so A is read exactly once, x once and h written once: the minimum traffic.
The loads of step t + 1 are issued before the arithmetic of step t (a one-step
software prefetch), so their latency overlaps the dependent chain through h.

Reverse scans walk time downwards. The backward pass is the same kernel with
``BACKWARD=True``: with ``g_t = dL/dx_t``, a forward-in-time scan has

    g_t = dL/dh_t + A_{t+1}^T g_{t+1},   dL/dA_t = g_t h_{t-1}^T,   dL/dh_0 = A_1^T g_1,

i.e. the scan in the opposite direction on the *next* step's *transposed* block.
Transposition is free (the launcher swaps the row and column strides), the
shift is an index offset, and when A is not broadcast the outer product
``dL/dA_t`` is written in the same sweep (``WRITE_DA``), so the backward reads
A, h and dL/dh once. A broadcast A (e.g. time-invariant (G, b, b)) gets its
gradient summed outside the kernel, without ever materialising (B, T, G, b, b).

Direction and packing (``reverse``, ``varlen``) are runtime flags: they only
change scalar index arithmetic, and keeping them out of the constexprs keeps the
number of compiled specialisations small (see ``aot_specs``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _both(mask, cond):
    """``mask & cond`` for a tile mask and a scalar condition, as a boolean tile.

    (The CPU interpreter widens ``&`` of a tile and a scalar to int, which loads reject.)
    """
    return (mask & cond) != 0


@triton.jit
def block_diagonal_scan_kernel(
    A_ptr,            # transitions, strides below (0 along broadcast dims); x's dtype
    x_ptr,            # forward: inputs x; backward: dL/dh.      (B, T, G, b) contiguous
    h0_ptr,           # initial states (N, G, b) contiguous (zeros when the caller gave none)
    out_ptr,          # forward: states h; backward: g = dL/dx.  (B, T, G, b) contiguous
    h_ptr,            # backward only: forward states h          (B, T, G, b) contiguous
    grad_A_ptr,       # backward + WRITE_DA: dL/dA, (B, T, G, b, b) contiguous, accumulation dtype
    grad_h0_ptr,      # backward only: dL/dh0 (N, G, b) contiguous, accumulation dtype
    cu_seqlens_ptr,   # (N + 1,) packed-sequence offsets, read when varlen != 0
    T, G, BS,         # time steps per batch row, blocks, block size b
    reverse, varlen,  # runtime flags (0 / 1)
    stride_ab, stride_at, stride_ag, stride_ai, stride_aj,  # A's strides; row/col swapped by the launcher
    BACKWARD: tl.constexpr, WRITE_DA: tl.constexpr, ACC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_g = tl.program_id(0)
    seq = tl.program_id(1)
    if varlen != 0:  # packed sequences share batch row 0
        batch = (seq * 0).to(tl.int64)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        batch = seq.to(tl.int64)
        start = batch * 0
        end = start + T
    length = end - start
    # The sweep walks time downwards for a reverse forward pass and for the
    # backward of a forward-in-time pass.
    backward_i = 1 if BACKWARD else 0
    scan_down = reverse != backward_i
    fwd_step = 1 - 2 * reverse  # time step of the forward recurrence

    blocks = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = tl.arange(0, BLOCK_B)
    g_ok = blocks < G
    r_ok = rows < BS
    vec_mask = g_ok[:, None] & r_ok[None, :]                        # (BLOCK_G, BLOCK_B)
    tile_mask = vec_mask[:, :, None] & r_ok[None, None, :]          # (BLOCK_G, BLOCK_B, BLOCK_B)
    vec_off = blocks.to(tl.int64)[:, None] * BS + rows[None, :]     # offset inside one time step
    a_off = (batch * stride_ab + blocks.to(tl.int64)[:, None, None] * stride_ag
             + rows[None, :, None] * stride_ai + rows[None, None, :] * stride_aj)
    step_elems = G.to(tl.int64) * BS                                # elements of x per time step
    row_base = batch * T                                            # global time index of t = 0

    # Initial carry: h0 (forward) or 0 (backward: nothing flows in past the end).
    h0 = tl.load(h0_ptr + seq.to(tl.int64) * step_elems + vec_off, mask=vec_mask, other=0.0).to(ACC)
    if BACKWARD:
        carry = tl.zeros((BLOCK_G, BLOCK_B), ACC)
    else:
        carry = h0

    # Prefetch the first step. The matrix of step t is A_t (forward) or A^T of the
    # forward step after t (backward; zero past the sequence end).
    t = tl.where(scan_down, end - 1, start)
    if BACKWARD:
        t_coef = t + fwd_step
    else:
        t_coef = t
    coef_ok = (t_coef >= start) & (t_coef < end)
    M_next = tl.load(A_ptr + a_off + t_coef * stride_at, mask=_both(tile_mask, coef_ok), other=0.0).to(ACC)
    x_next = tl.load(x_ptr + (row_base + t) * step_elems + vec_off, mask=_both(vec_mask, length > 0),
                     other=0.0).to(ACC)

    for step in range(0, length):
        M = M_next
        xv = x_next
        t = tl.where(scan_down, end - 1 - step, start + step)
        # Issue the next step's loads before this step's arithmetic.
        t_n = tl.where(scan_down, t - 1, t + 1)
        more = step + 1 < length
        if BACKWARD:
            t_coef = t_n + fwd_step
        else:
            t_coef = t_n
        coef_ok = more & (t_coef >= start) & (t_coef < end)
        M_next = tl.load(A_ptr + a_off + t_coef * stride_at, mask=_both(tile_mask, coef_ok), other=0.0).to(ACC)
        x_next = tl.load(x_ptr + (row_base + t_n) * step_elems + vec_off, mask=_both(vec_mask, more),
                         other=0.0).to(ACC)

        # h[g, i] <- sum_j M[g, i, j] h[g, j] + x[g, i]
        carry = tl.sum(M * carry[:, None, :], axis=2) + xv
        off = (row_base + t) * step_elems + vec_off
        tl.store(out_ptr + off, carry.to(out_ptr.dtype.element_ty), mask=vec_mask)

        if BACKWARD:
            if WRITE_DA:
                # dL/dA_t = g_t h_{t - fwd_step}^T, with h0 before the first forward step.
                t_prev = t - fwd_step
                prev_in = (t_prev >= start) & (t_prev < end)
                hp = tl.load(h_ptr + (row_base + t_prev) * step_elems + vec_off, mask=_both(vec_mask, prev_in),
                             other=0.0).to(ACC)
                hp = tl.where(prev_in, hp, h0)
                da_off = ((row_base + t) * step_elems + vec_off)[:, :, None] * BS + rows[None, None, :]
                tl.store(grad_A_ptr + da_off, carry[:, :, None] * hp[:, None, :], mask=tile_mask)

    if BACKWARD:
        # dL/dh0 = A_first^T g_first, "first" the first forward step (zero for empty sequences).
        t_first = tl.where(reverse != 0, end - 1, start)
        M_first = tl.load(A_ptr + a_off + t_first * stride_at, mask=_both(tile_mask, length > 0), other=0.0).to(ACC)
        grad_h0 = tl.sum(M_first * carry[:, None, :], axis=2)
        tl.store(grad_h0_ptr + seq.to(tl.int64) * step_elems + vec_off, grad_h0, mask=vec_mask)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _config(b: int, interpret: bool) -> dict:
    """Tile sizes for block size b.

    BLOCK_B is b rounded up to a power of two. On the GPU a program holds about
    256 transition entries per block group for small b (several blocks per
    program), and one block for b >= 16, with warps scaled to the tile. The
    interpreter prefers few, large programs (its cost is per operation).
    """
    BLOCK_B = triton.next_power_of_2(b)
    if interpret:
        return dict(BLOCK_B=BLOCK_B, BLOCK_G=max(1, 1024 // (BLOCK_B * BLOCK_B)), num_warps=1)
    tile = BLOCK_B * BLOCK_B
    BLOCK_G = max(1, 256 // tile)
    num_warps = 1 if tile * BLOCK_G <= 256 else (2 if tile <= 1024 else 4)
    return dict(BLOCK_B=BLOCK_B, BLOCK_G=BLOCK_G, num_warps=num_warps)


def _launch(A, x, h0, out, h, grad_A, grad_h0, cu_seqlens, reverse, backward):
    B, T, G, b = x.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if N == 0 or G == 0 or T == 0:
        return
    interpret = x.device.type != "cuda"
    cfg = _config(b, interpret)
    A5 = A.expand(B, T, G, b, b)  # stride 0 along broadcast dimensions, nothing copied
    s_b, s_t, s_g, s_i, s_j = A5.stride()
    if backward:  # the backward recurrence multiplies by A^T
        s_i, s_j = s_j, s_i
    BLOCK_G = min(cfg["BLOCK_G"], triton.next_power_of_2(G))
    grid = (triton.cdiv(G, BLOCK_G), N)
    dummy = out  # stands in for pointers a launch does not use
    block_diagonal_scan_kernel[grid](
        A5, x, h0, out,
        h if h is not None else dummy,
        grad_A if grad_A is not None else dummy,
        grad_h0 if grad_h0 is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        T, G, b, int(reverse), int(cu_seqlens is not None),
        s_b, s_t, s_g, s_i, s_j,
        BACKWARD=backward, WRITE_DA=grad_A is not None, ACC=_tl_acc(x.dtype),
        BLOCK_G=BLOCK_G, BLOCK_B=cfg["BLOCK_B"], num_warps=cfg["num_warps"],
    )


def _storage(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], N: int):
    """A in x's dtype (strides kept), and h0 as a contiguous (N, G, b) tensor in x's dtype (zeros if None)."""
    A = A if A.dtype == x.dtype else A.to(x.dtype)
    _, _, G, b = x.shape
    if initial_state is None:
        h0 = torch.zeros((N, G, b), dtype=x.dtype, device=x.device)
    else:
        h0 = initial_state.to(x.dtype).contiguous()
    return A, h0


def block_diagonal_scan_forward(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor],
                                cu_seqlens: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """States of ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``.

    Args:
        A: broadcastable to (B, T, G, b, b), real (strides kept: broadcasting is free).
        x: (B, T, G, b) float32 | bfloat16 | float16 | float64.
        initial_state: (N, G, b) or None. cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.

    Returns:
        h: (B, T, G, b) in x's dtype.
    """
    x = x.contiguous()
    N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    A, h0 = _storage(A, x, initial_state, N)
    out = torch.empty_like(x)
    _launch(A, x, h0, out, None, None, None, cu_seqlens, reverse, backward=False)
    return out


def block_diagonal_scan_backward(A: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                 initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                                 reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block-diagonal scan in one sweep.

    Args:
        A: as forward; h: (B, T, G, b) forward states; grad_h: (B, T, G, b) dL/dh (any strides);
        initial_state: (N, G, b) or None.

    Returns:
        grad_A: A's shape, in the accumulation dtype (fp32; fp64 for fp64),
        grad_x: (B, T, G, b) in h's dtype, grad_initial_state: (N, G, b) in the accumulation dtype.
    """
    from linrec.block_diagonal.chunked import grad_A_from, shift_in_time

    B, T, G, b = h.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h = h.contiguous()
    grad_h = grad_h.to(h.dtype).contiguous()
    A_store, h0 = _storage(A, h, initial_state, N)
    grad_x = torch.empty_like(h)
    grad_h0 = torch.zeros((N, G, b), dtype=acc, device=h.device)
    full_A = tuple(A.shape) == (B, T, G, b, b)
    grad_A = torch.empty((B, T, G, b, b), dtype=acc, device=h.device) if full_A else None
    _launch(A_store, grad_h, h0, grad_x, h, grad_A, grad_h0, cu_seqlens, reverse, backward=True)
    if grad_A is None:
        # Broadcast A: dL/dA summed over the broadcast dimensions by one einsum.
        step = -1 if reverse else 1
        h_prev = shift_in_time(h.to(acc), cu_seqlens, step, h0.to(acc))
        grad_A = grad_A_from(grad_x.to(acc), h_prev, A.shape)
    return grad_A, grad_x, grad_h0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for every launch the GPU launcher makes."""
    for elem in ("fp32", "bf16", "fp16"):
        for b in (1, 2, 4, 8, 16, 32, 64):
            cfg = _config(b, interpret=False)
            for backward, write_da in ((False, False), (True, False), (True, True)):
                sig = {
                    "A_ptr": f"*{elem}", "x_ptr": f"*{elem}", "h0_ptr": f"*{elem}", "out_ptr": f"*{elem}",
                    "h_ptr": f"*{elem}", "grad_A_ptr": "*fp32" if write_da else f"*{elem}",
                    "grad_h0_ptr": "*fp32" if backward else f"*{elem}", "cu_seqlens_ptr": "*i32",
                    "T": "i32", "G": "i32", "BS": "i32", "reverse": "i32", "varlen": "i32",
                    "stride_ab": "i64", "stride_at": "i64", "stride_ag": "i64", "stride_ai": "i64",
                    "stride_aj": "i64",
                }
                constexprs = dict(BACKWARD=backward, WRITE_DA=write_da, ACC=tl.float32,
                                  BLOCK_G=cfg["BLOCK_G"], BLOCK_B=cfg["BLOCK_B"])
                yield block_diagonal_scan_kernel, sig, constexprs, cfg["num_warps"]
