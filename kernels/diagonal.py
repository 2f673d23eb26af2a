"""Triton kernels for the diagonal scan ``h_t = a_t * h_{t-1} + x_t``, in one pass over memory.

Within a tile of BLOCK_T steps x BLOCK_D channels, ``tl.associative_scan`` combines the affine
maps ``h -> a h + x`` (composition is associative):

    (a1, x1) then (a2, x2)  =  (a2 a1, a2 x1 + x2)

which yields, for every row r, the tile-local product ``A_r`` and state ``X_r`` from a zero
start. The state entering the tile is then applied as ``h_r = A_r * carry + X_r``. Rows past the
end of the sequence load the identity map (a = 1, x = 0), so the last row is always the tile's
end map.

Two ways to get the entering state, one pass over a and x either way:

* **walk** (``LOOKBACK=False``): one program per (sequence, channel block) walks its time axis
  tile by tile, carrying the state. Used when there are enough such programs to fill the GPU.
* **decoupled look-back** (``LOOKBACK=True``): the sequence is cut into chunks of exactly one
  tile, one program per (chunk, sequence, channel block), so B = 1, D = 64 still gives
  T / BLOCK_T programs. A program takes a ticket from an atomic counter and owns the chunk the
  ticket names; tickets are ordered chunk-major, so every predecessor of a chunk (the earlier
  chunks of its sequence and channel block) holds a lower ticket. It loads its tile once (kept
  in registers), scans it, publishes its aggregate map (product, end state from zero) with a
  flag, then looks back over its predecessors: each published inclusive prefix (the true state
  at that chunk's end) ends the look-back; each published aggregate is composed in and the
  look-back moves one chunk further; an unpublished flag is re-read. The entering state found,
  it publishes its own inclusive prefix and writes h. **No deadlock**: a program waits only on
  lower tickets, and a ticket is taken only by a program already running; the lowest unfinished
  ticket waits on nothing unfinished, so it finishes, whatever order the GPU schedules
  programs in. Chunk 0 of every sequence publishes its inclusive prefix at once. Under the
  interpreter programs run one at a time in ticket order, so the look-back never spins.
  **Memory ordering**: payload stores, then ``tl.debug_barrier()`` (every thread's stores
  happen before the flag write), then a *release* exchange of the flag; readers take the flag
  with an *acquire* atomic (Triton runs a scalar atomic on one thread and hands the value to
  the others through shared memory behind a barrier) and read the payload with ``.cg`` loads
  (L2, never a stale L1 line).

Reverse scans run the same scan over rows in reversed time order. The backward pass is the same
kernel with ``BACKWARD=True``: it scans the incoming gradient against the *next* step's
conjugated coefficient in the opposite direction, and fuses ``dL/da_t = g_t * conj(h_{t-1})``
(written in a's dtype, or summed per program over the tile's rows when a is broadcast over time)
and ``dL/dh_0`` into the same sweep.

Complex tensors arrive as their real views (trailing dimension 2). Every access addresses
scalars: a tile row of BLOCK_D complex elements is 2 BLOCK_D contiguous fp32 values, real and
imaginary parts interleaved, loaded whole (128-bit vector loads, like a real tile's) and split
into a real and an imaginary (BLOCK_T, BLOCK_D) tile with ``tl.reshape(..., (BLOCK_T, BLOCK_D, 2))``
and ``tl.split``; results are interleaved again with ``tl.join`` before one contiguous store. The
same holds for the per-channel vectors (initial and final states, look-back payloads, dL/dh0).

The walk is software-pipelined, forward and backward (``tl.range(..., num_stages=2)``): the next
tile's loads are issued (16-byte ``cp.async`` copies on sm_80+) before the current tile's scan.
The look-back's ticket, flag addressing and flag protocol are ``kernels/_shared.py``'s, shared
with the block-diagonal scan.
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
def _combine_real(a1, x1, a2, x2):
    return _saturate(a2 * a1), a2 * x1 + x2


@triton.jit
def _combine_complex(ar1, ai1, xr1, xi1, ar2, ai2, xr2, xi2):
    # (a2 a1, a2 x1 + x2) in complex arithmetic.
    ar = _saturate(ar2 * ar1 - ai2 * ai1)
    ai = _saturate(ar2 * ai1 + ai2 * ar1)
    xr = ar2 * xr1 - ai2 * xi1 + xr2
    xi = ar2 * xi1 + ai2 * xr1 + xi2
    return ar, ai, xr, xi


@triton.jit
def _last_row(tile, rows, BLOCK_T: tl.constexpr):
    """Row BLOCK_T - 1 of a (BLOCK_T, BLOCK_D) tile, as a (BLOCK_D,) vector."""
    return tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, tile, 0.0), axis=0)


@triton.jit
def _apply(pr, pi, sr, si, cr, ci, IS_COMPLEX: tl.constexpr):
    """The map ``h -> p h + s`` applied to c (complex when IS_COMPLEX; the imaginary parts
    are zeros otherwise)."""
    if IS_COMPLEX:
        return pr * cr - pi * ci + sr, pr * ci + pi * cr + si
    else:
        return pr * cr + sr, ci


@triton.jit
def _split_tile(v, IS_COMPLEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (ROWS, BLOCK_D * W) tile of scalars as loaded, complex elements interleaved (re, im), as
    its real and imaginary parts, (ROWS, BLOCK_D) each. A real tile (W = 1) is its own real part;
    its imaginary part is zeros."""
    if IS_COMPLEX:
        re, im = tl.split(tl.reshape(v, (ROWS, BLOCK_D, 2)))
    else:
        re = v
        im = tl.zeros_like(v)
    return re, im


