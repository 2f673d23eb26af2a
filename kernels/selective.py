"""Triton kernels for the selective scan (Mamba): the expanded state lives in registers only.

Recurrence (per channel d and state n; see ``linrec.selective.reference``)::

    dt_t = softplus(delta_t + bias) (or delta_t + bias);  abar_t = exp(dt_t A) (or 2 exp(dt_t A) - 1)
    h_t  = abar_t h_{t-1} + dt_t B_t x_t;                  y_t = C_t . h_t + D x_t  (y <- y silu(z_t))

**Forward** (``selective_scan_fwd_kernel``). One program owns BLOCK_D channels of one sequence and
all N states of each (a (BLOCK_D, BLOCK_N) fp32 tile in registers) and steps through the
sequence's time axis, reading x, delta, z, B_t and C_t once per step and writing y once; the
expanded state never touches memory. Every program's channels read one group of B and C (the
launcher makes BLOCK_D divide D / G), so B_t and C_t are (BLOCK_N,) vectors. Grid:
(cdiv(D, BLOCK_D), N_seq). With ``CKPT`` the same kernel writes only the state entering every
chunk of CHUNK steps (N_seq, chunks, D, N): the backward's checkpoints.

**Backward** (``selective_scan_bwd_kernel``), same grid. The program visits its chunks in
reverse: it recomputes the chunk's states from the checkpoint into a per-program scratch tile
(CHUNK, BLOCK_D, BLOCK_N) (a few KB, written and read back at once: cache-resident), then sweeps
the chunk backwards carrying ``m = abar_{i+1} g_{i+1}``, the adjoint state's contribution from
the next step, and forms every gradient of the step from g_i = C_i g^y_i + m (the formulas are in
``linrec.selective.chunked.selective_scan_chunked_backward``). dL/dA and dL/dD are accumulated in
registers over the whole sequence (one (D, N) partial per sequence); dL/dB and dL/dC are reduced
over the program's channels and written per channel block (a (D / BLOCK_D, B, T, N) partial,
summed by the launcher).

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

# Steps per checkpoint chunk of the backward (its recompute scratch holds CHUNK state tiles).
CHUNK = 16
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
def selective_scan_fwd_kernel(
    x_ptr, delta_ptr,        # (B, T, D) contiguous
    A_ptr,                   # (D, N) contiguous
    B_ptr, C_ptr,            # (B, T, G, N), last dim contiguous; strides below
    D_ptr, z_ptr, bias_ptr,  # (D,), (B, T, D), (D,) when HAS_D / HAS_Z / HAS_BIAS
    h0_ptr,                  # (N_seq, D, N) when HAS_H0
    y_ptr,                   # (B, T, D) output (not CKPT)
    final_ptr,               # (N_seq, D, N) accumulation dtype (not CKPT)
    ckpt_ptr,                # (N_seq, NUM_CHUNKS, D, N) accumulation dtype (CKPT)
    cu_seqlens_ptr,          # (N_seq + 1,) when VARLEN
    T, DIM, NSTATE, CH_PER_GROUP, NUM_CHUNKS,
    stride_bb, stride_bt, stride_bg, stride_cb, stride_ct, stride_cg,
    VARLEN, REVERSE, SOFTPLUS, NEG,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    CKPT: tl.constexpr, ACC: tl.constexpr, CHUNK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    (batch, start, end, chans, chan_ok, ns, n_ok, tile_ok, group_off_b, group_off_c, A, bias, Dv,
     state_off) = _program_setup(A_ptr, D_ptr, bias_ptr, cu_seqlens_ptr, pid_d, seq, T, DIM, NSTATE, CH_PER_GROUP,
                                 stride_bg, stride_cg, VARLEN, HAS_D, HAS_BIAS, ACC, BLOCK_D, BLOCK_N)
    length = end - start
    h = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=tile_ok, other=0.0).to(ACC)

    for c in range(0, length, CHUNK_T):
        if CKPT:
            ck_off = ((seq.to(tl.int64) * NUM_CHUNKS + c // CHUNK_T) * DIM + chans)[:, None] * NSTATE + ns[None, :]
            tl.store(ckpt_ptr + ck_off, h, mask=tile_ok)
        for i in range(c, tl.minimum(c + CHUNK_T, length)):
            t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
            h = abar * h + (dt * xv)[:, None] * bvec[None, :]
            if not CKPT:
                cvec = tl.load(C_ptr + batch * stride_cb + t * stride_ct + group_off_c + ns,
                               mask=n_ok, other=0.0).to(ACC)
                y = tl.sum(h * cvec[None, :], axis=1)
                if HAS_D:
                    y = y + Dv * xv
                if HAS_Z:
                    zv = tl.load(z_ptr + off, mask=chan_ok, other=0.0).to(ACC)
                    y = y * zv * tl.sigmoid(zv)
                tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=chan_ok)
    if not CKPT:
        tl.store(final_ptr + state_off, h, mask=tile_ok)


@triton.jit
def selective_scan_bwd_kernel(
    x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,   # as the forward
    grad_y_ptr,              # (B, T, D) contiguous
    grad_final_ptr,          # (N_seq, D, N) when HAS_GRAD_FINAL
    ckpt_ptr,                # (N_seq, NUM_CHUNKS, D, N): states entering each chunk
    scratch_ptr,             # (programs, CHUNK_T, BLOCK_D, BLOCK_N) accumulation dtype
    cu_seqlens_ptr,
    grad_x_ptr,              # (B, T, D) in x's dtype
    grad_delta_ptr,          # (B, T, D) accumulation dtype
    grad_z_ptr,              # (B, T, D) when HAS_Z
    grad_B_ptr, grad_C_ptr,  # (D / BLOCK_D, B, T, N) accumulation dtype: per-channel-block partials
    grad_A_ptr,              # (N_seq, D, N) accumulation dtype: per-sequence partials
    grad_D_ptr,              # (N_seq, D) accumulation dtype, when HAS_D
    grad_h0_ptr,             # (N_seq, D, N) accumulation dtype
    T, DIM, NSTATE, CH_PER_GROUP, NUM_CHUNKS, BATCH,
    stride_bb, stride_bt, stride_bg, stride_cb, stride_ct, stride_cg,
    VARLEN, REVERSE, SOFTPLUS, NEG,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_GRAD_FINAL: tl.constexpr, ACC: tl.constexpr, CHUNK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    (batch, start, end, chans, chan_ok, ns, n_ok, tile_ok, group_off_b, group_off_c, A, bias, Dv,
     state_off) = _program_setup(A_ptr, D_ptr, bias_ptr, cu_seqlens_ptr, pid_d, seq, T, DIM, NSTATE, CH_PER_GROUP,
                                 stride_bg, stride_cg, VARLEN, HAS_D, HAS_BIAS, ACC, BLOCK_D, BLOCK_N)
    length = end - start
    program = seq.to(tl.int64) * tl.num_programs(0) + pid_d
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + ns[None, :]
    scratch = scratch_ptr + program * (CHUNK_T * BLOCK_D * BLOCK_N) + tile
    part_base = (pid_d.to(tl.int64) * BATCH + batch) * T   # row of the (blocks, B, T, N) partials

    # m = abar_{i+1} g_{i+1}: what the adjoint state receives from the step after i.
    m = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    if HAS_GRAD_FINAL:
        m = tl.load(grad_final_ptr + state_off, mask=tile_ok, other=0.0).to(ACC)
    gA = tl.zeros((BLOCK_D, BLOCK_N), ACC)
    gD = tl.zeros((BLOCK_D,), ACC)
    num_chunks = (length + CHUNK_T - 1) // CHUNK_T
    for k in range(0, num_chunks):
        c = num_chunks - 1 - k
        cs = c * CHUNK_T
        ce = tl.minimum(cs + CHUNK_T, length)
        ck_off = ((seq.to(tl.int64) * NUM_CHUNKS + c) * DIM + chans)[:, None] * NSTATE + ns[None, :]
        h_start = tl.load(ckpt_ptr + ck_off, mask=tile_ok, other=0.0)
        # Recompute the chunk's states into the scratch tile.
        h = h_start
        for i in range(cs, ce):
            t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
            h = abar * h + (dt * xv)[:, None] * bvec[None, :]
            tl.store(scratch + (i - cs) * (BLOCK_D * BLOCK_N), h)
        tl.debug_barrier()
        # Sweep the chunk backwards.
        for j in range(0, ce - cs):
            i = ce - 1 - j
            t, off, xv, pre, dt, expo, abar, bvec = _step_inputs(
                x_ptr, delta_ptr, B_ptr, i, start, end, batch, chans, chan_ok, ns, n_ok, A, bias, T, DIM,
                group_off_b, stride_bb, stride_bt, REVERSE, SOFTPLUS, NEG, HAS_BIAS, ACC)
            cvec = tl.load(C_ptr + batch * stride_cb + t * stride_ct + group_off_c + ns, mask=n_ok, other=0.0).to(ACC)
            h_i = tl.load(scratch + (i - cs) * (BLOCK_D * BLOCK_N))
            not_first = (tile * 0 + i) > cs
            h_prev = tl.load(scratch + (i - cs - 1) * (BLOCK_D * BLOCK_N), mask=not_first, other=0.0)
            h_prev = tl.where(not_first, h_prev, h_start)
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
            part_off = (part_base + t) * NSTATE + ns
            tl.store(grad_C_ptr + part_off, tl.sum(gy[:, None] * h_i, axis=0), mask=n_ok)
            tl.store(grad_B_ptr + part_off, tl.sum(g * (dt * xv)[:, None], axis=0), mask=n_ok)
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
            tl.store(grad_x_ptr + off, gx.to(grad_x_ptr.dtype.element_ty), mask=chan_ok)
            tl.store(grad_delta_ptr + off, gdt, mask=chan_ok)
            m = abar * g
        tl.debug_barrier()  # the next chunk's recompute overwrites the scratch tile
    tl.store(grad_h0_ptr + state_off, m, mask=tile_ok)
    tl.store(grad_A_ptr + state_off, gA, mask=tile_ok)
    if HAS_D:
        tl.store(grad_D_ptr + seq.to(tl.int64) * DIM + chans, gD, mask=chan_ok)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(N: int, ch_per_group: int, grouped: bool, interpret: bool) -> dict:
    """BLOCK_N = N rounded up to a power of two; BLOCK_D channels so that a program's state tile
    holds 256 elements on a GPU (one per thread at 8 warps), 16 x BLOCK_N under the interpreter.
    With G > 1 groups BLOCK_D divides D / G, so a program's channels read one group of B and C.

    ptxas -v (Triton 3.9) over every aot_specs() specialisation at this size: no spills on sm_90a,
    at most 8 bytes (forward) on sm_80; 512-element tiles spilled 16-60 bytes on sm_90a at 4 warps
    (8 at 8 warps), 4096-element ones up to 44 KB in the backward. Not yet timed on a GPU."""
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


def _max_len(T: int, cu_seqlens: Optional[torch.Tensor]) -> int:
    if cu_seqlens is None or cu_seqlens.numel() < 2:
        return T
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                negative_eigenvalues, *, y, final, ckpt, num_chunks, cfg):
    Bsz, T, Dch = x.shape
    G, N = B.shape[-2], B.shape[-1]
    N_seq = final.shape[0] if final is not None else ckpt.shape[0]
    dummy = x
    grid = (triton.cdiv(Dch, cfg["BLOCK_D"]), N_seq)
    selective_scan_fwd_kernel[grid](
        x, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
        y if y is not None else dummy, final if final is not None else ckpt, ckpt if ckpt is not None else final,
        cu_seqlens if cu_seqlens is not None else dummy,
        T, Dch, N, Dch // G, num_chunks,
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        int(cu_seqlens is not None), int(reverse), int(delta_softplus), int(negative_eigenvalues),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
        CKPT=ckpt is not None, ACC=_tl_acc(_acc_dtype(x.dtype)), CHUNK_T=CHUNK,
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
                           cu_seqlens: Optional[torch.Tensor], negative_eigenvalues: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: y and the final states.

    Args:
        x, delta: (B, T, D); A: (D, N) with N <= 256; B, C: (B, T, G, N) or (B, T, N);
        D, delta_bias: (D,) or None; z: (B, T, D) or None; initial_state: (N_seq, D, N) or None;
        cu_seqlens: (N_seq + 1,) int32/int64 with B = 1, or None. Any float dtypes (loaded as fp32;
        float64 x accumulates in float64).

    Returns:
        y: (B, T, D) in x's dtype; final_state: (N_seq, D, N) float32 (float64 for float64 x).
    """
    x, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(x, delta, A, B, C, D, z, delta_bias, initial_state)
    Bsz, T, Dch, G, N, N_seq, cfg = _common(x, A, B, cu_seqlens)
    acc = _acc_dtype(x.dtype)
    y = torch.empty_like(x)
    if initial_state is not None:
        final = initial_state.to(acc, copy=True)
    else:
        final = torch.zeros((N_seq, Dch, N), dtype=acc, device=x.device)
    if N_seq == 0 or Dch == 0 or N == 0:
        return y.zero_(), final
    _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                negative_eigenvalues, y=y, final=final, ckpt=None, num_chunks=1, cfg=cfg)
    return y, final


