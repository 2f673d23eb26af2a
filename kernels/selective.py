"""Triton kernels for the selective scan (Mamba): the expanded state lives in registers only.

Recurrence (per channel d and state n; see ``linrec.selective.reference``)::

    dt_t = softplus(delta_t + bias) (or delta_t + bias);  abar_t = exp(dt_t A) (or 2 exp(dt_t A) - 1)
    h_t  = abar_t h_{t-1} + dt_t B_t x_t;                  y_t = C_t . h_t + D x_t  (y <- y silu(z_t))

**Forward** (``selective_scan_fwd_kernel``). One program owns BLOCK_D channels of one sequence and
all N states of each (a (BLOCK_D, BLOCK_N) fp32 tile in registers) and steps through the
sequence's time axis, reading x, delta, z, B_t and C_t once per step and writing y once; the
expanded state never touches memory. Every program's channels read one group of B and C (the
launcher makes BLOCK_D divide D / G), so B_t and C_t are (BLOCK_N,) vectors. Grid:
(cdiv(D, BLOCK_D), N_seq). For training (``WRITE_CKPT``) it also stores the state entering every
segment of SEGMENT = 256 steps: the backward's checkpoints, 1/256 of the expanded state (for
N = 16, 1/8 of the bytes of a bf16 (B, T, D) tensor), which the op saves. The same kernel with
only ``WRITE_CKPT`` is the backward's checkpoint pass when no checkpoints were saved.

**Backward** (``selective_scan_bwd_kernel``), same grid, one launch. The program visits its
segments in reverse. For each it steps forward from the segment's checkpoint once, collecting the
states entering its 16 chunks of CHUNK = 16 steps in a (16, BLOCK_D, BLOCK_N) register tile; then
it visits the chunks in reverse, recomputes a chunk's 16 states into a (CHUNK, BLOCK_D, BLOCK_N)
register tile (rows written and read by one-hot selection: the row is a loop counter), and sweeps
the chunk backwards carrying ``m = abar_{i+1} g_{i+1}``, the adjoint state's contribution from the
next step, forming every gradient of the step from g_i = C_i g^y_i + m (the formulas are in
``linrec.selective.chunked.selective_scan_chunked_backward``). A segment's inputs are read three
times in a row (segment pass, chunk recompute, sweep): once from memory, then from cache; no state
goes to memory. dx, ddelta and dz are stored in their inputs' dtypes. dL/dB_t and dL/dC_t are
summed over the program's channels in registers and over channel blocks by fp32 atomic adds into
(B, T, G, N); dL/dA, dL/dD and dL/d(delta_bias) are accumulated in registers over the sequence
and summed over sequences by atomic adds.

Plain pointer arithmetic with masks (no block pointers), so the code compiles with Triton 3.6
and later. Direction, packing, softplus and negative eigenvalues are runtime flags; optional
tensors are constexpr flags. All offsets are 64-bit.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config_override, device_model

# Steps per chunk of the backward, whose states it recomputes into a (CHUNK, BLOCK_D, BLOCK_N)
# register tile, and steps per segment, whose entering state the checkpoint pass stores (a
# segment's chunk-entering states are held in a (SEGMENT / CHUNK, BLOCK_D, BLOCK_N) register tile).
CHUNK = 16
SEGMENT = 256
# Registers a backward thread may use: its register tiles need 100-170, and ptxas left to itself
# caps some specialisations at 128 and spills.
BACKWARD_MAXNREG = 255
# Largest N the kernels take (BLOCK_N = next power of two).
MAX_STATE = 256


@triton.jit
def _softplus(v):
    """log(1 + exp(v)), accurate for exp(v) << 1 (Kahan's log1p), and v itself above 20."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def _bounds(cu_seqlens_ptr, seq, T, VARLEN):
    """(batch row, first index, end index) of sequence ``seq`` along T, 64-bit."""
    batch = seq.to(tl.int64)
    start = batch * 0
    end = start + T
    if VARLEN:
        batch = batch * 0
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    return batch, start, end


@triton.jit
def _program_setup(A_ptr, D_ptr, bias_ptr, cu_seqlens_ptr, pid_d, seq, T, DIM, NSTATE, CH_PER_GROUP,
                   stride_bg, stride_cg, VARLEN, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a program of either kernel needs before its sweep: the sequence's bounds, its channels
    and states with their masks, the offsets of its group in B and C, A, delta_bias and D for its
    channels (zeros when absent), and the offsets of its tile in an (N_seq, D, N) state tensor."""
    batch, start, end = _bounds(cu_seqlens_ptr, seq, T, VARLEN)
    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    chan_ok = chans < DIM
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < NSTATE
    tile_ok = chan_ok[:, None] & n_ok[None, :]
    group = (pid_d * BLOCK_D) // CH_PER_GROUP
    group_off_b = group.to(tl.int64) * stride_bg
    group_off_c = group.to(tl.int64) * stride_cg
    A = tl.load(A_ptr + chans[:, None] * NSTATE + ns[None, :], mask=tile_ok, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + chans, mask=chan_ok, other=0.0).to(ACC)
    state_off = (seq.to(tl.int64) * DIM + chans)[:, None] * NSTATE + ns[None, :]
    return (batch, start, end, chans, chan_ok, ns, n_ok, tile_ok, group_off_b, group_off_c, A, bias, Dv,
            state_off)


@triton.jit
def _step_inputs(x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                 group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS: tl.constexpr,
                 ACC: tl.constexpr):
    """Step i of the sweep (time t = start + i, or end - 1 - i in reverse): t, the offset of
    (batch, t) in a (B, T, D) tensor, x_t, the pre-activation of dt, dt_t, exp(dt_t A), abar_t, B_t."""
    t = start + i
    if REVERSE:
        t = end - 1 - i
    off = (batch * T + t) * DIM + chans
    xv = tl.load(x_ptr + off, mask=chan_ok, other=0.0).to(ACC)
    pre = tl.load(delta_ptr + off, mask=chan_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        pre = pre + bias
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    expo = tl.exp(dt[:, None] * A)
    abar = expo
    if NEG:
        abar = 2.0 * expo - 1.0
    bvec = tl.load(B_ptr + batch * stride_bb + t * stride_bt + group_off_b + ns, mask=n_ok, other=0.0).to(ACC)
    return t, off, xv, pre, dt, expo, abar, bvec


@triton.jit
def _checkpoint_row(seq, start, NUM_SEGS, VARLEN, SEG_T: tl.constexpr):
    """Row of a sequence's first segment in the (rows, D, N) checkpoint tensor: ``seq * NUM_SEGS``,
    or for packed sequences ``start // SEG_T + seq`` (rows cdiv(T, SEG_T) + N_seq in all: a sequence
    starting at ``start`` with L steps needs cdiv(L, SEG_T) rows, and these ranges never overlap)."""
    row = seq.to(tl.int64) * NUM_SEGS
    if VARLEN:
        row = start // SEG_T + seq.to(tl.int64)
    return row


@triton.jit
def selective_scan_fwd_kernel(
    x_ptr, delta_ptr,        # (B, T, D) contiguous
    A_ptr,                   # (D, N) contiguous
    B_ptr, C_ptr,            # (B, T, G, N), last dim contiguous; strides below
    D_ptr, z_ptr, bias_ptr,  # (D,), (B, T, D), (D,) when HAS_D / HAS_Z / HAS_BIAS
    h0_ptr,                  # (N_seq, D, N) when HAS_H0
    y_ptr,                   # (B, T, D) output (WRITE_Y)
    final_ptr,               # (N_seq, D, N) accumulation dtype (WRITE_Y)
    ckpt_ptr,                # (rows, D, N) accumulation dtype (WRITE_CKPT): see _checkpoint_row
    cu_seqlens_ptr,          # (N_seq + 1,) when VARLEN
    T, DIM, NSTATE, CH_PER_GROUP, NUM_SEGS,
    stride_bb, stride_bt, stride_bg, stride_cb, stride_ct, stride_cg,
    VARLEN, REVERSE, SOFTPLUS, NEG,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_CKPT: tl.constexpr, ACC: tl.constexpr, CHUNK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (channel block, sequence): y and the final state (WRITE_Y), and/or the state entering
    every segment of CHUNK_T steps (WRITE_CKPT: the backward's checkpoints)."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    (batch, start, end, chans, chan_ok, ns, n_ok, tile_ok, group_off_b, group_off_c, A, bias, Dv,
     state_off) = _program_setup(A_ptr, D_ptr, bias_ptr, cu_seqlens_ptr, pid_d, seq, T, DIM, NSTATE, CH_PER_GROUP,
                                 stride_bg, stride_cg, VARLEN, HAS_D, HAS_BIAS, ACC, BLOCK_D, BLOCK_N)
    length = end - start
    h = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=tile_ok, other=0.0).to(ACC)
    ck_row = _checkpoint_row(seq, start, NUM_SEGS, VARLEN, CHUNK_T)

    # One step per iteration; with WRITE_CKPT the state entering every CHUNK_T steps is stored first.
    for i in range(0, length):
        if WRITE_CKPT:
            if i % CHUNK_T == 0:
                ck_off = ((ck_row + i // CHUNK_T) * DIM + chans)[:, None] * NSTATE + ns[None, :]
                tl.store(ckpt_ptr + ck_off, h, mask=tile_ok)
        t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
            x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
            group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
        h = abar * h + (dt * xv)[:, None] * bvec[None, :]
        if WRITE_Y:
            cvec = tl.load(C_ptr + batch * stride_cb + t * stride_ct + group_off_c + ns,
                           mask=n_ok, other=0.0).to(ACC)
            y = tl.sum(h * cvec[None, :], axis=1)
            if HAS_D:
                y = y + Dv * xv
            if HAS_Z:
                zv = tl.load(z_ptr + off, mask=chan_ok, other=0.0).to(ACC)
                y = y * zv * tl.sigmoid(zv)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=chan_ok)
    if WRITE_Y:
        tl.store(final_ptr + state_off, h, mask=tile_ok)


@triton.jit
def selective_scan_bwd_kernel(
    x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,   # as the forward
    grad_y_ptr,              # (B, T, D) contiguous
    grad_final_ptr,          # (N_seq, D, N) when HAS_GRAD_FINAL
    ckpt_ptr,                # (rows, D, N): the state entering every segment of SEG_T steps (_checkpoint_row)
    cu_seqlens_ptr,
    grad_x_ptr,              # (B, T, D) in x's dtype
    grad_delta_ptr,          # (B, T, D) in delta's dtype
    grad_z_ptr,              # (B, T, D) in z's dtype, when HAS_Z
    grad_B_ptr, grad_C_ptr,  # (B, T, G, N) accumulation dtype, zero-filled: atomically summed over channels
    grad_A_ptr,              # (D, N) accumulation dtype, zero-filled: atomically summed over sequences
    grad_D_ptr,              # (D,) accumulation dtype, zero-filled, when HAS_D
    grad_bias_ptr,           # (D,) accumulation dtype, zero-filled, when HAS_BIAS
    grad_h0_ptr,             # (N_seq, D, N) accumulation dtype, when HAS_H0
    T, DIM, NSTATE, CH_PER_GROUP, NUM_SEGS, GROUPS,
    stride_bb, stride_bt, stride_bg, stride_cb, stride_ct, stride_cg,
    VARLEN, REVERSE, SOFTPLUS, NEG,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_GRAD_FINAL: tl.constexpr, ACC: tl.constexpr, CHUNK_T: tl.constexpr, SUBS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Reverse sweep of one (channel block, sequence): every gradient, the states recomputed in registers.

    A segment is SUBS chunks of CHUNK_T steps (SEG_T = SUBS * CHUNK_T). Segments are visited in
    reverse; for each, a forward pass from its checkpoint collects the states entering its chunks
    in a (SUBS, BLOCK_D, BLOCK_N) register tile; then its chunks are visited in reverse, each
    recomputing its CHUNK_T states into a (CHUNK_T, BLOCK_D, BLOCK_N) register tile and sweeping
    them backwards. Register tiles are written and read by one-hot selection along their first
    axis (the row index is a loop counter, not a constant). Nothing of the expanded state goes
    to memory: the inputs of a segment are read three times in a row (segment pass, chunk
    recompute, sweep), the second and third from cache."""
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    (batch, start, end, chans, chan_ok, ns, n_ok, tile_ok, group_off_b, group_off_c, A, bias, Dv,
     state_off) = _program_setup(A_ptr, D_ptr, bias_ptr, cu_seqlens_ptr, pid_d, seq, T, DIM, NSTATE, CH_PER_GROUP,
                                 stride_bg, stride_cg, VARLEN, HAS_D, HAS_BIAS, ACC, BLOCK_D, BLOCK_N)
    length = end - start
    group = (pid_d * BLOCK_D) // CH_PER_GROUP
    SEG_T: tl.constexpr = SUBS * CHUNK_T
    sub_rows = tl.arange(0, SUBS)[:, None, None]
    step_rows = tl.arange(0, CHUNK_T)[:, None, None]

    # m = abar_{i+1} g_{i+1}: what the adjoint state receives from the step after i.
    m = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    if HAS_GRAD_FINAL:
        m = tl.load(grad_final_ptr + state_off, mask=tile_ok, other=0.0).to(ACC)
    gA = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    gD = tl.zeros((BLOCK_D,), ACC)
    gBias = tl.zeros((BLOCK_D,), ACC)
    num_segs = (length + SEG_T - 1) // SEG_T
    ck_row = _checkpoint_row(seq, start, NUM_SEGS, VARLEN, SEG_T)
    for k in range(0, num_segs):
        sg = num_segs - 1 - k
        seg_start = sg * SEG_T
        seg_end = tl.minimum(seg_start + SEG_T, length)
        subs = (seg_end - seg_start + CHUNK_T - 1) // CHUNK_T
        ck_off = ((ck_row + sg) * DIM + chans)[:, None] * NSTATE + ns[None, :]
        h = tl.load(ckpt_ptr + ck_off, mask=tile_ok, other=0.0).to(ACC)
        # Segment pass: the states entering its chunks.
        entering = tl.zeros((SUBS, BLOCK_D, BLOCK_N), ACC)
        for c in range(0, subs):
            entering = tl.where(sub_rows == c, h[None, :, :], entering)
            cs = seg_start + c * CHUNK_T
            for i in range(cs, tl.minimum(cs + CHUNK_T, seg_end)):
                t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                    x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                    group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
                h = abar * h + (dt * xv)[:, None] * bvec[None, :]
        for cc in range(0, subs):
            c = subs - 1 - cc
            cs = seg_start + c * CHUNK_T
            ce = tl.minimum(cs + CHUNK_T, seg_end)
            # Recompute the chunk's states into a register tile: row r holds the state before step
            # cs + r (row 0 the chunk's entering state; the state after its last step is h).
            h = tl.sum(tl.where(sub_rows == c, entering, 0.0), axis=0)
            states = tl.zeros((CHUNK_T, BLOCK_D, BLOCK_N), ACC)
            for i in range(cs, ce):
                states = tl.where(step_rows == i - cs, h[None, :, :], states)
                t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                    x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                    group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
                h = abar * h + (dt * xv)[:, None] * bvec[None, :]
            # Sweep the chunk backwards; h_i is the previous step's h_prev (the chunk's last state first).
            h_i = h
            for j in range(0, ce - cs):
                i = ce - 1 - j
                t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                    x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                    group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
                cvec = tl.load(C_ptr + batch * stride_cb + t * stride_ct + group_off_c + ns,
                               mask=n_ok, other=0.0).to(ACC)
                h_prev = tl.sum(tl.where(step_rows == i - cs, states, 0.0), axis=0)
                gy = tl.load(grad_y_ptr + off, mask=chan_ok, other=0.0).to(ACC)
                if HAS_Z:
                    zv = tl.load(z_ptr + off, mask=chan_ok, other=0.0).to(ACC)
                    y_pre = tl.sum(h_i * cvec[None, :], axis=1)
                    if HAS_D:
                        y_pre = y_pre + Dv * xv
                    sig = tl.sigmoid(zv)
                    grad_z = gy * y_pre * sig * (1.0 + zv * (1.0 - sig))   # silu'(z) = sig (1 + z (1 - sig))
                    tl.store(grad_z_ptr + off, grad_z.to(grad_z_ptr.dtype.element_ty), mask=chan_ok)
                    gy = gy * zv * sig
                g = gy[:, None] * cvec[None, :] + m
                # dB_t and dC_t: this program's channels summed here, the channel blocks by atomics.
                bc_off = ((batch * T + t) * GROUPS + group) * NSTATE + ns
                tl.atomic_add(grad_C_ptr + bc_off, tl.sum(gy[:, None] * h_i, axis=0), mask=n_ok, sem="relaxed")
                tl.atomic_add(grad_B_ptr + bc_off, tl.sum(g * (dt * xv)[:, None], axis=0), mask=n_ok, sem="relaxed")
                s = g * h_prev * expo
                if NEG:
                    s = 2.0 * s
                gA += s * dt[:, None]
                gBx = tl.sum(g * bvec[None, :], axis=1)
                gdt = gBx * xv + tl.sum(s * A, axis=1)
                gx = gBx * dt
                if HAS_D:
                    gx = gx + Dv * gy
                    gD += gy * xv
                if SOFTPLUS:
                    gdt = gdt * tl.sigmoid(pre)
                gBias += gdt
                tl.store(grad_x_ptr + off, gx.to(grad_x_ptr.dtype.element_ty), mask=chan_ok)
                tl.store(grad_delta_ptr + off, gdt.to(grad_delta_ptr.dtype.element_ty), mask=chan_ok)
                m = abar * g
                h_i = h_prev
    if HAS_H0:
        tl.store(grad_h0_ptr + state_off, m, mask=tile_ok)
    # Parameter gradients: summed over the sequences by atomics.
    tl.atomic_add(grad_A_ptr + chans[:, None] * NSTATE + ns[None, :], gA, mask=tile_ok, sem="relaxed")
    if HAS_D:
        tl.atomic_add(grad_D_ptr + chans, gD, mask=chan_ok, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(grad_bias_ptr + chans, gBias, mask=chan_ok, sem="relaxed")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(N: int, ch_per_group: int, grouped: bool, interpret: bool) -> dict:
    """BLOCK_N = N rounded up to a power of two; BLOCK_D channels so that a program's state tile
    holds 256 elements on a GPU (one per thread at 8 warps), 16 x BLOCK_N under the interpreter.
    With G > 1 groups BLOCK_D divides D / G, so a program's channels read one group of B and C.

    ptxas -v (Triton 3.9) over every aot_specs() specialisation at this size, sm_80 and sm_90a: no
    spills. The forward (one step per loop iteration) takes 19-56 registers (the earlier chunked
    loop spilled 8 bytes on sm_80 at N = 256). The backward's register tiles take 148-189 registers
    a thread with maxnreg = 255 (one 8-warp program per SM); left to itself ptxas capped some
    specialisations at 128 and spilled 8-136 bytes (4 warps moved the spills around, 16 made them
    larger). Not yet timed on a GPU."""
    block_n = triton.next_power_of_2(max(N, 1))
    if interpret:
        cfg = dict(BLOCK_D=16, num_warps=1)
    else:
        cfg = dict(BLOCK_D=max(1, min(64, 256 // block_n)), num_warps=8)
    cfg = config_override("selective", cfg, ("BLOCK_D", "num_warps"))
    block_d = triton.next_power_of_2(max(1, int(cfg["BLOCK_D"])))
    if grouped:
        block_d = min(block_d, ch_per_group & -ch_per_group)  # largest power of two dividing D / G
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, num_warps=cfg["num_warps"])


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _common(x, A, B, cu_seqlens):
    Bsz, T, D = x.shape
    G, N = B.shape[-2], B.shape[-1]
    N_seq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    cfg = _config(N, D // G, G > 1, device_model(x.device) is None)
    return Bsz, T, D, G, N, N_seq, cfg


def checkpoint_rows(Bsz: int, T: int, N_seq: int, varlen: bool) -> int:
    """Rows of the (rows, D, N) checkpoint tensor (one state per SEGMENT steps of every sequence):
    B * cdiv(T, SEGMENT), or cdiv(T, SEGMENT) + N_seq for sequences packed with cu_seqlens."""
    per_row = triton.cdiv(T, SEGMENT)
    return per_row + N_seq if varlen else Bsz * per_row


def _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                negative_eigenvalues, *, y, final, ckpt, N_seq, cfg):
    Bsz, T, Dch = x.shape
    G, N = B.shape[-2], B.shape[-1]
    dummy = x
    grid = (triton.cdiv(Dch, cfg["BLOCK_D"]), N_seq)
    selective_scan_fwd_kernel[grid](
        x, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
        y if y is not None else dummy, final if final is not None else ckpt, ckpt if ckpt is not None else final,
        cu_seqlens if cu_seqlens is not None else dummy,
        T, Dch, N, Dch // G, triton.cdiv(T, SEGMENT),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        int(cu_seqlens is not None), int(reverse), int(delta_softplus), int(negative_eigenvalues),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
        WRITE_Y=y is not None, WRITE_CKPT=ckpt is not None, ACC=_tl_acc(_acc_dtype(x.dtype)), CHUNK_T=SEGMENT,
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )


def _prepare(x, delta, A, B, C, D, z, delta_bias, initial_state):
    """Contiguous inputs (B and C need only a contiguous last dimension); 4-D B and C."""
    B = B.unsqueeze(2) if B.dim() == 3 else B
    C = C.unsqueeze(2) if C.dim() == 3 else C
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    cont = [t.contiguous() if t is not None else None for t in (x, delta, A, D, z, delta_bias, initial_state)]
    x, delta, A, D, z, delta_bias, initial_state = cont
    return x, delta, A, B, C, D, z, delta_bias, initial_state


def selective_scan_forward(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                           delta_softplus: bool, initial_state: Optional[torch.Tensor], reverse: bool,
                           cu_seqlens: Optional[torch.Tensor], negative_eigenvalues: bool,
                           save_checkpoints: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused forward: y, the final states and (``save_checkpoints``) the backward's checkpoints.

    Args:
        x, delta: (B, T, D); A: (D, N) with N <= 256; B, C: (B, T, G, N) or (B, T, N);
        D, delta_bias: (D,) or None; z: (B, T, D) or None; initial_state: (N_seq, D, N) or None;
        cu_seqlens: (N_seq + 1,) int32/int64 with B = 1, or None. Any float dtypes (loaded as fp32;
        float64 x accumulates in float64).

    Returns:
        y: (B, T, D) in x's dtype; final_state: (N_seq, D, N) float32 (float64 for float64 x);
        checkpoints: (checkpoint_rows(...), D, N) in final_state's dtype, the state entering every
        SEGMENT steps of every sequence, or None. 1 / SEGMENT of the expanded state: for N = 16
        and bf16 x, 1/8 of x's bytes.
    """
    x, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(x, delta, A, B, C, D, z, delta_bias, initial_state)
    Bsz, T, Dch, G, N, N_seq, cfg = _common(x, A, B, cu_seqlens)
    acc = _acc_dtype(x.dtype)
    y = torch.empty_like(x)
    ckpt = None
    if save_checkpoints:
        ckpt = torch.empty((checkpoint_rows(Bsz, T, N_seq, cu_seqlens is not None), Dch, N), dtype=acc,
                           device=x.device)
    if N_seq == 0 or Dch == 0 or N == 0:
        final = (initial_state.to(acc, copy=True) if initial_state is not None
                 else torch.zeros((N_seq, Dch, N), dtype=acc, device=x.device))
        return y.zero_(), final, ckpt
    final = torch.empty((N_seq, Dch, N), dtype=acc, device=x.device)   # the kernel writes every state
    _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                negative_eigenvalues, y=y, final=final, ckpt=ckpt, N_seq=N_seq, cfg=cfg)
    return y, final, ckpt


def selective_scan_backward(x, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, initial_state, reverse: bool,
                            cu_seqlens, negative_eigenvalues: bool, grad_y: torch.Tensor,
                            grad_final: Optional[torch.Tensor], checkpoints: Optional[torch.Tensor] = None
                            ) -> List[Optional[torch.Tensor]]:
    """Fused backward: the reverse sweep from the forward's checkpoints (or, without them, from a
    checkpoint pass: the forward kernel writing only the state entering every SEGMENT steps).

    Args:
        as ``selective_scan_forward``; grad_y: (B, T, D) (any strides); grad_final: (N_seq, D, N) or None;
        checkpoints: what ``selective_scan_forward(..., save_checkpoints=True)`` returned for these
        inputs, or None.

    Returns:
        [grad_x (x's dtype), grad_delta (delta's dtype), grad_A (D, N), grad_B (B, T, G, N), grad_C (B, T, G, N),
        grad_D (D,) or None, grad_z (z's dtype) or None, grad_delta_bias (D,) or None,
        grad_initial_state (N_seq, D, N) or None]; grad_A, grad_B, grad_C, grad_D, grad_delta_bias and
        grad_initial_state in the accumulation dtype (fp32, float64 for float64 x): they are sums
        over channel blocks or sequences, made by atomic adds.
    """
    x, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(x, delta, A, B, C, D, z, delta_bias, initial_state)
    Bsz, T, Dch, G, N, N_seq, cfg = _common(x, A, B, cu_seqlens)
    acc = _acc_dtype(x.dtype)
    dev = x.device
    grad_y = grad_y.contiguous()
    grad_final = grad_final.contiguous() if grad_final is not None else None
    blocks = triton.cdiv(Dch, cfg["BLOCK_D"]) if Dch else 0
    launch = N_seq > 0 and Dch > 0 and N > 0
    make = torch.empty if launch else torch.zeros   # the kernel writes every element of these
    grad_x = make(x.shape, dtype=x.dtype, device=dev)
    grad_delta = make(delta.shape, dtype=delta.dtype, device=dev)
    grad_z = make(z.shape, dtype=z.dtype, device=dev) if z is not None else None
    grad_h0 = make((N_seq, Dch, N), dtype=acc, device=dev) if initial_state is not None else None
    grad_B = torch.zeros((Bsz, T, G, N), dtype=acc, device=dev)
    grad_C = torch.zeros((Bsz, T, G, N), dtype=acc, device=dev)
    grad_A = torch.zeros((Dch, N), dtype=acc, device=dev)
    grad_D = torch.zeros((Dch,), dtype=acc, device=dev) if D is not None else None
    grad_bias = torch.zeros((Dch,), dtype=acc, device=dev) if delta_bias is not None else None
    if launch:
        ckpt = checkpoints
        if ckpt is None:
            ckpt = torch.empty((checkpoint_rows(Bsz, T, N_seq, cu_seqlens is not None), Dch, N), dtype=acc,
                               device=dev)
            _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                        negative_eigenvalues, y=None, final=None, ckpt=ckpt, N_seq=N_seq, cfg=cfg)
        dummy = x
        selective_scan_bwd_kernel[(blocks, N_seq)](
            x, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
            grad_y, grad_final if grad_final is not None else ckpt, ckpt,
            cu_seqlens if cu_seqlens is not None else dummy,
            grad_x, grad_delta, grad_z if grad_z is not None else grad_delta, grad_B, grad_C, grad_A,
            grad_D if grad_D is not None else grad_A, grad_bias if grad_bias is not None else grad_A,
            grad_h0 if grad_h0 is not None else grad_A,
            T, Dch, N, Dch // G, triton.cdiv(T, SEGMENT), G,
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
            int(cu_seqlens is not None), int(reverse), int(delta_softplus), int(negative_eigenvalues),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, HAS_GRAD_FINAL=grad_final is not None,
            ACC=_tl_acc(acc), CHUNK_T=CHUNK, SUBS=SEGMENT // CHUNK, BLOCK_D=cfg["BLOCK_D"],
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], maxnreg=BACKWARD_MAXNREG,
        )
    elif grad_final is not None and initial_state is not None:
        grad_h0 = grad_final.to(acc, copy=True)
    return [grad_x, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_h0]


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for launches the GPU launcher makes:
    fp32 and bf16 storage, N = 16 (Mamba's default) and N = 256 (the largest), every optional
    tensor present and every one absent, forward, checkpoint pass and backward. Direction,
    packing, softplus and negative eigenvalues are runtime arguments (no specialisations)."""
    scalars = {"T": "i32", "DIM": "i32", "NSTATE": "i32", "CH_PER_GROUP": "i32", "NUM_SEGS": "i32"}
    strides = {n: "i64" for n in ("stride_bb", "stride_bt", "stride_bg", "stride_cb", "stride_ct", "stride_cg")}
    flags = {n: "i32" for n in ("VARLEN", "REVERSE", "SOFTPLUS", "NEG")}
    for elem in ("fp32", "bf16"):
        inputs = {"x_ptr": f"*{elem}", "delta_ptr": f"*{elem}", "A_ptr": "*fp32", "B_ptr": f"*{elem}",
                  "C_ptr": f"*{elem}", "D_ptr": "*fp32", "z_ptr": f"*{elem}", "bias_ptr": "*fp32",
                  "h0_ptr": "*fp32"}
        for N in (16, 256):
            cfg = _config(N, 1 << 20, False, interpret=False)
            tiles = dict(ACC=tl.float32, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"])
            for present in (True, False):
                opt = dict(HAS_D=present, HAS_Z=present, HAS_BIAS=present, HAS_H0=present)
                fwd_sig = {**inputs, "y_ptr": f"*{elem}", "final_ptr": "*fp32", "ckpt_ptr": "*fp32",
                           "cu_seqlens_ptr": "*i32", **scalars, **strides, **flags}
                # The forward without and with checkpoints, and the backward's checkpoint pass.
                for write_y, write_ckpt in ((True, False), (True, True), (False, True)):
                    yield (selective_scan_fwd_kernel, fwd_sig,
                           {**opt, "WRITE_Y": write_y, "WRITE_CKPT": write_ckpt, **tiles, "CHUNK_T": SEGMENT},
                           cfg["num_warps"])
                bwd_sig = {**inputs, "grad_y_ptr": f"*{elem}", "grad_final_ptr": "*fp32", "ckpt_ptr": "*fp32",
                           "cu_seqlens_ptr": "*i32", "grad_x_ptr": f"*{elem}", "grad_delta_ptr": f"*{elem}",
                           "grad_z_ptr": f"*{elem}", "grad_B_ptr": "*fp32", "grad_C_ptr": "*fp32",
                           "grad_A_ptr": "*fp32", "grad_D_ptr": "*fp32", "grad_bias_ptr": "*fp32",
                           "grad_h0_ptr": "*fp32", **scalars, "GROUPS": "i32", **strides, **flags}
                bwd_tiles = {**tiles, "CHUNK_T": CHUNK, "SUBS": SEGMENT // CHUNK}
                yield (selective_scan_bwd_kernel, bwd_sig, {**opt, "HAS_GRAD_FINAL": present, **bwd_tiles},
                       cfg["num_warps"], {"compile_options": {"maxnreg": BACKWARD_MAXNREG}})


def plan_description(B: int, T: int, D: int, N: int, G: int = 1, model=None) -> str:
    """The launch plan at (B, T, D, N, G) on the model GPU (``model``: a ``device_model()``), computed,
    nothing run: programs of each kernel and the channels per program."""
    cfg = _config(N, D // max(G, 1), G > 1, model is None)
    programs = B * triton.cdiv(D, cfg["BLOCK_D"])
    return f"{programs} programs of {cfg['BLOCK_D']} channels x {cfg['BLOCK_N']} states, CHUNK {CHUNK}"
