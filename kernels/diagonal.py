"""Triton kernels for the diagonal scan ``h_t = a_t * h_{t-1} + x_t``.

One program owns BLOCK_D channels of one sequence and walks its time axis in
tiles of BLOCK_T steps. Within a tile, ``tl.associative_scan`` combines the
affine maps ``h -> a h + x`` (composition is associative):

    (a1, x1) then (a2, x2)  =  (a2 a1, a2 x1 + x2)

which yields, for every row r, the tile-local product ``A_r`` and state ``X_r``
from a zero start. The state carried in from the previous tile is then applied
as ``h_r = A_r * carry + X_r`` and the last row becomes the next carry. Rows
past the end of the sequence load the identity map (a = 1, x = 0), so the last
row is always the tile's final state.

Reverse scans load each tile in reversed time order and run the same forward
scan over rows. The backward pass is the same kernel with ``BACKWARD=True``: it
scans the incoming gradient against the *next* step's conjugated coefficient in
the opposite direction, and fuses ``dL/da_t = g_t * conj(h_{t-1})`` and
``dL/dh_0`` into the same sweep, so the backward reads a, h and dL/dh once and
writes dL/dx and dL/da once.

Complex tensors arrive as their real views (trailing dimension 2) and each part
is carried as its own fp32 tile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from linrec._common import accumulation_dtype, num_sequences

from . import config_override, device_model, tl_accumulation_dtype


@triton.jit
def _saturate(product):
    """A product of coefficients, clamped to a finite range (NaN stays NaN).

    A product that overflows (|a| > 1 over a whole tile) would meet a zero state or a
    zero x as inf * 0 = NaN, where the sequential loop is exact (0); saturated, it
    gives the loop's zeros. Where the true product is out of range, so is the state."""
    if product.dtype == tl.float64:
        bound = 1e300
    else:
        bound = 3.0e38
    return tl.clamp(product, -bound, bound, propagate_nan=tl.PropagateNan.ALL)


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
def diagonal_scan_kernel(
    a_ptr,            # coefficients, real view, strides given below (may be 0: broadcast)
    x_ptr,            # forward: inputs x; backward: dL/dh.   (B, T, D[, 2]) contiguous
    h0_ptr,           # initial states (N, D[, 2]) contiguous, read when HAS_H0
    out_ptr,          # forward: states h; backward: dL/dx.   (B, T, D[, 2]) contiguous
    h_ptr,            # backward only: the forward states h   (B, T, D[, 2])
    grad_a_ptr,       # backward only: dL/da, full (B, T, D[, 2]) in the accumulation dtype
    grad_h0_ptr,      # backward only: dL/dh0 (N, D[, 2]) in the accumulation dtype
    cu_seqlens_ptr,   # (N + 1,) packed-sequence offsets when VARLEN
    carry_in_ptr,     # CHUNKED pass 0: state entering each chunk, (N, S, D[, 2]) accumulation dtype
    chunk_a_ptr,      # pass 1: product of a chunk's coefficients, (N, S, D[, 2])
    chunk_x_ptr,      # pass 1: a chunk's end state from a zero start, (N, S, D[, 2])
    T, D, CHUNK_LEN,  # CHUNK_LEN: steps per chunk (a multiple of BLOCK_T); S = grid axis 2
    stride_ab, stride_at, stride_ad,
    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, BACKWARD: tl.constexpr,
    PASS: tl.constexpr, CHUNKED: tl.constexpr,
    IS_COMPLEX: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    seq = tl.program_id(1)
    chunk = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    if VARLEN:  # packed sequences share batch row 0
        batch = seq * 0
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    else:
        batch = seq
        start = (seq * 0).to(tl.int64)
        end = start + T
    length = end - start
    # This program's share of the sweep: steps [sweep_begin, sweep_end).
    sweep_begin = tl.minimum(chunk.to(tl.int64) * CHUNK_LEN, length)
    sweep_end = tl.minimum(sweep_begin + CHUNK_LEN, length)
    W: tl.constexpr = 2 if IS_COMPLEX else 1  # scalars per element
    # The scan walks time backwards for a reverse forward pass, and for the
    # backward of a forward-in-time pass.
    SCAN_DOWN: tl.constexpr = REVERSE != BACKWARD
    FWD_STEP: tl.constexpr = -1 if REVERSE else 1  # time step of the forward recurrence

    chans = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    chan_ok = chans < D
    rows = tl.arange(0, BLOCK_T)
    row_base = batch.to(tl.int64) * T  # global time index of this batch row's t = 0
    a_base = batch.to(tl.int64) * stride_ab + chans.to(tl.int64)[None, :] * stride_ad
    state_off = (seq.to(tl.int64) * D + chans) * W                    # into (N, D[, 2])
    chunk_off = ((seq.to(tl.int64) * n_chunks + chunk) * D + chans) * W   # into (N, S, D[, 2])

    # Carried state: h (forward) or g = dL/dx (backward), real and imaginary parts.
    carry_re = tl.zeros((BLOCK_D,), ACC)
    carry_im = tl.zeros((BLOCK_D,), ACC)
    if CHUNKED and PASS == 0:
        carry_re = tl.load(carry_in_ptr + chunk_off, mask=chan_ok, other=0.0).to(ACC)
        if IS_COMPLEX:
            carry_im = tl.load(carry_in_ptr + chunk_off + 1, mask=chan_ok, other=0.0).to(ACC)
    elif HAS_H0 and not BACKWARD and not CHUNKED:
        carry_re = tl.load(h0_ptr + state_off, mask=chan_ok, other=0.0).to(ACC)
        if IS_COMPLEX:
            carry_im = tl.load(h0_ptr + state_off + 1, mask=chan_ok, other=0.0).to(ACC)
    # Pass 1: running product of the coefficients, starting from 1.
    prod_re = tl.full((BLOCK_D,), 1.0, ACC)
    prod_im = tl.zeros((BLOCK_D,), ACC)

    for tile_start in range(sweep_begin, sweep_end, BLOCK_T):
        step = tile_start + rows                    # how many steps into the sweep
        if SCAN_DOWN:
            t = end - 1 - step
        else:
            t = start + step
        row_ok = step < sweep_end
        mask = row_ok[:, None] & chan_ok[None, :]
        off = ((row_base + t)[:, None] * D + chans[None, :]) * W

        if BACKWARD:
            # g_t = dL/dh_t + conj(a_{t + FWD_STEP}) g_{t + FWD_STEP}: the coefficient
            # comes from the forward step after t, and is 0 past the sequence end.
            t_coef = t + FWD_STEP
            coef_ok = mask & ((t_coef >= start) & (t_coef < end))[:, None]
        else:
            t_coef = t
            coef_ok = mask
        a_off = a_base + t_coef[:, None] * stride_at
        a_re = tl.load(a_ptr + a_off, mask=coef_ok, other=0.0).to(ACC)
        # The identity map (a = 1, x = 0) in padded rows keeps the last row equal
        # to the tile's end state.
        a_re = tl.where(mask, a_re, 1.0)
        x_re = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        if IS_COMPLEX:
            a_im = tl.load(a_ptr + a_off + 1, mask=coef_ok, other=0.0).to(ACC)
            if BACKWARD:
                a_im = -a_im  # conjugate
            x_im = tl.load(x_ptr + off + 1, mask=mask, other=0.0).to(ACC)
            A_re, A_im, X_re, X_im = tl.associative_scan((a_re, a_im, x_re, x_im), 0, _combine_complex)
            h_re = A_re * carry_re[None, :] - A_im * carry_im[None, :] + X_re
            h_im = A_re * carry_im[None, :] + A_im * carry_re[None, :] + X_im
            carry_im = _last_row(h_im, rows, BLOCK_T)
            if PASS == 1:
                last_re = _last_row(A_re, rows, BLOCK_T)
                last_im = _last_row(A_im, rows, BLOCK_T)
                prod_re, prod_im = (_saturate(last_re * prod_re - last_im * prod_im),
                                    _saturate(last_re * prod_im + last_im * prod_re))
        else:
            A_re, X_re = tl.associative_scan((a_re, x_re), 0, _combine_real)
            h_re = A_re * carry_re[None, :] + X_re
            if PASS == 1:
                prod_re = _saturate(_last_row(A_re, rows, BLOCK_T) * prod_re)
        carry_re = _last_row(h_re, rows, BLOCK_T)

        if PASS == 0:
            tl.store(out_ptr + off, h_re.to(out_ptr.dtype.element_ty), mask=mask)
            if IS_COMPLEX:
                tl.store(out_ptr + off + 1, h_im.to(out_ptr.dtype.element_ty), mask=mask)

        if BACKWARD and PASS == 0:
            # dL/da_t = g_t * conj(h_{t - FWD_STEP}), with h_0 at the sequence start.
            t_prev = t - FWD_STEP
            prev_in = (t_prev >= start) & (t_prev < end)
            prev_off = ((row_base + t_prev)[:, None] * D + chans[None, :]) * W
            prev_mask = mask & prev_in[:, None]
            hp_re = tl.load(h_ptr + prev_off, mask=prev_mask, other=0.0).to(ACC)
            if IS_COMPLEX:
                hp_im = tl.load(h_ptr + prev_off + 1, mask=prev_mask, other=0.0).to(ACC)
            if HAS_H0:
                init_re = tl.load(h0_ptr + state_off, mask=chan_ok, other=0.0).to(ACC)
                at_start = mask & (~prev_in)[:, None]
                hp_re = tl.where(at_start, init_re[None, :], hp_re)
                if IS_COMPLEX:
                    init_im = tl.load(h0_ptr + state_off + 1, mask=chan_ok, other=0.0).to(ACC)
                    hp_im = tl.where(at_start, init_im[None, :], hp_im)
            if IS_COMPLEX:
                tl.store(grad_a_ptr + off, h_re * hp_re + h_im * hp_im, mask=mask)
                tl.store(grad_a_ptr + off + 1, h_im * hp_re - h_re * hp_im, mask=mask)
            else:
                tl.store(grad_a_ptr + off, h_re * hp_re, mask=mask)

    if PASS == 1:
        # The chunk as one affine map h -> prod * h + carry (identity when empty).
        tl.store(chunk_a_ptr + chunk_off, prod_re, mask=chan_ok)
        tl.store(chunk_x_ptr + chunk_off, carry_re, mask=chan_ok)
        if IS_COMPLEX:
            tl.store(chunk_a_ptr + chunk_off + 1, prod_im, mask=chan_ok)
            tl.store(chunk_x_ptr + chunk_off + 1, carry_im, mask=chan_ok)

    # dL/dh0 = conj(a_first) * g_first, "first" the first forward step: the carry
    # after the last step of the backward sweep, held by the chunk that ends it.
    last_chunk = tl.maximum((length + CHUNK_LEN - 1) // CHUNK_LEN, 1) - 1
    if BACKWARD and PASS == 0 and chunk == last_chunk:
        if REVERSE:
            t_first = end - 1
        else:
            t_first = start
        first_ok = chan_ok & ((chans * 0 + length) > 0)  # vector mask; empty sequences give 0
        af_off = batch.to(tl.int64) * stride_ab + t_first * stride_at + chans.to(tl.int64) * stride_ad
        af_re = tl.load(a_ptr + af_off, mask=first_ok, other=0.0).to(ACC)
        if IS_COMPLEX:
            af_im = tl.load(a_ptr + af_off + 1, mask=first_ok, other=0.0).to(ACC)
            tl.store(grad_h0_ptr + state_off, af_re * carry_re + af_im * carry_im, mask=chan_ok)
            tl.store(grad_h0_ptr + state_off + 1, af_re * carry_im - af_im * carry_re, mask=chan_ok)
        else:
            tl.store(grad_h0_ptr + state_off, af_re * carry_re, mask=chan_ok)


def _config(dtype: torch.dtype, interpret: bool, D: int = 64) -> dict:
    """Tile sizes. Tiles are small in the interpreter's own plan (``interpret``: no device model),
    whose scan costs a Python call per tile element."""
    if interpret:
        cfg = dict(BLOCK_T=16, BLOCK_D=min(16, triton.next_power_of_2(max(D, 1))), num_warps=1)
    elif dtype in (torch.bfloat16, torch.float16):
        cfg = dict(BLOCK_T=16, BLOCK_D=128, num_warps=8)
    else:
        cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=8)
    # GPU: 8 tile elements per thread. Registers per thread from ptxas -v for sm_90a (forward /
    # backward, fp32 | bf16): 142 / 255 | 147 / 255 with 520 bytes of spills at the previous
    # 4 warps (32 x 64 | 32 x 128 tiles); 58 / 97 | 48 / 99 now, at most 24 bytes of spills over
    # every specialisation, so several times more warps fit on an SM to hide memory latency.
    # Not yet timed on a GPU: the old setting is LINREC_DIAGONAL_CONFIG="BLOCK_T=32,num_warps=4".
    return config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps"))


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _auto_num_chunks(N: int, D: int, T: int, cu_seqlens, cfg: dict, model) -> int:
    """Chunks per sequence so that the GPU has enough programs in flight.

    One program per (sequence, channel block) leaves most of the GPU idle when
    sequences are long and few channels remain (B = 1, small D). Each sequence is
    then cut into chunks; the split costs one extra read of the inputs.
    ``model``: the ``DeviceModel`` planned for (None: the interpreter's plan, one chunk).
    """
    if model is None:
        return 1
    programs = N * triton.cdiv(D, cfg["BLOCK_D"])
    target = 4 * model.sm_count
    if programs >= target:
        return 1
    max_len = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return max(1, min(triton.cdiv(target, programs), max_len // (8 * cfg["BLOCK_T"])))


def _sweep(a, x, h0, out, h, grad_a, grad_h0, cu_seqlens, reverse, backward, num_chunks):
    """Runs one forward or backward sweep, split into chunks when that fills the GPU better.

    With S > 1 chunks the sweep takes three steps:
      1. pass 1: each (sequence, chunk, channel block) program reduces its chunk to
         one affine map ``h -> prod * h + end`` (the product of its coefficients and its
         end state from zero);
      2. the states entering the chunks: a scan over the chunk axis of those maps
         (this same op on (N, S, D) tensors), started from h0 (forward) or 0 (backward);
      3. pass 0, chunked: each program rescans its chunk from its entering state, writing outputs.
    """
    B, T, D = x.shape
    N = num_sequences(B, cu_seqlens)
    if N == 0 or D == 0:
        return
    model = device_model(x.device)  # the CUDA device, LINREC_DEVICE_MODEL, or None (interpreter plan)
    cfg = _config(x.dtype, model is None, D)
    if num_chunks is None:
        num_chunks = _auto_num_chunks(N, D, T, cu_seqlens, cfg, model)
    a_real = _real(a.expand(B, T, D))
    s_b, s_t, s_d = a_real.stride()[:3]
    dummy = _real(out)  # stands in for pointers a launch does not use

    def launch(chunk_len, S, carry_in=None, chunk_a=None, chunk_x=None):
        grid = (triton.cdiv(D, cfg["BLOCK_D"]), N, S)
        diagonal_scan_kernel[grid](
            a_real, _real(x), _real(h0) if h0 is not None else dummy, _real(out),
            _real(h) if h is not None else dummy,
            _real(grad_a) if grad_a is not None else dummy,
            _real(grad_h0) if grad_h0 is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy,
            _real(carry_in) if carry_in is not None else dummy,
            _real(chunk_a) if chunk_a is not None else dummy,
            _real(chunk_x) if chunk_x is not None else dummy,
            T, D, chunk_len, s_b, s_t, s_d,
            HAS_H0=h0 is not None, VARLEN=cu_seqlens is not None, REVERSE=reverse, BACKWARD=backward,
            PASS=1 if chunk_a is not None else 0, CHUNKED=carry_in is not None or chunk_a is not None,
            IS_COMPLEX=x.is_complex(), ACC=tl_accumulation_dtype(x.dtype),
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )

    if num_chunks <= 1:
        launch(max(T, 1), 1)
        return
    max_len = T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    chunk_len = triton.cdiv(triton.cdiv(max(max_len, 1), num_chunks), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    S = triton.cdiv(max(max_len, 1), chunk_len)
    acc = accumulation_dtype(x.dtype)
    chunk_a = torch.empty((N, S, D), dtype=acc, device=x.device)
    chunk_x = torch.empty((N, S, D), dtype=acc, device=x.device)
    launch(chunk_len, S, chunk_a=chunk_a, chunk_x=chunk_x)
    if h0 is not None and not backward:
        entering = h0.to(acc)
    else:
        entering = torch.zeros((N, D), dtype=acc, device=x.device)
    ends = diagonal_scan_forward(chunk_a, chunk_x, entering, cu_seqlens=None, reverse=False, num_chunks=1)
    carry_in = torch.cat([entering[:, None], ends[:, :-1]], dim=1)
    launch(chunk_len, S, carry_in=carry_in)


def diagonal_scan_forward(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                          cu_seqlens: Optional[torch.Tensor], reverse: bool,
                          num_chunks: Optional[int] = None) -> torch.Tensor:
    """States of ``h_t = a_t * h_{t-1} + x_t``.

    Args:
        a: broadcastable to (B, T, D), same real/complex kind as x (strides kept, broadcast is free).
        x: (B, T, D) float32 | bfloat16 | float16 | float64 | complex64 | complex128.
        initial_state: (N, D) or None. cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.
        num_chunks: split each sequence into this many chunks run in parallel
            (None: chosen from the device and the shape; 1 on the CPU interpreter unless
            LINREC_DEVICE_MODEL names a GPU to plan for).

    Returns:
        h: (B, T, D) in x's dtype.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    h0 = initial_state.contiguous() if initial_state is not None else None
    _sweep(a, x, h0, out, None, None, None, cu_seqlens, reverse, False, num_chunks)
    return out


def diagonal_scan_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                           initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                           reverse: bool, x_dtype: torch.dtype, num_chunks: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan in one sweep (the reverse scan, with dL/da and dL/dh0 fused in).

    Args:
        a: as forward; h: (B, T, D) forward states; grad_h: (B, T, D) dL/dh (any strides).
        initial_state: (N, D) or None; x_dtype: dtype for dL/dx; num_chunks: as forward.

    Returns:
        grad_a: (B, T, D) in the accumulation dtype (summing over broadcast dims is the caller's),
        grad_x: (B, T, D) in x_dtype, grad_initial_state: (N, D) in the accumulation dtype.
    """
    B, T, D = h.shape
    N = num_sequences(B, cu_seqlens)
    acc = accumulation_dtype(h.dtype)
    grad_h = grad_h.contiguous()
    h = h.contiguous()
    grad_x = torch.empty((B, T, D), dtype=x_dtype, device=h.device)
    grad_a = torch.empty((B, T, D), dtype=acc, device=h.device)
    grad_h0 = torch.zeros((N, D), dtype=acc, device=h.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    _sweep(a, grad_h, h0, grad_x, h, grad_a, grad_h0, cu_seqlens, reverse, True, num_chunks)
    return grad_a, grad_x, grad_h0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps) for every launch the GPU launcher makes.

    float16 takes bfloat16's code path and tile sizes, so bfloat16 stands for both.
    """
    for dtype_name, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                    ("complex64", torch.complex64)):
        elem = "fp32" if dtype_name == "complex64" else dtype_name
        cfg = _config(torch_dtype, interpret=False)
        sig = {
            "a_ptr": f"*{elem}", "x_ptr": f"*{elem}", "h0_ptr": f"*{elem}",
            "out_ptr": f"*{elem}", "h_ptr": f"*{elem}", "grad_a_ptr": "*fp32", "grad_h0_ptr": "*fp32",
            "cu_seqlens_ptr": "*i32", "carry_in_ptr": "*fp32", "chunk_a_ptr": "*fp32", "chunk_x_ptr": "*fp32",
            "T": "i32", "D": "i32", "CHUNK_LEN": "i32",
            "stride_ab": "i64", "stride_at": "i64", "stride_ad": "i64",
        }
        for backward in (False, True):
            for reverse in (False, True):
                for varlen in (False, True):
                    for pass_, chunked in ((0, False), (1, True), (0, True)):
                        constexprs = dict(HAS_H0=True, VARLEN=varlen, REVERSE=reverse, BACKWARD=backward,
                                          PASS=pass_, CHUNKED=chunked,
                                          IS_COMPLEX=dtype_name == "complex64", ACC=tl.float32,
                                          BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"])
                        yield diagonal_scan_kernel, sig, constexprs, cfg["num_warps"]
