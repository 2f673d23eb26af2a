"""Triton kernels for the block-diagonal scan ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``.

One program owns BLOCK_G blocks g of one sequence and walks time one step at a
time, holding the states h (BLOCK_G, BLOCK_B) in registers in fp32. Each step
loads the (BLOCK_G, BLOCK_B, BLOCK_B) tile of transitions and computes the
matrix-vector products as a broadcast multiply and a sum over the column axis.
The loads of steps t + 1 and t + 2 are issued before the arithmetic of step t (a
two-step software prefetch), so their latency overlaps the dependent chain through h.

Two launch shapes:

* sequential (many sequences x block groups): one sweep per program over the
  whole sequence; A and x are read exactly once and h written once.
* chunked (few programs, long T): the sweep is cut into chunks of C steps and
  run in three launches: (pass 1) every chunk from a zero state, keeping its end
  state ``s_k`` and the product ``P_k`` of its matrices (a broadcast product for
  b < 16, ``tl.dot`` for b >= 16); (carry kernel) ``c_{k+1} = P_k c_k + s_k``
  sequentially over the chunks; (pass 0) every chunk again from its carry. This
  reads A twice but exposes n_chunks times more parallelism.

Reverse scans walk time downwards. The backward pass runs the same kernel with
``backward=1``: with ``g_t = dL/dx_t``, a forward-in-time scan has

    g_t = dL/dh_t + A_{t+1}^T g_{t+1},   dL/dA_t = g_t h_{t-1}^T,   dL/dh_0 = A_1^T g_1,

i.e. the scan in the opposite direction on the *next* step's *transposed* block.
Transposition is free (the launcher swaps the row and column strides), the
shift is an index offset, and when A is not broadcast the outer product
``dL/dA_t`` is written in the same sweep (``write_da``), so the backward reads
A, h and dL/dh once. A broadcast A (e.g. time-invariant (G, b, b)) gets its
gradient summed outside the kernel, without materialising (B, T, G, b, b).

Direction, packing, backward and chunking are runtime flags: they only change
scalar index arithmetic and uniform branches, and keeping them out of the
constexprs keeps the compiled specialisations to one per (dtype, block size,
pass) (see ``aot_specs``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from linrec._common import accumulation_dtype, num_sequences

from . import config_override, device_model, tl_accumulation_dtype


@triton.jit
def _both(mask, cond):
    """``mask & cond`` for a tile mask and a scalar condition, as a boolean tile.

    (The CPU interpreter widens ``&`` of a tile and a scalar to int, which loads reject.)
    """
    return (mask & cond) != 0


@triton.jit
def _step_time(step, start, end, scan_down):
    """Time index of sweep step ``step``: upwards from ``start`` or downwards from ``end - 1``."""
    return tl.where(scan_down, end - 1 - step, start + step)


@triton.jit
def _load_step(A_ptr, x_ptr, a_off, vec_off, tile_mask, vec_mask, step, step_hi, start, end, scan_down,
               coef_shift, stride_at, row_base, step_elems):
    """Loads sweep step ``step``'s matrix tile and input tile, in storage dtype (zeros past ``step_hi``).

    The matrix of the step at time t is A_t (forward) or A^T of the forward step after t
    (backward, ``coef_shift`` = +-1; zero past the sequence end).
    """
    t = _step_time(step, start, end, scan_down)
    live = step < step_hi
    t_coef = t + coef_shift
    coef_ok = live & (t_coef >= start) & (t_coef < end)
    M = tl.load(A_ptr + a_off + t_coef * stride_at, mask=_both(tile_mask, coef_ok), other=0.0)
    xv = tl.load(x_ptr + (row_base + t) * step_elems + vec_off, mask=_both(vec_mask, live), other=0.0)
    return M, xv


@triton.jit
def block_diagonal_scan_kernel(
    A_ptr,            # transitions, strides below (0 along broadcast dims); x's dtype
    x_ptr,            # forward: inputs x; backward: dL/dh.      (B, T, G, b) contiguous
    h0_ptr,           # initial states (N, G, b) contiguous (zeros when the caller gave none)
    out_ptr,          # forward: states h; backward: g = dL/dx.  (B, T, G, b) contiguous
    h_ptr,            # backward only: forward states h          (B, T, G, b) contiguous
    grad_A_ptr,       # backward + write_da: dL/dA, (B, T, G, b, b) contiguous, accumulation dtype
    grad_h0_ptr,      # backward only: dL/dh0 (N, G, b) contiguous, accumulation dtype
    cu_seqlens_ptr,   # (N + 1,) packed-sequence offsets, read when varlen != 0
    carry_ptr,        # chunked: (N, n_chunks, G, b) accumulation dtype; pass 0 reads each chunk's carry-in,
                      # pass 1 writes each chunk's local end state
    prod_ptr,         # chunked pass 1: (N, n_chunks, G, b, b) accumulation dtype, each chunk's matrix product
    T, G, BS,         # time steps per batch row, blocks, block size b
    reverse, varlen, backward, write_da, chunked,  # runtime flags (0 / 1); write_da needs backward
    chunk_len,        # chunked: sweep steps per chunk
    stride_ab, stride_at, stride_ag, stride_ai, stride_aj,  # A's strides; row/col swapped by the launcher
    PASS: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, USE_DOT: tl.constexpr,
):
    """One program: BLOCK_G blocks of one sequence, over the whole sweep or (chunked) one chunk of it.

    PASS 0 runs the recurrence and writes the states (and in the backward dL/dA, dL/dh0).
    PASS 1 (chunked only) runs its chunk from a zero state and writes the chunk's end
    state and the product of its matrices, for ``block_diagonal_carry_kernel``.
    The flags are runtime values (uniform branches), so that one compiled kernel
    per (dtype, block size, pass) serves every call.
    """
    # Grid: (block groups x sequences, chunks); sequences on axis 0 have no 65535 limit.
    n_groups = tl.cdiv(G, BLOCK_G)
    pid_g = tl.program_id(0) % n_groups
    seq = tl.program_id(0) // n_groups
    chunk = tl.program_id(1)
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
    scan_down = reverse != backward
    fwd_step = 1 - 2 * reverse  # time step of the forward recurrence
    # The matrix of sweep step t is A_t (forward) or A^T of the forward step after t
    # (backward; zero past the sequence end): its time index is t + coef_shift.
    coef_shift = fwd_step * backward
    # Sweep steps [step_lo, step_hi) of this program (one chunk, or all of them).
    step_lo = tl.minimum(chunk.to(tl.int64) * chunk_len, length)
    step_hi = tl.minimum(step_lo + chunk_len, length)

    blocks = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = tl.arange(0, BLOCK_B)
    g_ok = blocks < G
    r_ok = rows < BS
    vec_mask = g_ok[:, None] & r_ok[None, :]                        # (BLOCK_G, BLOCK_B)
    tile_mask = vec_mask[:, :, None] & r_ok[None, None, :]          # (BLOCK_G, BLOCK_B, BLOCK_B)
    vec_off = blocks.to(tl.int64)[:, None] * BS + rows[None, :]     # offset inside one time step
    tile_off = vec_off[:, :, None] * BS + rows[None, None, :]       # offset of a contiguous b x b tile
    a_off = (batch * stride_ab + blocks.to(tl.int64)[:, None, None] * stride_ag
             + rows[None, :, None] * stride_ai + rows[None, None, :] * stride_aj)
    step_elems = G.to(tl.int64) * BS                                # elements of x per time step
    row_base = batch * T                                            # global time index of t = 0
    chunk_row = seq.to(tl.int64) * tl.num_programs(1) + chunk       # (sequence, chunk) row of carry/prod

    # Carry into the first step: h0 (forward), 0 (backward: nothing flows in past the
    # end), the carry computed for this chunk (chunked pass 0), or 0 (pass 1: local state).
    h0 = tl.load(h0_ptr + seq.to(tl.int64) * step_elems + vec_off, mask=vec_mask, other=0.0).to(ACC)
    if PASS == 0:
        chunk_carry = tl.load(carry_ptr + chunk_row * step_elems + vec_off, mask=_both(vec_mask, chunked != 0),
                              other=0.0).to(ACC)
        carry = tl.where(chunked != 0, chunk_carry, tl.where(backward != 0, 0.0, h0))
    else:
        carry = tl.zeros((BLOCK_G, BLOCK_B), ACC)
    if PASS == 1:  # running product of the chunk's matrices, from the identity
        eye = (rows[:, None] == rows[None, :]).to(ACC)
        if USE_DOT:  # one block per program: a 2-D tile for tl.dot
            prod = eye
        else:
            prod = tl.zeros((BLOCK_G, BLOCK_B, BLOCK_B), ACC) + eye[None, :, :]

    # Software prefetch, two steps deep: the loads of steps s + 1 and s + 2 are in
    # flight while step s computes. Prefetched tiles stay in the storage dtype and are
    # converted only when used, so the conversion does not wait on a fresh load.
    M_1, x_1 = _load_step(A_ptr, x_ptr, a_off, vec_off, tile_mask, vec_mask, step_lo, step_hi, start, end,
                          scan_down, coef_shift, stride_at, row_base, step_elems)
    M_2, x_2 = _load_step(A_ptr, x_ptr, a_off, vec_off, tile_mask, vec_mask, step_lo + 1, step_hi, start, end,
                          scan_down, coef_shift, stride_at, row_base, step_elems)

    for step in range(step_lo, step_hi):
        M_raw, x_raw = M_1, x_1
        M_1, x_1 = M_2, x_2
        M_2, x_2 = _load_step(A_ptr, x_ptr, a_off, vec_off, tile_mask, vec_mask, step + 2, step_hi, start, end,
                              scan_down, coef_shift, stride_at, row_base, step_elems)
        M = M_raw.to(ACC)
        xv = x_raw.to(ACC)
        t = _step_time(step, start, end, scan_down)

        # h[g, i] <- sum_j M[g, i, j] h[g, j] + x[g, i]
        carry = tl.sum(M * carry[:, None, :], axis=2) + xv
        if PASS == 1:
            # prod <- M @ prod: tensor cores for b >= 16, a broadcast product below.
            if USE_DOT:
                # fp32: three TF32 tensor-core products (3xTF32) keep fp32 accuracy.
                if ACC == tl.float64:
                    prod = tl.dot(tl.reshape(M, (BLOCK_B, BLOCK_B)), prod, input_precision="ieee")
                else:
                    prod = tl.dot(tl.reshape(M, (BLOCK_B, BLOCK_B)), prod, input_precision="tf32x3")
            else:
                prod = tl.sum(M[:, :, :, None] * prod[:, None, :, :], axis=2)
        else:
            off = (row_base + t) * step_elems + vec_off
            tl.store(out_ptr + off, carry.to(out_ptr.dtype.element_ty), mask=vec_mask)
            if write_da != 0:
                # dL/dA_t = g_t h_{t - fwd_step}^T, with h0 before the first forward step.
                t_prev = t - fwd_step
                prev_in = (t_prev >= start) & (t_prev < end)
                hp = tl.load(h_ptr + (row_base + t_prev) * step_elems + vec_off,
                             mask=_both(vec_mask, prev_in), other=0.0).to(ACC)
                hp = tl.where(prev_in, hp, h0)
                da_off = (row_base + t) * step_elems * BS + tile_off
                tl.store(grad_A_ptr + da_off, carry[:, :, None] * hp[:, None, :], mask=tile_mask)

    if PASS == 1:
        tl.store(carry_ptr + chunk_row * step_elems + vec_off, carry, mask=vec_mask)
        if USE_DOT:
            prod3 = tl.reshape(prod, (1, BLOCK_B, BLOCK_B))
        else:
            prod3 = prod
        tl.store(prod_ptr + chunk_row * step_elems * BS + tile_off, prod3, mask=tile_mask)
    elif backward != 0:
        # dL/dh0 = A_first^T g_first, "first" the first forward step (zero for empty sequences),
        # written by the program whose sweep ends there.
        last_chunk = tl.maximum((length + chunk_len - 1) // chunk_len - 1, 0)
        is_last = chunk == last_chunk
        t_first = tl.where(reverse != 0, end - 1, start)
        M_first = tl.load(A_ptr + a_off + t_first * stride_at, mask=_both(tile_mask, length > 0),
                          other=0.0).to(ACC)
        grad_h0 = tl.sum(M_first * carry[:, None, :], axis=2)
        tl.store(grad_h0_ptr + seq.to(tl.int64) * step_elems + vec_off, grad_h0, mask=_both(vec_mask, is_last))


@triton.jit
def block_diagonal_carry_kernel(
    carry_ptr,        # in: (N, n_chunks, G, b) chunk end states from zero; out: each chunk's carry-in (in place)
    prod_ptr,         # (N, n_chunks, G, b, b) each chunk's matrix product
    h0_ptr,           # (N, G, b) the carry into chunk 0 (zeros for the backward)
    n_chunks, G, BS,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Carries across chunks, sequentially: ``c_0 = h0``, ``c_{k+1} = P_k c_k + s_k``.

    Overwrites each chunk's local end state ``s_k`` with its carry-in ``c_k``.
    """
    n_groups = tl.cdiv(G, BLOCK_G)
    pid_g = tl.program_id(0) % n_groups
    seq = tl.program_id(0) // n_groups
    blocks = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = tl.arange(0, BLOCK_B)
    vec_mask = (blocks < G)[:, None] & (rows < BS)[None, :]
    tile_mask = vec_mask[:, :, None] & (rows < BS)[None, None, :]
    vec_off = blocks.to(tl.int64)[:, None] * BS + rows[None, :]
    tile_off = vec_off[:, :, None] * BS + rows[None, None, :]
    step_elems = G.to(tl.int64) * BS
    c = tl.load(h0_ptr + seq.to(tl.int64) * step_elems + vec_off, mask=vec_mask, other=0.0).to(ACC)
    base = seq.to(tl.int64) * n_chunks
    # (s_k, P_k) do not depend on the carry: keep the next chunk's loads in flight.
    s_next = tl.load(carry_ptr + base * step_elems + vec_off, mask=_both(vec_mask, n_chunks > 0), other=0.0)
    P_next = tl.load(prod_ptr + base * step_elems * BS + tile_off, mask=_both(tile_mask, n_chunks > 0), other=0.0)
    for k in range(0, n_chunks):
        s = s_next
        P = P_next
        row = base + k
        more = k + 1 < n_chunks
        s_next = tl.load(carry_ptr + (row + 1) * step_elems + vec_off, mask=_both(vec_mask, more), other=0.0)
        P_next = tl.load(prod_ptr + (row + 1) * step_elems * BS + tile_off, mask=_both(tile_mask, more), other=0.0)
        tl.store(carry_ptr + row * step_elems + vec_off, c, mask=vec_mask)
        c = tl.sum(P * c[:, None, :], axis=2) + s