@triton.jit
def _join_tile(re, im, IS_COMPLEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The inverse of ``_split_tile``: (ROWS, BLOCK_D) parts as one (ROWS, BLOCK_D * W) tile of
    interleaved scalars, ready for one contiguous store per row."""
    if IS_COMPLEX:
        v = tl.reshape(tl.join(re, im), (ROWS, 2 * BLOCK_D))
    else:
        v = re
    return v


@triton.jit
def _split_vec(v, IS_COMPLEX: tl.constexpr, BLOCK_D: tl.constexpr):
    """``_split_tile`` for a (BLOCK_D * W,) vector of scalars: (BLOCK_D,) parts."""
    if IS_COMPLEX:
        re, im = tl.split(tl.reshape(v, (BLOCK_D, 2)))
    else:
        re = v
        im = tl.zeros_like(v)
    return re, im


@triton.jit
def _join_vec(re, im, IS_COMPLEX: tl.constexpr, BLOCK_D: tl.constexpr):
    """``_join_tile`` for (BLOCK_D,) parts: one (BLOCK_D * W,) vector of scalars."""
    if IS_COMPLEX:
        v = tl.reshape(tl.join(re, im), (2 * BLOCK_D,))
    else:
        v = re
    return v


@triton.jit
def diagonal_scan_kernel(
    a_ptr,            # coefficients, real view (scalars); strides below in elements (may be 0: broadcast)
    x_ptr,            # forward: inputs x; backward: dL/dh.   (B, T, D[, 2]) contiguous
    h0_ptr,           # initial states (N, D[, 2]) contiguous, read when HAS_H0
    out_ptr,          # forward: states h; backward: dL/dx.   (B, T, D[, 2]) contiguous
    h_ptr,            # backward only: the forward states h   (B, T, D[, 2])
    grad_a_ptr,       # backward only: dL/da, (B, T, D[, 2]); GRAD_A_SUM: per-program sums (N, S, D[, 2])
    grad_h0_ptr,      # backward only: dL/dh0 (N, D[, 2]) in the accumulation dtype
    cu_seqlens_ptr,   # (N + 1,) packed-sequence offsets when VARLEN
    ws_ptr,           # LOOKBACK: per chunk (aggregate product, aggregate end state, inclusive state), (S, N, 3, D[, 2])
    sync_ptr,         # LOOKBACK: zeroed int32, a flag per program (S, N, n_dblk) then the ticket counter
    T, D, N, CHUNK_LEN,  # N sequences; CHUNK_LEN: steps per chunk (LOOKBACK: BLOCK_T; walk: >= T)
    stride_ab, stride_at, stride_ad,  # a's strides in elements (a complex element is 2 scalars)
    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, BACKWARD: tl.constexpr,
    LOOKBACK: tl.constexpr, GRAD_A_SUM: tl.constexpr,
    IS_COMPLEX: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_dblk = tl.cdiv(D, BLOCK_D)
    # LOOKBACK: programs own chunks in the order they take tickets, chunk-major: (chunk, sequence,
    # channel block); the walk's program id names its (sequence, channel block), chunk 0.
    pid_d, seq, chunk = lookback_ticket(sync_ptr, n_dblk, N, LOOKBACK)
    n_chunks = tl.num_programs(0) // (n_dblk * N)
    if VARLEN:  # packed sequences share batch row 0
        batch = seq * 0
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int32)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int32)
    else:
        batch = seq
        start = seq * 0
        end = start + T
    length = end - start
    # This program's share of the sweep: steps [sweep_begin, sweep_end), counted in scan order.
    sweep_begin = tl.minimum(chunk * CHUNK_LEN, length)
    sweep_end = tl.minimum(sweep_begin + CHUNK_LEN, length)
    last_chunk = tl.maximum(tl.cdiv(length, CHUNK_LEN), 1) - 1
    W: tl.constexpr = 2 if IS_COMPLEX else 1  # scalars per element
    # The scan walks time backwards for a reverse forward pass, and for the
    # backward of a forward-in-time pass.
    SCAN_DOWN: tl.constexpr = REVERSE != BACKWARD
    DIR: tl.constexpr = -1 if SCAN_DOWN else 1     # time step per row of a tile
    FWD_STEP: tl.constexpr = -1 if REVERSE else 1  # time step of the forward recurrence

    # Memory is addressed in scalars: a row of a tile is BLOCK_D * W contiguous scalars ("lanes";
    # lane W c + p holds part p of channel c), loaded and stored whole (vector accesses) and split
    # into real and imaginary (BLOCK_D,)-wide parts for the arithmetic.
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    chan_ok = chans < D
    lanes = pid_d * (BLOCK_D * W) + tl.arange(0, BLOCK_D * W)
    lane_ok = lanes < D * W
    rows = tl.arange(0, BLOCK_T)
    row_base = batch.to(tl.int64) * T  # global time index of this batch row's t = 0
    # a's lanes: channel c's part p at c * stride_ad * W + p. With a contiguous in channels
    # (stride_ad = 1, which the JIT turns into a constant) the second term vanishes and a's lanes
    # are contiguous like x's.
    # (lanes = W c + p, so lanes + c (stride_ad - 1) W; int64: a may be a large strided view.)
    if IS_COMPLEX:
        a_lane = lanes + (lanes // 2).to(tl.int64) * ((stride_ad - 1) * 2)
    else:
        a_lane = lanes.to(tl.int64) * stride_ad
    a_base = batch.to(tl.int64) * (stride_ab * W) + a_lane[None, :]
    state_off = seq.to(tl.int64) * (D * W) + lanes                   # into (N, D[, 2])
    # Offsets inside a tile, relative to its row 0 (int32: BLOCK_T x D x 2 < 2^31).
    tile_off = (DIR * rows)[:, None] * (D * W) + lanes[None, :]
    if LOOKBACK:
        ws_chunk = ws_ptr + (chunk.to(tl.int64) * N + seq) * (3 * D * W) + lanes   # this chunk's 3 payloads
        flag_ptr = chunk_flag(sync_ptr, chunk, seq, pid_d, n_dblk, N)

    # Carried state: h (forward) or g = dL/dx (backward), real and imaginary parts.
    carry_re = tl.zeros((BLOCK_D,), ACC)
    carry_im = tl.zeros((BLOCK_D,), ACC)
    if HAS_H0 and not BACKWARD:
        h0_ok = tl.where(chunk == 0, lane_ok, False)
        carry_re, carry_im = _split_vec(tl.load(h0_ptr + state_off, mask=h0_ok, other=0.0).to(ACC),
                                        IS_COMPLEX, BLOCK_D)
    if BACKWARD and HAS_H0:  # h_0, the state before the first forward step, for dL/da there
        init_re, init_im = _split_vec(tl.load(h0_ptr + state_off, mask=lane_ok, other=0.0).to(ACC),
                                      IS_COMPLEX, BLOCK_D)
    if GRAD_A_SUM:
        ga_sum_re = tl.zeros((BLOCK_D,), ACC)
        ga_sum_im = tl.zeros((BLOCK_D,), ACC)

    # The walk is software-pipelined in two stages, forward and backward: Triton's pipeliner turns
    # the tile loads into 16-byte cp.async copies into shared memory issued one iteration ahead, so
    # the next tile's loads are in flight while this tile is scanned. The loop counter ascends in
    # scan order; a downward scan maps it to descending times (t0 below). LOOKBACK: one tile.
    PIPELINE: tl.constexpr = 2 if not LOOKBACK else 1
    for tile_start in tl.range(sweep_begin, sweep_end, BLOCK_T, num_stages=PIPELINE):
        step = tile_start + rows                    # how many steps into the sweep
        if SCAN_DOWN:
            t0 = end - 1 - tile_start
        else:
            t0 = start + tile_start
        t = t0 + DIR * rows
        row_ok = step < sweep_end
        mask = row_ok[:, None] & chan_ok[None, :]        # (BLOCK_T, BLOCK_D): elements
        lane_mask = row_ok[:, None] & lane_ok[None, :]   # (BLOCK_T, BLOCK_D * W): scalars in memory
        base = (row_base + t0) * (D * W)                 # int64 scalar; + int32 offsets in the tile

        if BACKWARD:
            # g_t = dL/dh_t + conj(a_{t + FWD_STEP}) g_{t + FWD_STEP}: the coefficient
            # comes from the forward step after t, and is 0 past the sequence end.
            t_coef = t + FWD_STEP
            coef_ok = lane_mask & ((t_coef >= start) & (t_coef < end))[:, None]
        else:
            t_coef = t
            coef_ok = lane_mask
        a_off = a_base + t_coef.to(tl.int64)[:, None] * (stride_at * W)
        a_re, a_im = _split_tile(tl.load(a_ptr + a_off, mask=coef_ok, other=0.0).to(ACC),
                                 IS_COMPLEX, BLOCK_T, BLOCK_D)
        # The identity map (a = 1, x = 0) in padded rows keeps the last row equal
        # to the tile's end map.
        a_re = tl.where(mask, a_re, 1.0)
        x_re, x_im = _split_tile(tl.load(x_ptr + base + tile_off, mask=lane_mask, other=0.0).to(ACC),
                                 IS_COMPLEX, BLOCK_T, BLOCK_D)
        if IS_COMPLEX:
            if BACKWARD:
                a_im = -a_im  # conjugate
            A_re, A_im, X_re, X_im = tl.associative_scan((a_re, a_im, x_re, x_im), 0, _combine_complex)
            agg_pi = _last_row(A_im, rows, BLOCK_T)
            agg_si = _last_row(X_im, rows, BLOCK_T)
        else:
            A_re, X_re = tl.associative_scan((a_re, x_re), 0, _combine_real)
            A_im = A_re  # unused
            agg_pi = carry_im  # zeros, unused
            agg_si = carry_im
        agg_pr = _last_row(A_re, rows, BLOCK_T)     # the tile as one map h -> agg_p h + agg_s
        agg_sr = _last_row(X_re, rows, BLOCK_T)

        if LOOKBACK:
            # The chunk's aggregate map, for successors that look back before this chunk
            # knows its entering state (chunk 0 knows it already; the last chunk has no successor).
            is_pub = chunk < last_chunk
            pub_agg = is_pub & (chunk > 0)
            agg_ok = tl.where(pub_agg, lane_ok, False)
            tl.store(ws_chunk, _join_vec(agg_pr, agg_pi, IS_COMPLEX, BLOCK_D), mask=agg_ok)
            tl.store(ws_chunk + D * W, _join_vec(agg_sr, agg_si, IS_COMPLEX, BLOCK_D), mask=agg_ok)
            set_flag(flag_ptr, 1, pub_agg)
            # Look back: the entering state is (P_{k-1} o ... o P_{j+1}) applied to the inclusive
            # prefix of the nearest predecessor j that has published one; (acc_p, acc_s) holds
            # the composed map of the aggregates passed so far.
            acc_pr = tl.full((BLOCK_D,), 1.0, ACC)
            acc_pi = tl.zeros((BLOCK_D,), ACC)
            acc_sr = tl.zeros((BLOCK_D,), ACC)
            acc_si = tl.zeros((BLOCK_D,), ACC)
            j = chunk - 1
            looking = chunk > 0
            while looking:
                status = read_flag(chunk_flag(sync_ptr, j, seq, pid_d, n_dblk, N))
                has_inclusive = status == 2
                has_aggregate = status == 1
                inc_ok = tl.where(has_inclusive, lane_ok, False)  # lane masks (not scalar & vector:
                pay_ok = tl.where(has_aggregate, lane_ok, False)  # the interpreter mistypes that)
                ws_j = ws_ptr + (j.to(tl.int64) * N + seq) * (3 * D * W) + lanes
                inc_re, inc_im = _split_vec(tl.load(ws_j + 2 * D * W, mask=inc_ok, other=0.0, cache_modifier=".cg"),
                                            IS_COMPLEX, BLOCK_D)
                # (p, s) where no aggregate was read are never used: the tl.where below keep acc.
                p_re, p_im = _split_vec(tl.load(ws_j, mask=pay_ok, other=0.0, cache_modifier=".cg"),
                                        IS_COMPLEX, BLOCK_D)
                s_re, s_im = _split_vec(tl.load(ws_j + D * W, mask=pay_ok, other=0.0, cache_modifier=".cg"),
                                        IS_COMPLEX, BLOCK_D)
                # Found: carry = acc applied to the predecessor's true end state.
                c_re, c_im = _apply(acc_pr, acc_pi, acc_sr, acc_si, inc_re, inc_im, IS_COMPLEX)
                carry_re = tl.where(has_inclusive, c_re, carry_re)
                carry_im = tl.where(has_inclusive, c_im, carry_im)
                # An aggregate: acc <- acc o (p, s) = (acc_p p, acc_p s + acc_s).
                n_sr, n_si = _apply(acc_pr, acc_pi, acc_sr, acc_si, s_re, s_im, IS_COMPLEX)
                if IS_COMPLEX:
                    n_pr = _saturate(acc_pr * p_re - acc_pi * p_im)
                    n_pi = _saturate(acc_pr * p_im + acc_pi * p_re)
                else:
                    n_pr = _saturate(acc_pr * p_re)
                    n_pi = acc_pi
                acc_sr = tl.where(has_aggregate, n_sr, acc_sr)
                acc_si = tl.where(has_aggregate, n_si, acc_si)
                acc_pr = tl.where(has_aggregate, n_pr, acc_pr)
                acc_pi = tl.where(has_aggregate, n_pi, acc_pi)
                j = j - has_aggregate.to(tl.int32)
                looking = status != 2
            # The true state at this chunk's end, for the successors.
            inc_re, inc_im = _apply(agg_pr, agg_pi, agg_sr, agg_si, carry_re, carry_im, IS_COMPLEX)
            tl.store(ws_chunk + 2 * D * W, _join_vec(inc_re, inc_im, IS_COMPLEX, BLOCK_D),
                     mask=tl.where(is_pub, lane_ok, False))
            set_flag(flag_ptr, 2, is_pub)

        if IS_COMPLEX:
            h_re = A_re * carry_re[None, :] - A_im * carry_im[None, :] + X_re
            h_im = A_re * carry_im[None, :] + A_im * carry_re[None, :] + X_im
        else:
            h_re = A_re * carry_re[None, :] + X_re
            h_im = h_re  # unused
        tl.store(out_ptr + base + tile_off,
                 _join_tile(h_re, h_im, IS_COMPLEX, BLOCK_T, BLOCK_D).to(out_ptr.dtype.element_ty), mask=lane_mask)
        carry_re, carry_im = _apply(agg_pr, agg_pi, agg_sr, agg_si, carry_re, carry_im, IS_COMPLEX)

        if BACKWARD:
            # dL/da_t = g_t * conj(h_{t - FWD_STEP}), with h_0 at the sequence start.
            t_prev = t - FWD_STEP
            prev_in = (t_prev >= start) & (t_prev < end)
            h_prev = h_ptr + (base - FWD_STEP * D * W) + tile_off
            hp_re, hp_im = _split_tile(tl.load(h_prev, mask=lane_mask & prev_in[:, None], other=0.0).to(ACC),
                                       IS_COMPLEX, BLOCK_T, BLOCK_D)
            if HAS_H0:
                at_start = mask & (~prev_in)[:, None]
                hp_re = tl.where(at_start, init_re[None, :], hp_re)
                if IS_COMPLEX:
                    hp_im = tl.where(at_start, init_im[None, :], hp_im)
            if IS_COMPLEX:
                ga_re = h_re * hp_re + h_im * hp_im
                ga_im = h_im * hp_re - h_re * hp_im
            else:
                ga_re = h_re * hp_re
                ga_im = ga_re  # unused
            if GRAD_A_SUM:  # a broadcast over time: this program's share of the sum over time
                ga_sum_re += tl.sum(tl.where(mask, ga_re, 0.0), axis=0)
                if IS_COMPLEX:
                    ga_sum_im += tl.sum(tl.where(mask, ga_im, 0.0), axis=0)
            else:
                tl.store(grad_a_ptr + base + tile_off,
                         _join_tile(ga_re, ga_im, IS_COMPLEX, BLOCK_T, BLOCK_D).to(grad_a_ptr.dtype.element_ty),
                         mask=lane_mask)

    if BACKWARD and GRAD_A_SUM:
        sum_off = (seq.to(tl.int64) * n_chunks + chunk) * (D * W) + lanes   # into (N, S, D[, 2])
        tl.store(grad_a_ptr + sum_off, _join_vec(ga_sum_re, ga_sum_im, IS_COMPLEX, BLOCK_D), mask=lane_ok)

    # dL/dh0 = conj(a_first) * g_first, "first" the first forward step: the carry
    # after the last step of the backward sweep, held by the chunk that ends it.
    if BACKWARD and chunk == last_chunk:
        if REVERSE:
            t_first = end - 1
        else:
            t_first = start
        first_ok = lane_ok & ((lanes * 0 + length) > 0)  # vector mask; empty sequences give 0
        af_off = (batch.to(tl.int64) * stride_ab + t_first.to(tl.int64) * stride_at) * W + a_lane
        af_re, af_im = _split_vec(tl.load(a_ptr + af_off, mask=first_ok, other=0.0).to(ACC), IS_COMPLEX, BLOCK_D)
        if IS_COMPLEX:
            gh0_re = af_re * carry_re + af_im * carry_im
            gh0_im = af_re * carry_im - af_im * carry_re
        else:
            gh0_re = af_re * carry_re
            gh0_im = gh0_re  # unused
        tl.store(grad_h0_ptr + state_off, _join_vec(gh0_re, gh0_im, IS_COMPLEX, BLOCK_D), mask=lane_ok)


def _config(dtype: torch.dtype, interpret: bool, D: int = 64) -> dict:
    """Tile sizes: ``BLOCK_T`` x ``BLOCK_D`` with ``num_warps`` for the walk, ``CHUNK_T`` x ``CHUNK_D``
    with ``chunk_warps`` for the look-back's one-tile chunks (held in registers). Tiles are small in
    the interpreter's own plan (``interpret``: no device model), whose scan costs a Python call
    per tile element. The backward walk runs ``walk_bwd_warps`` warps; ``walk_bwd_maxnreg`` /
    ``chunk_maxnreg``: the register ceiling ptxas is given for the backward walk / the look-back
    (launch option ``maxnreg``)."""
    if interpret:
        block_d = min(16, triton.next_power_of_2(max(D, 1)))
        cfg = dict(BLOCK_T=16, BLOCK_D=block_d, num_warps=1, CHUNK_T=64, CHUNK_D=block_d, chunk_warps=1)
    elif dtype in (torch.bfloat16, torch.float16):
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8, CHUNK_T=128, CHUNK_D=16, chunk_warps=4)
    elif dtype.is_complex:
        cfg = dict(BLOCK_T=32, BLOCK_D=32, num_warps=8, CHUNK_T=64, CHUNK_D=16, chunk_warps=4)
    else:
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8, CHUNK_T=128, CHUNK_D=16, chunk_warps=4)
    # GPU walk: 8 tile scalars per thread (a complex64 tile of 32 x 32 elements is 32 x 64 scalars).
    # Registers per thread from ptxas -v for sm_90a (forward / backward, fp32 | bf16): 142 / 255 |
    # 147 / 255 with 520 bytes of spills at the previous 4 warps (32 x 64 | 32 x 128 tiles); 58 / 97 |
    # 48 / 99 at 8 warps. complex64 at 32 x 64 elements took 105-109 forward but 151-156 backward
    # (one program per SM), hence 32 x 32. The pipelined backward walk (a, dL/dh and h of the next
    # tile in flight) runs 4 warps with ptxas allowed 255 registers (``walk_bwd_maxnreg``): at 8
    # warps ptxas, left to itself, picked 64-80 registers and spilled 8-16 bytes in some fp32 and
    # bf16 specialisations; capped at 128 (two programs of 8 warps per SM), bf16 still spilled
    # 8-24 bytes (Triton 3.9; 16 x 64 tiles: 8 bytes in one specialisation) and fp32 with dL/da
    # summed per program 8 bytes (Triton 3.6). At 4 warps: 166-255 registers x 128 threads, no
    # spills, two programs per SM, each with 2 x 3 tiles of 8 KB (fp32) in flight.
    # Look-back chunks: 128 steps (64 for complex64), so that the per-chunk workspace (three fp32
    # vectors written, one or more read) stays within about 1-2% of the bytes of a, x and h. The
    # tile (a, x, then A, X across the look-back) stays in registers. CI's static budget (two
    # programs per SM, no spills; tests/aot_compile.py --budget) decides its shape: 128 x 64 tiles
    # at 8 warps took 182-255 registers (one program per SM) and spilled 24-152 bytes; 128 x 32 at 8
    # warps, 128-180; 128 x 16 at 8 warps still 128-147 with spills (the backward's look-back, dL/da
    # and dL/dh0 code, not the tile, sets the floor). So: 128 x 16 tiles (16 elements a thread) at
    # 4 warps, with ptxas allowed 255 registers (``chunk_maxnreg``: ptxas otherwise caps itself at
    # 128 and spills): 108-195 registers x 128 threads, two programs per SM, no spills. The
    # channel count per chunk does not change the workspace's share of the traffic (per channel).
    cfg["walk_bwd_warps"] = 1 if interpret else 4
    cfg["walk_bwd_maxnreg"] = 255
    cfg["chunk_maxnreg"] = 255
    return config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps", "CHUNK_T", "CHUNK_D", "chunk_warps",
                                             "walk_bwd_warps", "walk_bwd_maxnreg", "chunk_maxnreg"))


def _launch_options(cfg: dict, lookback: bool, backward: bool) -> dict:
    """Launch options beyond the tile sizes: warps and the register ceiling (``maxnreg``)."""
    if lookback:
        return {"num_warps": cfg["chunk_warps"], "maxnreg": cfg["chunk_maxnreg"]}
    if backward:
        return {"num_warps": cfg["walk_bwd_warps"], "maxnreg": cfg["walk_bwd_maxnreg"]}
    return {"num_warps": cfg["num_warps"]}


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _max_len(T: int, cu_seqlens) -> int:
    return T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _auto_num_chunks(N: int, D: int, T: int, cu_seqlens, cfg: dict, model) -> int:
    """Chunks per sequence so that the GPU has enough programs in flight.

    One program per (sequence, channel block) walking its sequence leaves most of the GPU
    idle when sequences are long and few channels remain (B = 1, small D). Each sequence is
    then cut into chunks of ``CHUNK_T`` steps, one program each, joined by the decoupled
    look-back (still one pass over a and x). ``model``: the ``DeviceModel`` planned for (None:
    the interpreter's plan, one chunk).
    """
    if model is None:
        return 1
    programs = N * triton.cdiv(D, cfg["BLOCK_D"])
    if programs >= 4 * model.sm_count:
        return 1
    return max(1, triton.cdiv(_max_len(T, cu_seqlens), cfg["CHUNK_T"]))


def _plan(x: torch.Tensor, N: int, cu_seqlens, num_chunks: Optional[int]):
    """(cfg, S chunks per sequence, steps per chunk): S = 1 walks each sequence in one program;
    S > 1 runs one-tile chunks of a power-of-two length (<= CHUNK_T, >= 16) joined by look-back."""
    B, T, D = x.shape
    model = device_model(x.device)  # the CUDA device, LINREC_DEVICE_MODEL, or None (interpreter plan)
    cfg = _config(x.dtype, model is None, D)
    if num_chunks is None:
        num_chunks = _auto_num_chunks(N, D, T, cu_seqlens, cfg, model)
    if num_chunks > 1:
        max_len = _max_len(T, cu_seqlens)
        chunk_len = min(cfg["CHUNK_T"], max(16, triton.next_power_of_2(triton.cdiv(max(max_len, 1), num_chunks))))
        S = triton.cdiv(max(max_len, 1), chunk_len)
        if S > 1:
            return cfg, S, chunk_len
    return cfg, 1, max(T, 1)


def _sweep(a, x, h0, out, h, grad_a, grad_h0, cu_seqlens, reverse, backward, plan, grad_a_sum=False):
    """Runs one forward or backward sweep: one launch, plus a zeroed flag and ticket workspace
    and an uninitialised payload workspace when the plan cuts sequences into chunks."""
    B, T, D = x.shape
    N = num_sequences(B, cu_seqlens)
    if N == 0 or D == 0:
        return
    cfg, S, chunk_len = plan
    lookback = S > 1
    a_full = a.expand(B, T, D)
    a_real = _real(a_full)
    s_b, s_t, s_d = a_full.stride()  # in elements (the kernel scales them to scalars of the real view)
    dummy = _real(out)  # stands in for pointers a launch does not use
    block_d = cfg["CHUNK_D"] if lookback else cfg["BLOCK_D"]
    programs = triton.cdiv(D, block_d) * N * S
    if lookback:
        ws = _real(torch.empty((S, N, 3, D), dtype=accumulation_dtype(x.dtype), device=x.device))
        sync = torch.zeros((programs + 1,), dtype=torch.int32, device=x.device)
    else:
        ws = sync = dummy
    diagonal_scan_kernel[(programs,)](
        a_real, _real(x), _real(h0) if h0 is not None else dummy, _real(out),
        _real(h) if h is not None else dummy,
        _real(grad_a) if grad_a is not None else dummy,
        _real(grad_h0) if grad_h0 is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        ws, sync,
        T, D, N, chunk_len, s_b, s_t, s_d,
        HAS_H0=h0 is not None, VARLEN=cu_seqlens is not None, REVERSE=reverse, BACKWARD=backward,
        LOOKBACK=lookback, GRAD_A_SUM=grad_a_sum,
        IS_COMPLEX=x.is_complex(), ACC=tl_accumulation_dtype(x.dtype),
        BLOCK_T=chunk_len if lookback else cfg["BLOCK_T"], BLOCK_D=block_d,
        **_launch_options(cfg, lookback, backward),
    )


def diagonal_scan_forward(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                          cu_seqlens: Optional[torch.Tensor], reverse: bool,
                          num_chunks: Optional[int] = None) -> torch.Tensor:
    """States of ``h_t = a_t * h_{t-1} + x_t``, in one launch and one pass over a and x.

    Args:
        a: broadcastable to (B, T, D), same real/complex kind as x (strides kept, broadcast is free).
        x: (B, T, D) float32 | bfloat16 | float16 | float64 | complex64 | complex128.
        initial_state: (N, D) or None. cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.
        num_chunks: cut each sequence into about this many chunks run in parallel and joined by
            look-back (chunks are a power of two of steps, 16 to ``CHUNK_T``; None: chosen from
            the device and the shape; 1 on the CPU interpreter unless LINREC_DEVICE_MODEL names
            a GPU to plan for).

    Returns:
        h: (B, T, D) in x's dtype.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    h0 = initial_state.contiguous() if initial_state is not None else None
    plan = _plan(x, num_sequences(x.shape[0], cu_seqlens), cu_seqlens, num_chunks)
    _sweep(a, x, h0, out, None, None, None, cu_seqlens, reverse, False, plan)
    return out


def diagonal_scan_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                           initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                           reverse: bool, x_dtype: torch.dtype, num_chunks: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan in one launch (the reverse scan, dL/da and dL/dh0 fused in).

    Args:
        a: as forward; h: (B, T, D) forward states; grad_h: (B, T, D) dL/dh (any strides).
        initial_state: (N, D) or None; x_dtype: dtype for dL/dx; num_chunks: as forward.

    Returns:
        grad_a: (B, T, D) in a's dtype when a is full-size; when a is broadcast over time (e.g.
        (D,)), the kernel's per-program sums over time added up, (B, 1, D) (1 row when packed) in
        the accumulation dtype; for other broadcasts, (B, T, D) in the accumulation dtype (summing
        over broadcast dims is the caller's);
        grad_x: (B, T, D) in x_dtype, grad_initial_state: (N, D) in the accumulation dtype.
    """
    B, T, D = h.shape
    N = num_sequences(B, cu_seqlens)
    acc = accumulation_dtype(h.dtype)
    grad_h = grad_h.contiguous()
    h = h.contiguous()
    plan = _plan(h, N, cu_seqlens, num_chunks)
    S = plan[1]
    full = tuple(a.shape) == (B, T, D)
    over_time = not full and (a.dim() < 2 or a.shape[-2] == 1)
    if full:
        grad_a = torch.empty((B, T, D), dtype=a.dtype, device=h.device)
    elif over_time:  # one partial sum per program: (N, S, D)
        grad_a = torch.empty((N, S, D), dtype=acc, device=h.device)
    else:  # broadcast over batch or channels only: summed by the caller, in the accumulation dtype
        grad_a = torch.empty((B, T, D), dtype=acc, device=h.device)
    grad_x = torch.empty((B, T, D), dtype=x_dtype, device=h.device)
    grad_h0 = torch.empty((N, D), dtype=acc, device=h.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    _sweep(a, grad_h, h0, grad_x, h, grad_a, grad_h0, cu_seqlens, reverse, True, plan, grad_a_sum=over_time)
    if over_time:
        grad_a = grad_a.sum(1)
        if cu_seqlens is not None:
            grad_a = grad_a.sum(0, keepdim=True)
        grad_a = grad_a[:, None, :]
    return grad_a, grad_x, grad_h0


# Streaming kernels held to CI's static budget at sm_90a (tests/aot_compile.py --budget): no spills,
# two programs per SM by registers, vector loads and stores of x's element type in the tile loop
# (forward: a and x loaded, h stored; backward: a, dL/dh and h loaded, dL/dx stored). Every
# specialisation aot_specs lists is held to it: fp32, bf16 and complex64 (whose tiles are loaded as
# rows of interleaved real and imaginary scalars, so its accesses are vectors as well), walk and
# look-back, forward and backward, with Triton 3.9 and 3.6.
STATIC_BUDGET = {
    "diagonal_scan_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr", "min_vector_loads": 2,
                             "min_vector_stores": 1},
}


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for every launch the GPU launcher makes:
    walk and look-back, forward and backward (dL/da full-size in a's dtype, summed per program for
    an a broadcast over time, and, for bf16, full-size in fp32 for an a broadcast over batch or
    channels only).

    float16 takes bfloat16's code path and tile sizes, so bfloat16 stands for both.
    """
    for dtype_name, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                    ("complex64", torch.complex64)):
        elem = "fp32" if dtype_name == "complex64" else dtype_name
        cfg = _config(torch_dtype, interpret=False)
        for backward in (False, True):
            grad_modes = [(elem, False)]
            if backward:
                grad_modes += [("fp32", True)] + ([("fp32", False)] if elem != "fp32" else [])
            for grad_a_type, grad_a_sum in grad_modes:
                sig = {
                    "a_ptr": f"*{elem}", "x_ptr": f"*{elem}", "h0_ptr": f"*{elem}",
                    "out_ptr": f"*{elem}", "h_ptr": f"*{elem}", "grad_a_ptr": f"*{grad_a_type}",
                    "grad_h0_ptr": "*fp32", "cu_seqlens_ptr": "*i32", "ws_ptr": "*fp32", "sync_ptr": "*i32",
                    "T": "i32", "D": "i32", "N": "i32", "CHUNK_LEN": "i32",
                    "stride_ab": "i64", "stride_at": "i64", "stride_ad": "i64",
                }
                for reverse in (False, True):
                    for varlen in (False, True):
                        for lookback in (False, True):
                            constexprs = dict(HAS_H0=True, VARLEN=varlen, REVERSE=reverse, BACKWARD=backward,
                                              LOOKBACK=lookback, GRAD_A_SUM=grad_a_sum,
                                              IS_COMPLEX=dtype_name == "complex64", ACC=tl.float32,
                                              BLOCK_T=cfg["CHUNK_T"] if lookback else cfg["BLOCK_T"],
                                              BLOCK_D=cfg["CHUNK_D"] if lookback else cfg["BLOCK_D"])
                            # a's channel stride is 1 element (full-size or broadcast over time,
                            # complex64 too: the kernel takes a's strides in elements; the JIT
                            # specialises an integer 1 to a constant), and at the GPU goals' shapes
                            # (D = 64 .. 1024, T = 2^13 ..) the sizes and row strides are multiples of 16.
                            constexprs["stride_ad"] = 1
                            options = {"divisible_by_16": [name for name in sig if sig[name].startswith("*")]
                                       + ["T", "D", "CHUNK_LEN", "stride_ab", "stride_at"]}
                            launch = _launch_options(cfg, lookback, backward)
                            num_warps = launch.pop("num_warps")
                            if launch:
                                options["compile_options"] = launch
                            yield diagonal_scan_kernel, sig, constexprs, num_warps, options