def selective_scan_backward(x, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, initial_state, reverse: bool,
                            cu_seqlens, negative_eigenvalues: bool, grad_y: torch.Tensor,
                            grad_final: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Fused backward: a checkpoint pass (the forward kernel with CKPT), then the reverse sweep.

    Args:
        as ``selective_scan_forward``; grad_y: (B, T, D) (any strides); grad_final: (N_seq, D, N) or None.

    Returns:
        [grad_x (x's dtype), grad_delta (fp32), grad_A (D, N), grad_B (B, T, G, N), grad_C (B, T, G, N),
        grad_D (D,) or None, grad_z (z's dtype) or None, grad_delta_bias (D,) or None,
        grad_initial_state (N_seq, D, N)]; reductions in the accumulation dtype (fp32, float64 for float64 x).
    """
    x, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(x, delta, A, B, C, D, z, delta_bias, initial_state)
    Bsz, T, Dch, G, N, N_seq, cfg = _common(x, A, B, cu_seqlens)
    acc = _acc_dtype(x.dtype)
    dev = x.device
    grad_y = grad_y.contiguous()
    grad_final = grad_final.contiguous() if grad_final is not None else None
    blocks = triton.cdiv(Dch, cfg["BLOCK_D"]) if Dch else 0
    grad_x = torch.zeros_like(x)
    grad_delta = torch.zeros((Bsz, T, Dch), dtype=acc, device=dev)
    grad_z = torch.zeros_like(z) if z is not None else None
    part_B = torch.zeros((blocks, Bsz, T, N), dtype=acc, device=dev)
    part_C = torch.zeros_like(part_B)
    part_A = torch.zeros((N_seq, Dch, N), dtype=acc, device=dev)
    part_D = torch.zeros((N_seq, Dch), dtype=acc, device=dev)
    grad_h0 = (grad_final.to(acc, copy=True) if grad_final is not None
               else torch.zeros((N_seq, Dch, N), dtype=acc, device=dev))
    if N_seq > 0 and Dch > 0 and N > 0:
        num_chunks = max(1, triton.cdiv(_max_len(T, cu_seqlens), CHUNK))
        ckpt = torch.empty((N_seq, num_chunks, Dch, N), dtype=acc, device=dev)
        _launch_fwd(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
                    negative_eigenvalues, y=None, final=None, ckpt=ckpt, num_chunks=num_chunks, cfg=cfg)
        scratch = torch.empty((blocks * N_seq, CHUNK, cfg["BLOCK_D"], cfg["BLOCK_N"]), dtype=acc, device=dev)
        dummy = x
        selective_scan_bwd_kernel[(blocks, N_seq)](
            x, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
            grad_y, grad_final if grad_final is not None else ckpt, ckpt, scratch,
            cu_seqlens if cu_seqlens is not None else dummy,
            grad_x, grad_delta, grad_z if grad_z is not None else grad_delta, part_B, part_C, part_A, part_D, grad_h0,
            T, Dch, N, Dch // G, num_chunks, Bsz,
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
            int(cu_seqlens is not None), int(reverse), int(delta_softplus), int(negative_eigenvalues),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, HAS_GRAD_FINAL=grad_final is not None,
            ACC=_tl_acc(acc), CHUNK_T=CHUNK, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"],
        )
    if G == 1:
        grad_B, grad_C = part_B.sum(0).unsqueeze(2), part_C.sum(0).unsqueeze(2)
    else:  # blocks lie within groups: sum the blocks of every group
        grad_B = part_B.view(G, blocks // G, Bsz, T, N).sum(1).permute(1, 2, 0, 3)
        grad_C = part_C.view(G, blocks // G, Bsz, T, N).sum(1).permute(1, 2, 0, 3)
    grad_bias = grad_delta.sum((0, 1)) if delta_bias is not None else None
    return [grad_x, grad_delta, part_A.sum(0), grad_B, grad_C, part_D.sum(0) if D is not None else None,
            grad_z, grad_bias, grad_h0]


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for launches the GPU launcher makes:
    fp32 and bf16 storage, N = 16 (Mamba's default) and N = 256 (the largest), every optional
    tensor present and every one absent, forward, checkpoint pass and backward. Direction,
    packing, softplus and negative eigenvalues are runtime arguments (no specialisations)."""
    scalars = {"T": "i32", "DIM": "i32", "NSTATE": "i32", "CH_PER_GROUP": "i32", "NUM_CHUNKS": "i32"}
    strides = {n: "i64" for n in ("stride_bb", "stride_bt", "stride_bg", "stride_cb", "stride_ct", "stride_cg")}
    flags = {n: "i32" for n in ("VARLEN", "REVERSE", "SOFTPLUS", "NEG")}
    for elem in ("fp32", "bf16"):
        inputs = {"x_ptr": f"*{elem}", "delta_ptr": f"*{elem}", "A_ptr": "*fp32", "B_ptr": f"*{elem}",
                  "C_ptr": f"*{elem}", "D_ptr": "*fp32", "z_ptr": f"*{elem}", "bias_ptr": "*fp32",
                  "h0_ptr": "*fp32"}
        for N in (16, 256):
            cfg = _config(N, 1 << 20, False, interpret=False)
            tiles = dict(ACC=tl.float32, CHUNK_T=CHUNK, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"])
            for present in (True, False):
                opt = dict(HAS_D=present, HAS_Z=present, HAS_BIAS=present, HAS_H0=present)
                fwd_sig = {**inputs, "y_ptr": f"*{elem}", "final_ptr": "*fp32", "ckpt_ptr": "*fp32",
                           "cu_seqlens_ptr": "*i32", **scalars, **strides, **flags}
                for ckpt in (False, True):
                    yield selective_scan_fwd_kernel, fwd_sig, {**opt, "CKPT": ckpt, **tiles}, cfg["num_warps"]
                bwd_sig = {**inputs, "grad_y_ptr": f"*{elem}", "grad_final_ptr": "*fp32", "ckpt_ptr": "*fp32",
                           "scratch_ptr": "*fp32", "cu_seqlens_ptr": "*i32", "grad_x_ptr": f"*{elem}",
                           "grad_delta_ptr": "*fp32", "grad_z_ptr": f"*{elem}", "grad_B_ptr": "*fp32",
                           "grad_C_ptr": "*fp32", "grad_A_ptr": "*fp32", "grad_D_ptr": "*fp32",
                           "grad_h0_ptr": "*fp32", **scalars, "BATCH": "i32", **strides, **flags}
                yield (selective_scan_bwd_kernel, bwd_sig, {**opt, "HAS_GRAD_FINAL": present, **tiles},
                       cfg["num_warps"])