def _config(b: int, interpret: bool) -> dict:
    """Tile sizes for block size b.

    BLOCK_B is b rounded up to a power of two. On the GPU a program holds about
    256 transition entries for small b (several blocks per program), and one
    block for b >= 16 (whose chunk products then use tl.dot), with warps scaled
    to the tile (1 warp up to b = 16, 4 at b = 32, 8 at b = 64). The interpreter prefers few, large programs (its cost is per operation).
    """
    BLOCK_B = triton.next_power_of_2(b)
    tile = BLOCK_B * BLOCK_B
    use_dot = BLOCK_B >= 16
    if interpret:
        cfg = dict(BLOCK_B=BLOCK_B, BLOCK_G=1 if use_dot else max(1, 1024 // tile), num_warps=1, USE_DOT=use_dot)
    else:
        BLOCK_G = 1 if use_dot else max(1, 256 // tile)
        # ~8 tile elements per thread: with the two-step prefetch (three tiles live) and
        # 64-bit offsets, more per thread spills at b = 64 (checked with ptxas -v for sm_90a).
        num_warps = min(8, max(1, tile * BLOCK_G // 256))
        cfg = dict(BLOCK_B=BLOCK_B, BLOCK_G=BLOCK_G, num_warps=num_warps, USE_DOT=use_dot)
    return config_override("block_diagonal", cfg, ("BLOCK_G", "num_warps"))


# Chunking (time-parallelism) on the GPU: when fewer than MIN_PROGRAMS (sequence,
# block group) programs exist, time is cut into chunks so that about
# TARGET_PROGRAMS programs run; chunks are at least MIN_CHUNK steps.
MIN_PROGRAMS = 1024
TARGET_PROGRAMS = 4096
MIN_CHUNK = 64


def _auto_chunk_len(programs: int, max_len: int, interpret: bool) -> int:
    """Chunk length for the time-parallel path, or 0 for one sequential sweep per program."""
    if interpret or programs >= MIN_PROGRAMS or max_len < 2 * MIN_CHUNK:
        return 0
    n_wanted = triton.cdiv(TARGET_PROGRAMS, programs)
    return max(MIN_CHUNK, triton.cdiv(max_len, n_wanted))


def _launch(A, x, h0, out, h, grad_A, grad_h0, cu_seqlens, reverse, backward, chunk_len=None):
    """Runs the forward (backward=False) or backward sweep; see the kernel for the arguments.

    ``chunk_len``: None picks automatically; 0 forces one sequential sweep per program;
    C > 0 forces the chunked path (chunk products, carries, then the chunks again from their carries).
    """
    B, T, G, b = x.shape
    N = num_sequences(B, cu_seqlens)
    if N == 0 or G == 0 or T == 0:
        return
    # The interpreter's own plan unless a GPU is planned for (the CUDA device or LINREC_DEVICE_MODEL).
    interpret = device_model(x.device) is None
    cfg = _config(b, interpret)
    acc = accumulation_dtype(x.dtype)
    A5 = A.expand(B, T, G, b, b)  # stride 0 along broadcast dimensions, nothing copied
    s_b, s_t, s_g, s_i, s_j = A5.stride()
    if backward:  # the backward recurrence multiplies by A^T
        s_i, s_j = s_j, s_i
    BLOCK_G = min(cfg["BLOCK_G"], triton.next_power_of_2(G))
    n_groups = triton.cdiv(G, BLOCK_G)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)  # T < 2**31; one pointer type for every launch
    max_len = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    if chunk_len is None:
        chunk_len = _auto_chunk_len(n_groups * N, max_len, interpret)
    n_chunks = triton.cdiv(max_len, chunk_len) if chunk_len > 0 else 1
    chunked = n_chunks > 1
    # Unused pointers get dummies of the dtype the kernel is compiled for (see aot_specs).
    dummy, acc_dummy = out, torch.empty(1, dtype=acc, device=x.device)
    cu_dummy = torch.zeros(2, dtype=torch.int32, device=x.device)
    if chunked:
        carry = torch.empty((N, n_chunks, G, b), dtype=acc, device=x.device)
        prod = torch.empty((N, n_chunks, G, b, b), dtype=acc, device=x.device)
    else:
        carry = prod = acc_dummy
        chunk_len = max(max_len, 1)

    def sweep(pass_):
        block_diagonal_scan_kernel[(n_groups * N, n_chunks)](
            A5, x, h0, out,
            h if h is not None else dummy,
            grad_A if grad_A is not None else acc_dummy,
            grad_h0 if grad_h0 is not None else acc_dummy,
            cu_seqlens if cu_seqlens is not None else cu_dummy,
            carry, prod,
            T, G, b, int(reverse), int(cu_seqlens is not None), int(backward),
            int(grad_A is not None and pass_ == 0), int(chunked), chunk_len,
            s_b, s_t, s_g, s_i, s_j,
            PASS=pass_, ACC=tl_accumulation_dtype(x.dtype), BLOCK_G=BLOCK_G, BLOCK_B=cfg["BLOCK_B"], USE_DOT=cfg["USE_DOT"],
            num_warps=cfg["num_warps"],
        )

    if chunked:
        sweep(1)  # every chunk from zero: end states and matrix products
        carry_in = torch.zeros_like(h0) if backward else h0
        block_diagonal_carry_kernel[(n_groups * N,)](
            carry, prod, carry_in, n_chunks, G, b,
            ACC=tl_accumulation_dtype(x.dtype), BLOCK_G=BLOCK_G, BLOCK_B=cfg["BLOCK_B"], num_warps=cfg["num_warps"],
        )
    sweep(0)


def _storage(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], N: int):
    """A in x's dtype (strides kept), and h0 as a contiguous (N, G, b) tensor in x's dtype (zeros if None)."""
    A = A if A.dtype == x.dtype else A.to(x.dtype)
    _, _, G, b = x.shape
    if initial_state is None:
        h0 = torch.zeros((N, G, b), dtype=x.dtype, device=x.device)
    else:
        h0 = initial_state.to(x.dtype).contiguous()
    return A, h0


def block_diagonal_scan_forward(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                                cu_seqlens: Optional[torch.Tensor], reverse: bool,
                                chunk_len: Optional[int] = None) -> torch.Tensor:
    """States of ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``.

    Args:
        A: broadcastable to (B, T, G, b, b), real (strides kept: broadcasting is free).
        x: (B, T, G, b) float32 | bfloat16 | float16 | float64.
        initial_state: (N, G, b) or None. cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.
        chunk_len: None (automatic), 0 (sequential sweeps) or C > 0 (time-parallel chunks of C steps).

    Returns:
        h: (B, T, G, b) in x's dtype.
    """
    x = x.contiguous()
    N = num_sequences(x.shape[0], cu_seqlens)
    A, h0 = _storage(A, x, initial_state, N)
    out = torch.empty_like(x)
    _launch(A, x, h0, out, None, None, None, cu_seqlens, reverse, backward=False, chunk_len=chunk_len)
    return out


def block_diagonal_scan_backward(A: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                 initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                                 reverse: bool, chunk_len: Optional[int] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block-diagonal scan in one sweep.

    Args:
        A: as forward; h: (B, T, G, b) forward states; grad_h: (B, T, G, b) dL/dh (any strides);
        initial_state: (N, G, b) or None; chunk_len: as in the forward.

    Returns:
        grad_A: (B, T, G, b, b) in the accumulation dtype (fp32; fp64 for fp64) when A is full-size,
        None when A is broadcast (the op forms that gradient),
        grad_x: (B, T, G, b) in h's dtype, grad_initial_state: (N, G, b) in the accumulation dtype.
    """
    B, T, G, b = h.shape
    N = num_sequences(B, cu_seqlens)
    acc = accumulation_dtype(h.dtype)
    h = h.contiguous()
    grad_h = grad_h.to(h.dtype).contiguous()
    A_store, h0 = _storage(A, h, initial_state, N)
    grad_x = torch.empty_like(h)
    grad_h0 = torch.zeros((N, G, b), dtype=acc, device=h.device)
    full_A = tuple(A.shape) == (B, T, G, b, b)
    grad_A = torch.empty((B, T, G, b, b), dtype=acc, device=h.device) if full_A else None
    _launch(A_store, grad_h, h0, grad_x, h, grad_A, grad_h0, cu_seqlens, reverse, backward=True,
            chunk_len=chunk_len)
    # A broadcast A gets None: the op sums dL/dA over the broadcast dimensions by one einsum.
    return grad_A, grad_x, grad_h0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for every launch the GPU launcher makes.

    Per storage dtype and block size: the scan kernel's pass 0 (sequential sweeps and
    the chunked fix-up, forward and backward) and pass 1 (chunk products), and the
    carry kernel. Every flag is a runtime argument, so these cover every call.
    """
    for elem in ("fp32", "bf16", "fp16"):
        for b in (1, 2, 4, 8, 16, 32, 64):
            cfg = _config(b, interpret=False)
            for pass_ in (0, 1):
                sig = {
                    "A_ptr": f"*{elem}", "x_ptr": f"*{elem}", "h0_ptr": f"*{elem}", "out_ptr": f"*{elem}",
                    "h_ptr": f"*{elem}", "grad_A_ptr": "*fp32", "grad_h0_ptr": "*fp32", "cu_seqlens_ptr": "*i32",
                    "carry_ptr": "*fp32", "prod_ptr": "*fp32",
                    "T": "i32", "G": "i32", "BS": "i32", "reverse": "i32", "varlen": "i32", "backward": "i32",
                    "write_da": "i32", "chunked": "i32", "chunk_len": "i32",
                    "stride_ab": "i64", "stride_at": "i64", "stride_ag": "i64", "stride_ai": "i64",
                    "stride_aj": "i64",
                }
                constexprs = dict(PASS=pass_, ACC=tl.float32, BLOCK_G=cfg["BLOCK_G"], BLOCK_B=cfg["BLOCK_B"],
                                  USE_DOT=cfg["USE_DOT"])
                yield block_diagonal_scan_kernel, sig, constexprs, cfg["num_warps"]
            sig = {"carry_ptr": "*fp32", "prod_ptr": "*fp32", "h0_ptr": f"*{elem}", "n_chunks": "i32", "G": "i32",
                   "BS": "i32"}
            constexprs = dict(ACC=tl.float32, BLOCK_G=cfg["BLOCK_G"], BLOCK_B=cfg["BLOCK_B"])
            yield block_diagonal_carry_kernel, sig, constexprs, cfg["num_warps"]
