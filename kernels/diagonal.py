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

Complex tensors arrive as their real views (trailing dimension 2) and each part is carried as
its own fp32 tile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from linrec._common import accumulation_dtype, num_sequences

from . import config_override, device_model, tl_accumulation_dtype
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
def _store_vec(ptr, vr, vi, chans, mask, W: tl.constexpr, IS_COMPLEX: tl.constexpr):
    """Stores a (BLOCK_D,) vector (real and imaginary parts) at ``ptr`` + chans."""
    tl.store(ptr + chans * W, vr, mask=mask)
    if IS_COMPLEX:
        tl.store(ptr + chans * W + 1, vi, mask=mask)


@triton.jit
def _set_flag(flag_ptr, value, go):
    """Sets a chunk's flag (when ``go``) after its payload: the barrier makes every thread's
    payload stores happen before the one thread that writes the flag goes on, and the release
    makes them visible to any program that reads the flag with acquire semantics."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, mask=go, sem="release")


@triton.jit
def diagonal_scan_kernel(
    a_ptr,            # coefficients, real view, strides given below (may be 0: broadcast)
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
    stride_ab, stride_at, stride_ad,
    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, BACKWARD: tl.constexpr,
    LOOKBACK: tl.constexpr, GRAD_A_SUM: tl.constexpr,
    IS_COMPLEX: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_dblk = tl.cdiv(D, BLOCK_D)
    n_programs = tl.num_programs(0)
    if LOOKBACK:
        # Programs own chunks in the order they take tickets, chunk-major: (chunk, sequence, channel block).
        ticket = tl.atomic_add(sync_ptr + n_programs, 1)
    else:
        ticket = tl.program_id(0)
    pid_d = ticket % n_dblk
    seq = (ticket // n_dblk) % N
    chunk = ticket // (n_dblk * N)
    n_chunks = n_programs // (n_dblk * N)
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

    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    chan_ok = chans < D
    rows = tl.arange(0, BLOCK_T)
    row_base = batch.to(tl.int64) * T  # global time index of this batch row's t = 0
    a_base = batch.to(tl.int64) * stride_ab + chans.to(tl.int64)[None, :] * stride_ad
    state_off = (seq.to(tl.int64) * D + chans) * W                    # into (N, D[, 2])
    # Offsets inside a tile, relative to its row 0 (int32: BLOCK_T x D x 2 < 2^31).
    tile_off = (DIR * rows)[:, None] * (D * W) + (chans * W)[None, :]
    if LOOKBACK:
        ws_chunk = ws_ptr + (chunk.to(tl.int64) * N + seq) * (3 * D * W)   # this chunk's 3 payloads
        flag_base = sync_ptr + seq * n_dblk + pid_d                         # + chunk * N * n_dblk

    # Carried state: h (forward) or g = dL/dx (backward), real and imaginary parts.
    carry_re = tl.zeros((BLOCK_D,), ACC)
    carry_im = tl.zeros((BLOCK_D,), ACC)
    if HAS_H0 and not BACKWARD:
        h0_ok = tl.where(chunk == 0, chan_ok, False)
        carry_re = tl.load(h0_ptr + state_off, mask=h0_ok, other=0.0).to(ACC)
        if IS_COMPLEX:
            carry_im = tl.load(h0_ptr + state_off + 1, mask=h0_ok, other=0.0).to(ACC)
    if GRAD_A_SUM:
        ga_sum_re = tl.zeros((BLOCK_D,), ACC)
        ga_sum_im = tl.zeros((BLOCK_D,), ACC)

    # Forward walk: the loop is software-pipelined in two stages (Triton's pipeliner turns the tile
    # loads into 16-byte cp.async copies into shared memory issued one iteration ahead), so the next
    # tile's a and x are in flight while this tile is scanned. The backward walk is not: pipelined,
    # ptxas of Triton 3.9 spills 8-16 bytes in three fp32 specialisations. LOOKBACK: one tile.
    PIPELINE: tl.constexpr = 2 if not LOOKBACK and not BACKWARD else 1
    for tile_start in tl.range(sweep_begin, sweep_end, BLOCK_T, num_stages=PIPELINE):
        step = tile_start + rows                    # how many steps into the sweep
        if SCAN_DOWN:
            t0 = end - 1 - tile_start
        else:
            t0 = start + tile_start
        t = t0 + DIR * rows
        row_ok = step < sweep_end
        mask = row_ok[:, None] & chan_ok[None, :]
        base = (row_base + t0) * D * W               # int64 scalar; + int32 offsets in the tile
        x_tile = x_ptr + base
        out_tile = out_ptr + base

        if BACKWARD:
            # g_t = dL/dh_t + conj(a_{t + FWD_STEP}) g_{t + FWD_STEP}: the coefficient
            # comes from the forward step after t, and is 0 past the sequence end.
            t_coef = t + FWD_STEP
            coef_ok = mask & ((t_coef >= start) & (t_coef < end))[:, None]
        else:
            t_coef = t
            coef_ok = mask
        a_off = a_base + t_coef.to(tl.int64)[:, None] * stride_at
        a_re = tl.load(a_ptr + a_off, mask=coef_ok, other=0.0).to(ACC)
        # The identity map (a = 1, x = 0) in padded rows keeps the last row equal
        # to the tile's end map.
        a_re = tl.where(mask, a_re, 1.0)
        x_re = tl.load(x_tile + tile_off, mask=mask, other=0.0).to(ACC)
        if IS_COMPLEX:
            a_im = tl.load(a_ptr + a_off + 1, mask=coef_ok, other=0.0).to(ACC)
            if BACKWARD:
                a_im = -a_im  # conjugate
            x_im = tl.load(x_tile + tile_off + 1, mask=mask, other=0.0).to(ACC)
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
            flag_ptr = flag_base + chunk * (N * n_dblk)
            pub_agg = is_pub & (chunk > 0)
            _store_vec(ws_chunk, agg_pr, agg_pi, chans, tl.where(pub_agg, chan_ok, False), W, IS_COMPLEX)
            _store_vec(ws_chunk + D * W, agg_sr, agg_si, chans, tl.where(pub_agg, chan_ok, False), W, IS_COMPLEX)
            _set_flag(flag_ptr, 1, pub_agg)
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
                status = tl.atomic_add(flag_base + j * (N * n_dblk), 0, sem="acquire")
                has_inclusive = status == 2
                has_aggregate = status == 1
                inc_ok = tl.where(has_inclusive, chan_ok, False)  # lane masks (not scalar & vector:
                agg_ok = tl.where(has_aggregate, chan_ok, False)  # the interpreter mistypes that)
                ws_j = ws_ptr + (j.to(tl.int64) * N + seq) * (3 * D * W) + chans * W
                inc_re = tl.load(ws_j + 2 * D * W, mask=inc_ok, other=0.0,
                                 cache_modifier=".cg")
                p_re = tl.load(ws_j, mask=agg_ok, other=1.0, cache_modifier=".cg")
                s_re = tl.load(ws_j + D * W, mask=agg_ok, other=0.0, cache_modifier=".cg")
                if IS_COMPLEX:
                    inc_im = tl.load(ws_j + 2 * D * W + 1, mask=inc_ok, other=0.0,
                                     cache_modifier=".cg")
                    p_im = tl.load(ws_j + 1, mask=agg_ok, other=0.0, cache_modifier=".cg")
                    s_im = tl.load(ws_j + D * W + 1, mask=agg_ok, other=0.0,
                                   cache_modifier=".cg")
                else:
                    inc_im = acc_pi
                    p_im = acc_pi
                    s_im = acc_pi
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
            _store_vec(ws_chunk + 2 * D * W, inc_re, inc_im, chans, tl.where(is_pub, chan_ok, False), W, IS_COMPLEX)
            _set_flag(flag_ptr, 2, is_pub)

        if IS_COMPLEX:
            h_re = A_re * carry_re[None, :] - A_im * carry_im[None, :] + X_re
            h_im = A_re * carry_im[None, :] + A_im * carry_re[None, :] + X_im
            tl.store(out_tile + tile_off + 1, h_im.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            h_re = A_re * carry_re[None, :] + X_re
        tl.store(out_tile + tile_off, h_re.to(out_ptr.dtype.element_ty), mask=mask)
        carry_re, carry_im = _apply(agg_pr, agg_pi, agg_sr, agg_si, carry_re, carry_im, IS_COMPLEX)

        if BACKWARD:
            # dL/da_t = g_t * conj(h_{t - FWD_STEP}), with h_0 at the sequence start.
            t_prev = t - FWD_STEP
            prev_in = (t_prev >= start) & (t_prev < end)
            h_prev = h_ptr + (base - FWD_STEP * D * W) + tile_off
            prev_mask = mask & prev_in[:, None]
            hp_re = tl.load(h_prev, mask=prev_mask, other=0.0).to(ACC)
            if IS_COMPLEX:
                hp_im = tl.load(h_prev + 1, mask=prev_mask, other=0.0).to(ACC)
            if HAS_H0:
                init_re = tl.load(h0_ptr + state_off, mask=chan_ok, other=0.0).to(ACC)
                at_start = mask & (~prev_in)[:, None]
                hp_re = tl.where(at_start, init_re[None, :], hp_re)
                if IS_COMPLEX:
                    init_im = tl.load(h0_ptr + state_off + 1, mask=chan_ok, other=0.0).to(ACC)
                    hp_im = tl.where(at_start, init_im[None, :], hp_im)
            if IS_COMPLEX:
                ga_re = h_re * hp_re + h_im * hp_im
                ga_im = h_im * hp_re - h_re * hp_im
            else:
                ga_re = h_re * hp_re
            if GRAD_A_SUM:  # a broadcast over time: this program's share of the sum over time
                ga_sum_re += tl.sum(tl.where(mask, ga_re, 0.0), axis=0)
                if IS_COMPLEX:
                    ga_sum_im += tl.sum(tl.where(mask, ga_im, 0.0), axis=0)
            else:
                tl.store(grad_a_ptr + base + tile_off, ga_re.to(grad_a_ptr.dtype.element_ty), mask=mask)
                if IS_COMPLEX:
                    tl.store(grad_a_ptr + base + tile_off + 1, ga_im.to(grad_a_ptr.dtype.element_ty), mask=mask)

    if BACKWARD and GRAD_A_SUM:
        sum_off = ((seq.to(tl.int64) * n_chunks + chunk) * D + chans) * W   # into (N, S, D[, 2])
        tl.store(grad_a_ptr + sum_off, ga_sum_re, mask=chan_ok)
        if IS_COMPLEX:
            tl.store(grad_a_ptr + sum_off + 1, ga_sum_im, mask=chan_ok)

    # dL/dh0 = conj(a_first) * g_first, "first" the first forward step: the carry
    # after the last step of the backward sweep, held by the chunk that ends it.
    if BACKWARD and chunk == last_chunk:
        if REVERSE:
            t_first = end - 1
        else:
            t_first = start
        first_ok = chan_ok & ((chans * 0 + length) > 0)  # vector mask; empty sequences give 0
        af_off = batch.to(tl.int64) * stride_ab + t_first.to(tl.int64) * stride_at + chans.to(tl.int64) * stride_ad
        af_re = tl.load(a_ptr + af_off, mask=first_ok, other=0.0).to(ACC)
        if IS_COMPLEX:
            af_im = tl.load(a_ptr + af_off + 1, mask=first_ok, other=0.0).to(ACC)
            tl.store(grad_h0_ptr + state_off, af_re * carry_re + af_im * carry_im, mask=chan_ok)
            tl.store(grad_h0_ptr + state_off + 1, af_re * carry_im - af_im * carry_re, mask=chan_ok)
        else:
            tl.store(grad_h0_ptr + state_off, af_re * carry_re, mask=chan_ok)


def _config(dtype: torch.dtype, interpret: bool, D: int = 64) -> dict:
    """Tile sizes: ``BLOCK_T`` x ``BLOCK_D`` with ``num_warps`` for the walk, ``CHUNK_T`` x ``CHUNK_D``
    with ``chunk_warps`` for the look-back's one-tile chunks (held in registers). Tiles are small in
    the interpreter's own plan (``interpret``: no device model), whose scan costs a Python call
    per tile element."""
    if interpret:
        block_d = min(16, triton.next_power_of_2(max(D, 1)))
        cfg = dict(BLOCK_T=16, BLOCK_D=block_d, num_warps=1, CHUNK_T=64, CHUNK_D=block_d, chunk_warps=1)
    elif dtype in (torch.bfloat16, torch.float16):
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8, CHUNK_T=128, CHUNK_D=16, chunk_warps=4)
    elif dtype.is_complex:
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8, CHUNK_T=64, CHUNK_D=16, chunk_warps=4)
    else:
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8, CHUNK_T=128, CHUNK_D=16, chunk_warps=4)
    # GPU walk: 8 tile elements per thread. Registers per thread from ptxas -v for sm_90a (forward /
    # backward, fp32 | bf16): 142 / 255 | 147 / 255 with 520 bytes of spills at the previous
    # 4 warps (32 x 64 | 32 x 128 tiles); 58 / 97 | 48 / 99 at 8 warps.
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
    cfg["chunk_maxnreg"] = 255
    return config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps", "CHUNK_T", "CHUNK_D", "chunk_warps",
                                             "chunk_maxnreg"))


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
    a_real = _real(a.expand(B, T, D))
    s_b, s_t, s_d = a_real.stride()[:3]
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
        num_warps=cfg["chunk_warps"] if lookback else cfg["num_warps"],
        **({"maxnreg": cfg["chunk_maxnreg"]} if lookback else {}),
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
# (forward: a and x loaded, h stored; backward: a, dL/dh and h loaded, dL/dx stored).
STATIC_BUDGET = {
    "diagonal_scan_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr", "min_vector_loads": 2,
                             "min_vector_stores": 1},
}


def _under_static_budget(dtype_name: str, reverse: bool, backward: bool, varlen: bool, lookback: bool,
                         grad_a_sum: bool) -> bool:
    """Whether CI holds this specialisation to STATIC_BUDGET. Two are left out, for stated reasons:

    * complex64: real and imaginary parts are loaded and stored as two stride-2 streams, so every
      access is a scalar 32-bit one (and the walk takes 144-200 registers at 8 warps). Vector
      accesses need the tile loaded as (BLOCK_T, 2 BLOCK_D) reals and split (``tl.split``): not done.
    * fp32 walk, backward of a reverse scan, packed sequences off: ptxas of Triton 3.9 (the CPU
      machines') picks 64 registers by its own heuristic and spills 24 bytes (no tile size
      changes that: 16 x 64 and 32 x 128 tiles spill too, 4 warps moves the spill to the packed
      variant); the GPU machines' Triton 3.6 compiles it without spills, and is checked.
    """
    if dtype_name == "complex64":
        return False
    if (dtype_name == "fp32" and backward and reverse and not varlen and not lookback and not grad_a_sum
            and not triton.__version__.startswith("3.6")):
        return False
    return True


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
                            # a's channel stride is 1 (full-size or broadcast over time; the
                            # JIT specialises an integer 1 to a constant), and at the GPU goals'
                            # shapes (D = 64 .. 1024, T = 2^13 ..) the sizes and row strides are
                            # multiples of 16.
                            constexprs["stride_ad"] = 1
                            options = {"divisible_by_16": [name for name in sig if sig[name].startswith("*")]
                                       + ["T", "D", "CHUNK_LEN", "stride_ab", "stride_at"]}
                            if lookback:
                                options["compile_options"] = {"maxnreg": cfg["chunk_maxnreg"]}
                            options["budget"] = _under_static_budget(dtype_name, reverse, backward, varlen,
                                                                     lookback, grad_a_sum)
                            yield (diagonal_scan_kernel, sig, constexprs,
                                   cfg["chunk_warps"] if lookback else cfg["num_warps"], options)
