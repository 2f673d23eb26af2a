"""Triton kernels for the block-diagonal scan ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``, in one launch.

One program owns BLOCK_G blocks g of one sequence and walks time one step at a time, holding the
states h (BLOCK_G, BLOCK_B) in registers in fp32. Each step loads the (BLOCK_G, BLOCK_B, BLOCK_B)
tile of transitions and computes the matrix-vector products as a broadcast multiply and a sum over
the column axis. The loads of steps s + 1 and s + 2 are issued before the arithmetic of step s (a
two-step software prefetch; one step at b = 64, ``PREFETCH``), so their latency overlaps the
dependent chain through h. The block
size is a constexpr (``BS``; 0 means "b is not a power of two, read it from ``block_size``"), so
for b = 1, 2, 4, 8, 16, ... the tile offsets are compile-time constants and the loads vectorise.

Two ways to get the state entering a program's share of the sweep, in the same single launch:

* **walk** (``lookback = 0``): one program per (sequence, block group) walks its whole sequence;
  used when there are enough such programs to fill the GPU (>= 4 per SM), and always at b > 16,
  where the kernel is compiled without the look-back code (``LOOKBACK``, see ``_config``).
* **decoupled look-back** (``lookback = 1``): each sequence is cut into chunks of ``chunk_len``
  steps, one program per (chunk, sequence, block group). A program takes a ticket from an atomic
  counter and owns the chunk the ticket names; tickets are chunk-major, so every predecessor of a
  chunk (the earlier chunks of its sequence and block group) holds a lower ticket. A chunk's
  summary is the affine map ``h -> P h + s`` of its steps: ``P`` the b x b product of its
  transitions (saturated, see ``_saturate``) and ``s`` its end state from a zero start.

  - *Fast path*: if the predecessor's inclusive state (the true state at its end) is already
    published, the program reads it and walks its chunk once.
  - *Otherwise* the program walks its chunk once for ``(P, s)`` (walk 1), publishes them with a
    flag (value 1), and looks back: each published inclusive state ends the look-back; each
    published aggregate is composed into the running map and the look-back moves one chunk
    further; an unpublished flag is re-read. It then walks the chunk again from the entering state
    (walk 2), writing h. Walk 2 re-reads the chunk's A and x, which walk 1 of the same program has
    just brought into L2 (about chunk_len x 1 KB per program): DRAM sees one pass, L2 two.

  Every program but the last chunk's then publishes its inclusive state (flag value 2).
  **No deadlock**: a program waits only on lower tickets, and a ticket is taken only by a program
  already running, so the lowest unfinished ticket waits on nothing unfinished. **Memory
  ordering**: payload stores, ``tl.debug_barrier()`` (every thread's stores happen before the flag
  write), then a *release* exchange of the flag; readers take the flag with an *acquire* atomic
  and read the payload with ``.cg`` loads (L2, never a stale L1 line). Varlen sequences are cut
  into chunks each on its own (a chunk never crosses a sequence start); chunks past a sequence's
  end do nothing. Under the interpreter programs run one at a time in ticket order, so every
  predecessor has finished and the fast path always runs; ``force_aggregates = 1`` (tests) turns
  the fast path off and makes every look-back compose aggregates back to chunk 0.

Reverse scans walk time downwards. The backward pass runs the same kernel with ``BACKWARD``: with
``g_t = dL/dx_t``, a forward-in-time scan has

    g_t = dL/dh_t + A_{t+1}^T g_{t+1},   dL/dA_t = g_t h_{t-1}^T,   dL/dh_0 = A_1^T g_1,

i.e. the scan in the opposite direction on the *next* step's *transposed* block: the tile is
loaded as stored and the products contract over its row axis instead of its column axis. When A
is full-size (``A_CONTIG``: contiguous (B, T, G, b, b)) the outer product ``dL/dA_t`` is written in
walk 2 in A's dtype, so the backward reads A, h and dL/dh once; a broadcast A (e.g. time-invariant
(G, b, b), any strides with a contiguous b x b block) gets its gradient summed by the op, without
materialising (B, T, G, b, b).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from linrec._common import accumulation_dtype, num_sequences

from . import config_override, device_model, tl_accumulation_dtype
from ._shared import chunk_flag, lookback_ticket, read_flag, set_flag
from ._shared import saturate as _saturate


@triton.jit
def _both(mask, cond):
    """``mask & cond`` for a tile mask and a scalar condition, as a boolean tile.

    (The CPU interpreter widens ``&`` of a tile and a scalar to int, which loads reject.)
    """
    return (mask & cond) != 0


@triton.jit
def _matvec(M, v, TRANS: tl.constexpr):
    """``M v`` (``M^T v`` with TRANS) per block: M (BLOCK_G, BLOCK_B, BLOCK_B), v (BLOCK_G, BLOCK_B)."""
    if TRANS:
        return tl.sum(M * v[:, :, None], axis=1)
    else:
        return tl.sum(M * v[:, None, :], axis=2)


@triton.jit
def _matmat(M, P, TRANS: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """``M P`` (``M^T P`` with TRANS) per block, saturated: M (BLOCK_G, BLOCK_B, BLOCK_B) in ACC.

    USE_DOT (one block per program, b >= 16): P and the result are 2-D (BLOCK_B, BLOCK_B) tiles
    for tensor cores, three TF32 products (3xTF32) for fp32 accuracy; below that P and the result
    are (BLOCK_G, BLOCK_B, BLOCK_B), a broadcast multiply and a sum over the contracted axis."""
    if USE_DOT:
        M2 = tl.reshape(M, (BLOCK_B, BLOCK_B))
        if TRANS:
            M2 = tl.trans(M2)
        if ACC == tl.float64:
            R = tl.dot(M2, P, input_precision="ieee")
        else:
            R = tl.dot(M2, P, input_precision="tf32x3")
    else:
        if TRANS:  # R[g, j, l] = sum_i M[g, i, j] P[g, i, l]
            R = tl.sum(M[:, :, :, None] * P[:, :, None, :], axis=1)
        else:      # R[g, i, l] = sum_j M[g, i, j] P[g, j, l]
            R = tl.sum(M[:, :, :, None] * P[:, None, :, :], axis=2)
    return _saturate(R)


@triton.jit
def _as_tiles(P, USE_DOT: tl.constexpr):
    """A product from ``_matmat`` as (BLOCK_G, BLOCK_B, BLOCK_B) (USE_DOT: from its 2-D tile)."""
    if USE_DOT:
        return P[None, :, :]
    else:
        return P


@triton.jit
def _step_time(step, start, end, scan_down):
    """Time index of sweep step ``step``: upwards from ``start`` or downwards from ``end - 1``."""
    return tl.where(scan_down, end - 1 - step, start + step)


@triton.jit
def _load_step(a_seq_ptr, x_seq_ptr, a_off, a_step, x_off, x_step, a_mask, x_mask, step, step_hi,
               start, end, scan_down, coef_shift,
               BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, FLAT_A: tl.constexpr, FLAT_X: tl.constexpr,
               X_PAD: tl.constexpr):
    """Sweep step ``step``'s transition tile (BLOCK_G, BLOCK_B, BLOCK_B) and input tile (BLOCK_G,
    BLOCK_B), in storage dtype (zeros past ``step_hi``).

    The transition of the step at time t is A_t (forward) or, transposed by the caller, A of the
    forward step after t (backward, ``coef_shift`` = +-1; zero past the sequence end).
    ``a_seq_ptr`` / ``x_seq_ptr`` point at time 0 of the sequence's batch row; ``a_step`` /
    ``x_step`` are the elements per time step. FLAT_A / FLAT_X: the offsets and masks are one
    contiguous run (1-D), loaded as such and reshaped (b = 2: a block's row is only 8 bytes).
    X_PAD: ``x_off`` / ``x_mask`` are (2, BLOCK_G, BLOCK_B), the second copy masked off; the load
    is summed over that axis (x + 0, exact; see the kernel where they are made)."""
    t = _step_time(step, start, end, scan_down)
    live = step < step_hi
    t_coef = t + coef_shift
    coef_ok = live & (t_coef >= start) & (t_coef < end)
    M = tl.load(a_seq_ptr + t_coef * a_step + a_off, mask=_both(a_mask, coef_ok), other=0.0)
    xv = tl.load(x_seq_ptr + t * x_step + x_off, mask=_both(x_mask, live), other=0.0)
    if FLAT_A:
        M = tl.reshape(M, (BLOCK_G, BLOCK_B, BLOCK_B))
    if FLAT_X:
        xv = tl.reshape(xv, (BLOCK_G, BLOCK_B))
    if X_PAD:
        xv = tl.sum(xv, axis=0)
    return M, xv


# The flags stay out of the JIT's value specialisation (1 would become a constant), so the GPU
# compiles exactly the specialisations aot_specs lists.
@triton.jit(do_not_specialize=["block_size", "reverse", "varlen", "has_h0", "lookback", "force_aggregates"])
def block_diagonal_scan_kernel(
    A_ptr,            # transitions in x's dtype: A_CONTIG: (B, T, G, b, b) contiguous; else strides below
    x_ptr,            # forward: inputs x; backward: dL/dh.      (B, T, G, b) contiguous
    h0_ptr,           # initial states (N, G, b) contiguous, read when has_h0
    out_ptr,          # forward: states h; backward: g = dL/dx.  (B, T, G, b) contiguous
    h_ptr,            # backward only: forward states h          (B, T, G, b) contiguous
    grad_A_ptr,       # backward + A_CONTIG: dL/dA, (B, T, G, b, b) contiguous, A's dtype
    grad_h0_ptr,      # backward only: dL/dh0 (N, G, b) contiguous, accumulation dtype
    cu_seqlens_ptr,   # (N + 1,) packed-sequence offsets, read when varlen != 0
    ws_ptr,           # look-back, accumulation dtype, per (chunk, sequence): aggregate products P (S, N, G, b, b),
                      # then aggregate end states s (S, N, G, b), then inclusive states (S, N, G, b)
    sync_ptr,         # look-back: zeroed int32, a flag per program (S, N, n_groups), then the ticket counter
    T, G, N, block_size,  # time steps per batch row, blocks, sequences, block size b
    chunk_len,        # sweep steps per program (look-back: per chunk; walk: >= every sequence's length)
    reverse, varlen, has_h0, lookback, force_aggregates,  # runtime flags (0 / 1)
    stride_ab, stride_at, stride_ag,  # A's strides when not A_CONTIG (0 along broadcast dims)
    BACKWARD: tl.constexpr, A_CONTIG: tl.constexpr, ACC: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_B: tl.constexpr, BS: tl.constexpr, USE_DOT: tl.constexpr, OUT_ROWS: tl.constexpr,
    LOOKBACK: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program: BLOCK_G blocks of one sequence, over its whole sweep (walk) or one chunk of it
    (look-back). BS: the block size b when it is a power of two (== BLOCK_B), else 0 (then b is
    ``block_size`` and BLOCK_B the next power of two). OUT_ROWS: steps whose states are stored
    together. LOOKBACK: the look-back code is compiled in (``lookback`` may then be 0 or 1); without
    it (the GPU plan at b >= 32, see ``_config``) every program walks its whole sweep and ``lookback``
    must be 0: the chunk-product chain of walk 1 is what costs the registers there. PREFETCH: how
    many steps ahead walk 2 loads (2, or 1 where three b x b tiles in flight do not fit: b = 64)."""
    n_groups = tl.cdiv(G, BLOCK_G)
    n_programs = tl.num_programs(0)
    # Look-back: programs own chunks in the order they take tickets, chunk-major: (chunk, sequence,
    # block group); the walk's program id names its (sequence, block group), chunk 0.
    if LOOKBACK:
        pid_g, seq, chunk = lookback_ticket(sync_ptr, n_groups, N, lookback != 0)
    else:
        pid_g, seq, chunk = lookback_ticket(sync_ptr, n_groups, N, False)
    if BS == 0:
        bs = block_size
    else:
        bs = BS
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
    scan_down = reverse != BACKWARD
    fwd_step = 1 - 2 * reverse  # time step of the forward recurrence
    # The matrix of sweep step t is A_t (forward) or A^T of the forward step after t
    # (backward; zero past the sequence end): its time index is t + coef_shift.
    if BACKWARD:
        coef_shift = fwd_step
    else:
        coef_shift = fwd_step * 0
    # This program's sweep steps [step_lo, step_hi), counted in scan order; the last chunk
    # that holds steps (chunk 0 for an empty sequence). Chunks past it have nothing to do.
    step_lo = tl.minimum(chunk.to(tl.int64) * chunk_len, length)
    step_hi = tl.minimum(step_lo + chunk_len, length)
    last_chunk = tl.maximum((length + chunk_len - 1) // chunk_len, 1) - 1

    blocks = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = tl.arange(0, BLOCK_B)
    g_ok = blocks < G
    if BS == BLOCK_B:  # every row is a real row: masks constant along the block's axes (vector loads)
        vec_mask = tl.broadcast_to(g_ok[:, None], (BLOCK_G, BLOCK_B))
        tile_mask = tl.broadcast_to(g_ok[:, None, None], (BLOCK_G, BLOCK_B, BLOCK_B))
    else:
        r_ok = rows < bs
        vec_mask = g_ok[:, None] & r_ok[None, :]                       # (BLOCK_G, BLOCK_B)
        tile_mask = vec_mask[:, :, None] & r_ok[None, None, :]         # (BLOCK_G, BLOCK_B, BLOCK_B)
    vec_off = blocks[:, None] * bs + rows[None, :]                     # offset inside one time step
    tile_off = vec_off[:, :, None] * bs + rows[None, None, :]          # a contiguous b x b tile per block
    x_step = G.to(tl.int64) * bs                                       # elements of x per time step
    row_base = batch * T                                               # global time index of t = 0
    x_seq_ptr = x_ptr + row_base * x_step
    if A_CONTIG:
        a_step = x_step * bs
        a_seq_ptr = A_ptr + row_base * a_step
        a_tile = tile_off
    else:  # strided (broadcast) A, each b x b block contiguous; G x stride_ag < 2^31 (the launcher's check)
        a_step = stride_at
        a_seq_ptr = A_ptr + batch * stride_ab
        a_tile = (blocks[:, None, None] * stride_ag.to(tl.int32) + rows[None, :, None] * bs
                  + rows[None, None, :])
    # The streamed tiles' offsets and masks: b = 2 loads and stores its contiguous run of blocks as
    # one 1-D tile (a block row alone, 8 bytes of fp32, is too narrow for 128-bit accesses).
    FLAT_X: tl.constexpr = BS == 2
    FLAT_A: tl.constexpr = FLAT_X and A_CONTIG
    X_PAD: tl.constexpr = BS == 0 and BLOCK_B == 64 and not BACKWARD  # b = 33..63, forward
    if FLAT_X:
        x_ld_off = pid_g * (BLOCK_G * BS) + tl.arange(0, BLOCK_G * BLOCK_B)
        x_ld_mask = x_ld_off < G * BS
    elif X_PAD:
        # b = 33..63, forward (one 64 x 64 tile on 128 threads, b a runtime value): a (1, 64) tile
        # of x has fewer elements than threads, so Triton 3.6 deems its load cheap to repeat and
        # issues it in the layout of the product's rows: 32 replicated elements a thread, each
        # with its own 64-bit address and predicate (ptxas spilled 0.5-0.6 KB at 255 registers).
        # Loaded as (2, 1, 64) with the second copy masked off (128 elements), it keeps a layout
        # of its own, one element a thread, and the sum over the copies (x + 0, exact) hands it
        # to the product. No extra traffic: a masked-off lane loads nothing.
        pad = tl.arange(0, 2)[:, None, None]
        x_ld_off = vec_off[None, :, :] + pad * 0
        x_ld_mask = vec_mask[None, :, :] & (pad == 0)
    else:
        x_ld_off = vec_off
        x_ld_mask = vec_mask
    if FLAT_A:
        a_ld_off = pid_g * (BLOCK_G * BS * BS) + tl.arange(0, BLOCK_G * BLOCK_B * BLOCK_B)
        a_ld_mask = a_ld_off < G * (BS * BS)
    else:
        a_ld_off = a_tile
        a_ld_mask = tile_mask
    if X_PAD:
        # Walk 2 at b = 33..63 (forward): rows i >= b of the tile re-read row b - 1 instead of
        # being masked off (in bounds, and in cache), so the load's mask is the column's alone,
        # one predicate a thread rather than one per row; the rows of h they produce are not
        # states and are never kept (see the update of carry below).
        rows_in = tl.minimum(rows, bs - 1)
        if A_CONTIG:
            w2_a_off = (blocks[:, None, None] * bs + rows_in[None, :, None]) * bs + rows[None, None, :]
        else:
            w2_a_off = (blocks[:, None, None] * stride_ag.to(tl.int32) + rows_in[None, :, None] * bs
                        + rows[None, None, :])
        w2_a_mask = tl.broadcast_to(g_ok[:, None, None] & r_ok[None, None, :], (BLOCK_G, BLOCK_B, BLOCK_B))
    else:
        w2_a_off = a_ld_off
        w2_a_mask = a_ld_mask
    eye2 = (rows[:, None] == rows[None, :]).to(ACC)
    eye = tl.broadcast_to(eye2[None, :, :], (BLOCK_G, BLOCK_B, BLOCK_B))
    # Look-back bookkeeping: this chunk's row of the workspace (flags: kernels/_shared.chunk_flag).
    n_rows = n_programs // n_groups                                    # chunks x sequences
    ws_P = ws_ptr
    ws_s = ws_P + n_rows * x_step * bs
    ws_inc = ws_s + n_rows * x_step
    ws_row = chunk.to(tl.int64) * N + seq

    # Carry into the first step: h0 (forward chunk 0 or walk), 0 (backward: nothing flows in past the end).
    carry = tl.zeros((BLOCK_G, BLOCK_B), ACC)
    if not BACKWARD:
        carry = tl.load(h0_ptr + seq.to(tl.int64) * x_step + vec_off,
                        mask=_both(vec_mask, (has_h0 != 0) & (chunk == 0)), other=0.0).to(ACC)

    if LOOKBACK:  # compiled in only where the plan may cut sequences into chunks
        looking = (lookback != 0) & (chunk > 0) & (chunk <= last_chunk)
        # Fast path: the predecessor's inclusive state is already published.
        pred_status = read_flag(chunk_flag(sync_ptr, chunk - 1, seq, pid_g, n_groups, N), looking)
        pred_ready = looking & (pred_status == 2) & (force_aggregates == 0)
        carry = tl.where(pred_ready,
                         tl.load(ws_inc + (ws_row - N) * x_step + vec_off, mask=_both(vec_mask, pred_ready), other=0.0,
                                 cache_modifier=".cg"),
                         carry)
        if looking & (pred_ready == 0):
            # Walk 1: the chunk's map h -> P h + s, from the identity and a zero state.
            if USE_DOT:  # one block per program: a 2-D tile for tl.dot
                P = eye2
            else:
                P = eye
            s = tl.zeros((BLOCK_G, BLOCK_B), ACC)
            M_1, x_1 = _load_step(a_seq_ptr, x_seq_ptr, a_ld_off, a_step, x_ld_off, x_step, a_ld_mask, x_ld_mask,
                                  step_lo, step_hi, start, end, scan_down, coef_shift,
                                  BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
            M_2, x_2 = _load_step(a_seq_ptr, x_seq_ptr, a_ld_off, a_step, x_ld_off, x_step, a_ld_mask, x_ld_mask,
                                  step_lo + 1, step_hi, start, end, scan_down, coef_shift,
                                  BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
            for step in range(step_lo, step_hi):
                M_raw, x_raw = M_1, x_1
                M_1, x_1 = M_2, x_2
                M_2, x_2 = _load_step(a_seq_ptr, x_seq_ptr, a_ld_off, a_step, x_ld_off, x_step, a_ld_mask, x_ld_mask,
                                      step + 2, step_hi, start, end, scan_down, coef_shift,
                                  BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
                M = M_raw.to(ACC)
                s = _matvec(M, s, BACKWARD) + x_raw.to(ACC)
                P = _matmat(M, P, BACKWARD, USE_DOT, ACC, BLOCK_B)
            # Published for successors that look back before this chunk knows its entering state
            # (the last chunk has no successor).
            pub_agg = chunk < last_chunk
            tl.store(ws_P + ws_row * x_step * bs + tile_off, _as_tiles(P, USE_DOT), mask=_both(tile_mask, pub_agg))
            tl.store(ws_s + ws_row * x_step + vec_off, s, mask=_both(vec_mask, pub_agg))
            set_flag(chunk_flag(sync_ptr, chunk, seq, pid_g, n_groups, N), 1, pub_agg)
            # Look back: the entering state is (acc) applied to the inclusive state of the nearest
            # predecessor j that has published one, acc the composed maps of the aggregates passed.
            if USE_DOT:
                acc_P = eye2
            else:
                acc_P = eye
            acc_s = tl.zeros((BLOCK_G, BLOCK_B), ACC)
            j = chunk - 1
            while looking:
                status = read_flag(chunk_flag(sync_ptr, j, seq, pid_g, n_groups, N))
                # force_aggregates: inclusive states only from chunk 0 (which publishes no aggregate).
                has_inclusive = (status == 2) & ((force_aggregates == 0) | (j == 0))
                has_aggregate = (status >= 1) & (has_inclusive == 0)
                row_j = j.to(tl.int64) * N + seq
                inc = tl.load(ws_inc + row_j * x_step + vec_off, mask=_both(vec_mask, has_inclusive), other=0.0,
                              cache_modifier=".cg")
                P_j = tl.load(ws_P + row_j * x_step * bs + tile_off, mask=_both(tile_mask, has_aggregate), other=0.0,
                              cache_modifier=".cg")
                s_j = tl.load(ws_s + row_j * x_step + vec_off, mask=_both(vec_mask, has_aggregate), other=0.0,
                              cache_modifier=".cg")
                # Found: the entering state is acc applied to the predecessor's true end state.
                acc_P3 = _as_tiles(acc_P, USE_DOT)
                carry = tl.where(has_inclusive, _matvec(acc_P3, inc, False) + acc_s, carry)
                # An aggregate: acc <- acc o (P_j, s_j) = (acc_P P_j, acc_P s_j + acc_s), one chunk further.
                acc_s = tl.where(has_aggregate, _matvec(acc_P3, s_j, False) + acc_s, acc_s)
                if USE_DOT:  # 2-D tiles: acc_P @ P_j
                    acc_P = tl.where(has_aggregate, _matmat(acc_P3, tl.reshape(P_j, (BLOCK_B, BLOCK_B)), False,
                                                            USE_DOT, ACC, BLOCK_B), acc_P)
                else:
                    acc_P = tl.where(has_aggregate, _matmat(acc_P, P_j, False, USE_DOT, ACC, BLOCK_B), acc_P)
                j = j - has_aggregate.to(tl.int32)
                looking = has_inclusive == 0

    # Walk 2 (the only walk in walk mode and on the fast path): the states from the entering one.
    if BACKWARD:
        h0_prev = tl.load(h0_ptr + seq.to(tl.int64) * x_step + vec_off, mask=_both(vec_mask, has_h0 != 0),
                          other=0.0).to(ACC)
    M_1, x_1 = _load_step(a_seq_ptr, x_seq_ptr, w2_a_off, a_step, x_ld_off, x_step, w2_a_mask, x_ld_mask,
                          step_lo, step_hi, start, end, scan_down, coef_shift,
                              BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
    if PREFETCH == 2:
        M_2, x_2 = _load_step(a_seq_ptr, x_seq_ptr, w2_a_off, a_step, x_ld_off, x_step, w2_a_mask, x_ld_mask,
                              step_lo + 1, step_hi, start, end, scan_down, coef_shift,
                              BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
    # The states of OUT_ROWS consecutive steps are gathered into one (OUT_ROWS, BLOCK_G, BLOCK_B)
    # tile and stored together: one step's states are too few (b = 16: 16 values per warp) for
    # every thread to store 128 bits at once.
    out_rows = tl.arange(0, OUT_ROWS)
    for first in range(step_lo, step_hi, OUT_ROWS):
        h_rows = tl.zeros((OUT_ROWS, BLOCK_G, BLOCK_B), ACC)
        for k in tl.static_range(OUT_ROWS):
            step = first + k
            # The loads PREFETCH steps ahead are issued before this step's arithmetic.
            M_raw, x_raw = M_1, x_1
            if PREFETCH == 2:
                M_1, x_1 = M_2, x_2
                M_2, x_2 = _load_step(a_seq_ptr, x_seq_ptr, w2_a_off, a_step, x_ld_off, x_step, w2_a_mask,
                                      x_ld_mask, step + 2, step_hi, start, end, scan_down, coef_shift,
                                      BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
            else:
                M_1, x_1 = _load_step(a_seq_ptr, x_seq_ptr, w2_a_off, a_step, x_ld_off, x_step, w2_a_mask,
                                      x_ld_mask, step + 1, step_hi, start, end, scan_down, coef_shift,
                                      BLOCK_G, BLOCK_B, FLAT_A, FLAT_X, X_PAD)
            # h[g, i] <- sum_j M[g, i, j] h[g, j] + x[g, i]
            # (backward: g[g, j] <- sum_i M[g, i, j] g[g, i] + dh[g, j]); steps past the end keep the state.
            live = step < step_hi
            if X_PAD:  # rows past b stay 0 (so no product sees a value of the re-read rows)
                carry = tl.where(_both(vec_mask, live), _matvec(M_raw.to(ACC), carry, BACKWARD) + x_raw.to(ACC),
                                 carry)
            else:
                carry = tl.where(live, _matvec(M_raw.to(ACC), carry, BACKWARD) + x_raw.to(ACC), carry)
            h_rows = tl.where((out_rows == k)[:, None, None], carry[None, :, :], h_rows)
            if BACKWARD and A_CONTIG:
                # dL/dA_t = g_t h_{t - fwd_step}^T, with h0 (or zeros) before the first forward step.
                t = _step_time(step, start, end, scan_down)
                t_prev = t - fwd_step
                prev_in = live & (t_prev >= start) & (t_prev < end)
                hp = tl.load(h_ptr + (row_base + t_prev) * x_step + x_ld_off, mask=_both(x_ld_mask, prev_in),
                             other=0.0).to(ACC)
                if FLAT_X:
                    hp = tl.reshape(hp, (BLOCK_G, BLOCK_B))
                hp = tl.where(prev_in, hp, h0_prev)
                grad_A_t = (carry[:, :, None] * hp[:, None, :]).to(grad_A_ptr.dtype.element_ty)
                if FLAT_A:
                    grad_A_t = tl.reshape(grad_A_t, (BLOCK_G * BLOCK_B * BLOCK_B,))
                tl.store(grad_A_ptr + (row_base + t) * a_step + a_ld_off, grad_A_t, mask=_both(a_ld_mask, live))
        steps = first + out_rows
        t_rows = _step_time(steps, start, end, scan_down)
        if FLAT_X:
            tl.store(out_ptr + (row_base + t_rows)[:, None] * x_step + x_ld_off[None, :],
                     tl.reshape(h_rows, (OUT_ROWS, BLOCK_G * BLOCK_B)).to(out_ptr.dtype.element_ty),
                     mask=(steps < step_hi)[:, None] & x_ld_mask[None, :])
        else:
            tl.store(out_ptr + (row_base + t_rows)[:, None, None] * x_step + vec_off[None, :, :],
                     h_rows.to(out_ptr.dtype.element_ty), mask=(steps < step_hi)[:, None, None] & vec_mask[None, :, :])

    # The true state at this chunk's end, for the successors.
    if LOOKBACK:
        pub_inc = (lookback != 0) & (chunk < last_chunk)
        tl.store(ws_inc + ws_row * x_step + vec_off, carry, mask=_both(vec_mask, pub_inc))
        set_flag(chunk_flag(sync_ptr, chunk, seq, pid_g, n_groups, N), 2, pub_inc)

    if BACKWARD:
        # dL/dh0 = A_first^T g_first, "first" the first forward step (zero for empty sequences),
        # written by the program whose sweep ends there.
        t_first = tl.where(reverse != 0, end - 1, start)
        M_first = tl.load(a_seq_ptr + t_first * a_step + a_tile, mask=_both(tile_mask, length > 0),
                          other=0.0).to(ACC)
        grad_h0 = _matvec(M_first, carry, True)
        tl.store(grad_h0_ptr + seq.to(tl.int64) * x_step + vec_off, grad_h0,
                 mask=_both(vec_mask, chunk == last_chunk))


def _config(b: int, interpret: bool, dtype: torch.dtype = torch.float32) -> dict:
    """Tile sizes for block size b.

    BLOCK_B is b rounded up to a power of two. On the GPU a program holds about 256 transition
    entries for small b (several blocks per program), and one block for b >= 16, with warps
    scaled to the tile (1 warp at b = 1, 2 and 16, 2 at b = 4 and 8, 4 at b = 32 and 64;
    16-bit storage: 2 at b = 2, 4 at b = 8). The interpreter prefers few, large programs (its
    cost is per operation). USE_DOT (tl.dot chunk products) is kept off, see below. Also: OUT_ROWS
    (OUT_ROWS_BWD for the backward), LOOKBACK, PREFETCH (kernel constexprs) and maxnreg (the
    register ceiling ptxas is given, a launch option; None: ptxas' own choice).
    """
    BLOCK_B = triton.next_power_of_2(b)
    tile = BLOCK_B * BLOCK_B
    # Chunk products by tl.dot (USE_DOT) crash Triton 3.6's RemoveLayoutConversions pass (the GPU
    # machines' Triton) in this kernel, at every b >= 16; the broadcast product compiles with both
    # and is exact fp32 (b = 16: no spills at sm_90a; at b = 32, 64 it spilled: no look-back there).
    use_dot = False
    if interpret:
        cfg = dict(BLOCK_B=BLOCK_B, BLOCK_G=1 if use_dot else max(1, 1024 // tile), num_warps=1, USE_DOT=use_dot,
                   OUT_ROWS=1, LOOKBACK=True, PREFETCH=2, maxnreg=None)
    else:
        BLOCK_G = 1 if use_dot else max(1, 256 // tile)
        # ~8 tile elements per thread (4 for b = 4, 8, whose walk-1 products hold a
        # (BLOCK_G, b, b, b) tile: 1 warp spilled there at sm_90a; b = 2 on 2 warps loads x in
        # 64-bit pieces): the two-step prefetch keeps three tiles live. Warps split the blocks
        # axis, so the per-block sums stay in a warp.
        num_warps = 2 if BLOCK_B in (4, 8) else min(4, max(1, tile * BLOCK_G // 256))
        if dtype.itemsize == 2 and BLOCK_B in (2, 8):
            # 16-bit storage (64-bit accesses are 4 elements): the backward's dL/dA tile and
            # prefetched tiles spilled at sm_90a on 1 warp (b = 2: 96 bytes) and 2 warps (b = 8: 6 bytes).
            num_warps *= 2
        # States of OUT_ROWS steps stored at once: 4 fp32 per thread, so that stores are 128-bit.
        out_rows = min(16, max(1, 128 * num_warps // (BLOCK_G * BLOCK_B)))
        if b != BLOCK_B:
            # Rows of 3, 5, ... elements: every store is one element wide whatever is gathered, so
            # gathering only costs registers (Triton 3.6: b = 3, forward with a broadcast A, 12 bytes
            # of spills at OUT_ROWS = 4; none at 1; b = 33..63, forward: 5.1-5.5 KB at 8).
            out_rows = 1
        out_rows_bwd = out_rows
        # Look-back code (walk 1's b x b chunk-product chain, the aggregates' composition) only up to
        # b = 16. At b = 32 and 64 that chain, a (b, b, b) broadcast product per step without tl.dot,
        # took 240-255 registers and spilled 0.9-2.6 KB at sm_90a (and b^3 FLOPs per step against the
        # b^2 of the walk); without it the kernel is walk 2 alone. So the GPU plan at b >= 32 is one
        # program per (sequence, block) walking its whole sequence, B x G programs (B = 8, G * b =
        # 256: 64 at b = 32, 32 at b = 64, fewer than the 132 SMs): still one pass over memory, with
        # less time-parallelism, and none of #13's targets (b <= 16) are affected.
        lookback = BLOCK_B <= 16
        # b = 64 (one 64 x 64 block a program, 4 warps, 32 tile elements a thread): walk 2 prefetches
        # one step, not two (three 16 KB tiles in flight spilled), and the backward gathers 4 steps
        # of dL/dx, not 8 (Triton 3.6: 8 steps spilled 20 bytes with a broadcast A and 1.2 KB with
        # the dL/dA outer products; 4 steps: 0); allowed 255 registers (190-250), 2 programs per SM.
        # 8 warps need OUT_ROWS = 16 for 128-bit stores of h and then spilled, or were held to 128
        # registers for 2 programs per SM, which spilled too. b = 33..63 (the same tile, b a runtime
        # value, so an address and a mask per element): the forward's x load and the tile's row
        # mask are reshaped for Triton 3.6 (X_PAD in the kernel; 255 registers and 0.5-0.6 KB of
        # spills before, 233 and none after; Triton 3.9: 190-197).
        prefetch = 1 if BLOCK_B >= 64 else 2
        if b == 64:
            out_rows_bwd = out_rows // 2
        # ptxas left to itself caps some specialisations below what they need and spills: the fp32
        # b = 8 backward with a broadcast A at 168 registers, 40 bytes (Triton 3.6, the GPU
        # machines'; allowed 255 it takes ~206, 4 programs of 2 warps per SM, the same 128-bit
        # accesses), b = 9..15 forward with a broadcast A at 168 (12 bytes) and the b = 32 backward
        # with a broadcast A at 96 (32 bytes, Triton 3.9). With at most 4 warps, 255 registers
        # still leave room for 2 programs per SM.
        maxnreg = 255 if BLOCK_B >= 8 else None
        cfg = dict(BLOCK_B=BLOCK_B, BLOCK_G=BLOCK_G, num_warps=num_warps, USE_DOT=use_dot, OUT_ROWS=out_rows,
                   OUT_ROWS_BWD=out_rows_bwd, LOOKBACK=lookback, PREFETCH=prefetch, maxnreg=maxnreg)
    cfg.setdefault("OUT_ROWS_BWD", cfg["OUT_ROWS"])
    return config_override("block_diagonal", cfg, ("BLOCK_G", "num_warps", "OUT_ROWS", "OUT_ROWS_BWD"))


# Time-parallelism on the GPU: when fewer than WALK_PROGRAMS_PER_SM x SMs (sequence, block group)
# programs exist, each sequence is cut into chunks joined by look-back, so that about
# TARGET_PROGRAMS_PER_SM x SMs programs run; chunks hold MIN_CHUNK to MAX_CHUNK steps. Each chunk
# writes its inclusive state (and on a GPU, when its predecessor is not done yet, its b x b product
# and end state) to the workspace: about 1 / chunk_len of the bytes of A, x and h.
WALK_PROGRAMS_PER_SM = 4
TARGET_PROGRAMS_PER_SM = 8
MIN_CHUNK = 32
MAX_CHUNK = 128


def _auto_chunk_len(programs: int, max_len: int, interpret: bool, model=None) -> int:
    """Steps per look-back chunk for ``programs`` (sequence, block group) programs and sequences of
    at most ``max_len`` steps, or 0 for one walk per program. ``interpret``: the interpreter's own
    plan (no chunks); ``model``: the ``DeviceModel`` planned for (default: ``device_model()``)."""
    model = model if model is not None else (None if interpret else device_model())
    if interpret or model is None:
        return 0
    if programs >= WALK_PROGRAMS_PER_SM * model.sm_count or max_len < 2 * MIN_CHUNK:
        return 0
    n_wanted = triton.cdiv(TARGET_PROGRAMS_PER_SM * model.sm_count, programs)
    return min(MAX_CHUNK, max(MIN_CHUNK, triton.cdiv(max_len, n_wanted)))


def _plan(N: int, max_len: int, G: int, b: int, model, chunk_len: Optional[int] = None,
          dtype: torch.dtype = torch.float32):
    """(cfg, BLOCK_G, block groups, chunks per sequence S, steps per chunk) of a launch; S = 1 walks.

    ``chunk_len``: None plans for ``model`` (None: the interpreter's plan); 0 forces walks; C > 0
    forces look-back chunks of C steps."""
    cfg = _config(b, model is None, dtype)
    BLOCK_G = min(cfg["BLOCK_G"], triton.next_power_of_2(G))
    n_groups = triton.cdiv(G, BLOCK_G)
    if chunk_len is None:  # without look-back code (b >= 32 on a GPU) the plan always walks
        chunk_len = _auto_chunk_len(n_groups * N, max_len, model is None, model) if cfg["LOOKBACK"] else 0
    S = triton.cdiv(max_len, chunk_len) if chunk_len > 0 else 1
    if S <= 1:
        return cfg, BLOCK_G, n_groups, 1, max(max_len, 1)
    return cfg, BLOCK_G, n_groups, S, chunk_len


def plan_description(B: int, T: int, G: int, b: int, model) -> str:
    """The launch plan for x of shape (B, T, G, b) (no varlen) on ``model`` (a ``DeviceModel``;
    None: the interpreter's plan), in words, e.g. "1024 programs (8 x 128 time chunks), one pass"."""
    cfg, BLOCK_G, n_groups, S, _ = _plan(B, T, G, b, model)
    programs = B * n_groups
    if S > 1:
        return f"{programs * S} programs ({programs} x {S} time chunks), one pass"
    return f"{programs} programs, one pass"


def _launch(A, x, h0, out, h, grad_A, grad_h0, cu_seqlens, reverse, backward, chunk_len=None,
            force_aggregates=False):
    """Runs the forward (backward=False) or backward sweep in one launch; see the kernel for the arguments.

    ``A``: full-size and contiguous (``grad_A`` is written when given), or broadcast with each b x b
    block contiguous. ``chunk_len``: see ``_plan``. ``force_aggregates``: look-backs compose
    aggregates back to chunk 0 (tests: the path a GPU takes when predecessors are still running).
    """
    B, T, G, b = x.shape
    N = num_sequences(B, cu_seqlens)
    if N == 0 or G == 0 or T == 0:
        return
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)  # T < 2**31; one pointer type for every launch
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    else:
        max_len = T
    # The interpreter's own plan unless a GPU is planned for (the CUDA device or LINREC_DEVICE_MODEL).
    cfg, BLOCK_G, n_groups, S, steps = _plan(N, max_len, G, b, device_model(x.device), chunk_len, x.dtype)
    lookback = S > 1
    acc = accumulation_dtype(x.dtype)
    A_contig = tuple(A.shape) == (B, T, G, b, b)
    if A_contig:
        s_b = s_t = s_g = 0
    else:
        s_b, s_t, s_g = A.expand(B, T, G, b, b).stride()[:3]
    programs = n_groups * N * S
    # Unused pointers get dummies of the dtype the kernel is compiled for (see aot_specs).
    dummy = out
    acc_dummy = grad_h0 if grad_h0 is not None else torch.empty(1, dtype=acc, device=x.device)
    if lookback:
        ws = torch.empty(S * N * G * b * (b + 2), dtype=acc, device=x.device)
        sync = torch.zeros(programs + 1, dtype=torch.int32, device=x.device)
    else:
        ws = acc_dummy
        sync = cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=x.device)
    BLOCK_B = cfg["BLOCK_B"]
    block_diagonal_scan_kernel[(programs,)](
        A, x, h0 if h0 is not None else dummy, out,
        h if h is not None else dummy,
        grad_A if grad_A is not None else A,
        acc_dummy,
        cu_seqlens if cu_seqlens is not None else sync,
        ws, sync,
        T, G, N, b, steps,
        int(reverse), int(cu_seqlens is not None), int(h0 is not None), int(lookback), int(force_aggregates),
        s_b, s_t, s_g,
        BACKWARD=backward, A_CONTIG=A_contig, ACC=tl_accumulation_dtype(x.dtype), BLOCK_G=BLOCK_G,
        BLOCK_B=BLOCK_B, BS=b if b == BLOCK_B else 0, USE_DOT=cfg["USE_DOT"],
        OUT_ROWS=cfg["OUT_ROWS_BWD"] if backward else cfg["OUT_ROWS"],
        LOOKBACK=cfg["LOOKBACK"] or lookback, PREFETCH=cfg["PREFETCH"],  # a forced chunk_len (tests) compiles the look-back in at any b
        num_warps=cfg["num_warps"], **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}),
    )


def _storage(A: torch.Tensor, x: torch.Tensor):
    """A in x's dtype: contiguous when full-size (B, T, G, b, b), else its broadcast strides kept,
    with each b x b block made contiguous (copied only when it is not)."""
    A = A if A.dtype == x.dtype else A.to(x.dtype)
    B, T, G, b = x.shape
    if tuple(A.shape) == (B, T, G, b, b):
        return A.contiguous()
    # Each b x b block contiguous, and the blocks' offsets within one time step in int32 (the kernel's tiles).
    if (b > 1 and A.stride()[-2:] != (b, 1)) or (A.dim() >= 3 and G * A.stride()[-3] >= 2**31):
        A = A.contiguous()
    return A


def block_diagonal_scan_forward(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                                cu_seqlens: Optional[torch.Tensor], reverse: bool,
                                chunk_len: Optional[int] = None, force_aggregates: bool = False) -> torch.Tensor:
    """States of ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``, in one launch and one pass over A and x.

    Args:
        A: broadcastable to (B, T, G, b, b), real (a broadcast A is not copied).
        x: (B, T, G, b) float32 | bfloat16 | float16 | float64.
        initial_state: (N, G, b) or None (zeros). cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.
        chunk_len: None (planned for the device), 0 (one walk per sequence and block group) or C > 0
            (look-back chunks of C steps). force_aggregates: see ``_launch`` (tests).

    Returns:
        h: (B, T, G, b) in x's dtype.
    """
    x = x.contiguous()
    A = _storage(A, x)
    h0 = initial_state.to(x.dtype).contiguous() if initial_state is not None else None
    out = torch.empty_like(x)
    _launch(A, x, h0, out, None, None, None, cu_seqlens, reverse, backward=False, chunk_len=chunk_len,
            force_aggregates=force_aggregates)
    return out


def block_diagonal_scan_backward(A: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                 initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                                 reverse: bool, chunk_len: Optional[int] = None, force_aggregates: bool = False
                                 ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of the block-diagonal scan in one launch (one pass over A, h and dL/dh).

    Args:
        A: as forward; h: (B, T, G, b) forward states; grad_h: (B, T, G, b) dL/dh (any strides);
        initial_state: (N, G, b) or None; chunk_len, force_aggregates: as in the forward.

    Returns:
        grad_A: (B, T, G, b, b) in A's dtype when A is full-size, None when A is broadcast (the op
        forms that gradient), grad_x: (B, T, G, b) in h's dtype, grad_initial_state: (N, G, b) in the
        accumulation dtype (fp32; fp64 for fp64).
    """
    B, T, G, b = h.shape
    N = num_sequences(B, cu_seqlens)
    acc = accumulation_dtype(h.dtype)
    h = h.contiguous()
    grad_h = grad_h.to(h.dtype).contiguous()
    full_A = tuple(A.shape) == (B, T, G, b, b)
    A_store = _storage(A, h)
    h0 = initial_state.to(h.dtype).contiguous() if initial_state is not None else None
    grad_x = torch.empty_like(h)
    runs = N > 0 and G > 0 and T > 0
    grad_h0 = (torch.empty if runs else torch.zeros)((N, G, b), dtype=acc, device=h.device)
    grad_A = torch.empty((B, T, G, b, b), dtype=A.dtype, device=h.device) if full_A else None
    _launch(A_store, grad_h, h0, grad_x, h, grad_A, grad_h0, cu_seqlens, reverse, backward=True,
            chunk_len=chunk_len, force_aggregates=force_aggregates)
    # A broadcast A gets None: the op sums dL/dA over the broadcast dimensions by one einsum.
    return grad_A, grad_x, grad_h0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
AOT_DTYPES = (("fp32", torch.float32), ("bf16", torch.bfloat16))  # float16 compiles as bfloat16 does
AOT_BLOCK_SIZES = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)  # 3, 5, 9, 17, 33 stand for the non-powers of two


def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps, options) for every launch the GPU launcher
    makes (options: see tests/aot_compile.py; the launch's maxnreg, the budget it is held to).

    Per storage dtype and block size: forward and backward, each with a full-size contiguous A
    (the backward writing dL/dA) and a broadcast A. Direction, packing, the initial state and walk
    or look-back are runtime flags, so these cover every call. A block size that is not a power
    of two compiles as BS = 0 with the block size a runtime argument: one specialisation per
    BLOCK_B (b = 3 -> 4, 5..7 -> 8, 9..15 -> 16, 17..31 -> 32, 33..63 -> 64), listed here through
    b = 3, 5, 9, 17, 33.
    """
    seen = set()
    for elem, dtype in AOT_DTYPES:
        for b in AOT_BLOCK_SIZES:
            cfg = _config(b, interpret=False, dtype=dtype)
            BS = b if b == cfg["BLOCK_B"] else 0
            for backward in (False, True):
                for a_contig in (True, False):
                    key = (elem, cfg["BLOCK_B"], BS, backward, a_contig)
                    if key in seen:
                        continue
                    seen.add(key)
                    sig = {
                        "A_ptr": f"*{elem}", "x_ptr": f"*{elem}", "h0_ptr": f"*{elem}", "out_ptr": f"*{elem}",
                        "h_ptr": f"*{elem}", "grad_A_ptr": f"*{elem}", "grad_h0_ptr": "*fp32",
                        "cu_seqlens_ptr": "*i32", "ws_ptr": "*fp32", "sync_ptr": "*i32",
                        "T": "i32", "G": "i32", "N": "i32", "block_size": "i32", "chunk_len": "i32",
                        "reverse": "i32", "varlen": "i32", "has_h0": "i32", "lookback": "i32",
                        "force_aggregates": "i32", "stride_ab": "i64", "stride_at": "i64", "stride_ag": "i64",
                    }
                    constexprs = dict(BACKWARD=backward, A_CONTIG=a_contig, ACC=tl.float32, BLOCK_G=cfg["BLOCK_G"],
                                      BLOCK_B=cfg["BLOCK_B"], BS=BS, USE_DOT=cfg["USE_DOT"],
                                      OUT_ROWS=cfg["OUT_ROWS_BWD"] if backward else cfg["OUT_ROWS"],
                                      LOOKBACK=cfg["LOOKBACK"], PREFETCH=cfg["PREFETCH"])
                    # As the JIT specialises at the GPU targets' shapes (B = 8, T = 4096, G * b = 256):
                    # every pointer 16-byte aligned, T and G multiples of 16, and a broadcast A's
                    # batch and time strides 0 (time-invariant (G, b, b)), its block stride b * b.
                    divisible = [name for name in sig if sig[name].startswith("*")] + ["T", "G"]
                    if not a_contig:
                        divisible += ["stride_ab", "stride_at"] + (["stride_ag"] if b * b % 16 == 0 else [])
                    options = {"divisible_by_16": divisible}
                    if cfg["maxnreg"]:
                        options["compile_options"] = {"maxnreg": cfg["maxnreg"]}
                    if BS == 0:  # rows of 3, 5, ... elements: see NON_POWER_OF_TWO_BUDGET
                        options["budget"] = NON_POWER_OF_TWO_BUDGET
                    elif BS == 64 and backward and not a_contig:
                        options["budget"] = B64_BROADCAST_BACKWARD_BUDGET
                    yield block_diagonal_scan_kernel, sig, constexprs, cfg["num_warps"], options


# The static budget CI checks at sm_90a (tests/aot_compile.py --budget): the scan streams A and x
# (backward: A, h, dL/dh) once, so every specialisation must run 2 programs per SM without spills,
# with 128-bit (fp32) / 64-bit (bf16, fp16) loads and stores in its loops.
STATIC_BUDGET = {"block_diagonal_scan_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr"}}
# Block sizes that are not powers of two (BS = 0): a block's rows of 3, 5, ... elements start at
# offsets that are not multiples of 16 bytes, so no access can be wider than one element; they are
# held to the rest of the budget (no spills, 2 programs per SM) without the vector check.
NON_POWER_OF_TWO_BUDGET = {"vector_of": None}
# b = 64, backward with a broadcast A: the loop's only store is dL/dx, gathered over OUT_ROWS_BWD = 4
# steps (4 x 64 values on 128 threads: 64-bit stores for fp32, 32-bit for bf16); 8 steps (128-bit)
# spilled 20 bytes with Triton 3.6 (see _config). Its loads are still held to 128 / 64 bits (h and
# dL/dh each step; a time-invariant A stays in cache), so a third of the bytes it moves is stored
# narrower than the rest of the budget asks.
B64_BROADCAST_BACKWARD_BUDGET = {"min_vector_stores": 0}
