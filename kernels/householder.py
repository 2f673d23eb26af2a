"""Triton kernels for the Householder-product scan (DeltaNet, Gated DeltaNet, DeltaProduct).

Notation (see ``linrec/householder/chunked.py`` for the derivation). A token with
n factors is n sub-steps; sub-step s = t * n + j carries k, v, beta of factor j of
token t and the log-gate ``lg_s`` (log_gate_t when j = 0, else 0). A chunk holds
C = 64 // n whole tokens, L = C * n <= 64 sub-steps, padded to BL = 64 rows.
Inside a chunk, G is the inclusive cumulative log-gate (summed in float64, so a
hard reset does not wipe out the small gates after it), and::

    A    = strictly-lower(diag(beta) exp(G_i - G_m) K K^T)      (L, L)
    Tinv = (I + A)^{-1}                                          unit lower triangular
    w    = Tinv diag(beta exp(G)) K,   u = Tinv diag(beta) V     (L, K), (L, V)
    d    = u - w S0                                              S0: state entering the chunk
    o    = scale (exp(G_r) Q S0 + (exp(G_r - G_m) Q K^T)_{m <= r} d)     r = the token's last sub-step
    S1   = exp(G_L) S0 + (exp(G_L - G) K)^T d                   state leaving the chunk

Forward: ``_wy_fwd_kernel`` (all chunks in parallel, everything that does not depend on the
carried state: A; Tinv by 16 x 16 diagonal blocks, inverted together by forward substitution in
15 steps and merged by doubling with products, see ``_unit_lower_inverse``; w, G and the causal
part of Q K^T, once per chunk; for fp32 inputs also u = Tinv diag(beta) V, which the state pass
overwrites with d), then ``_state_fwd_kernel`` (per sequence, head and block of V columns,
sequentially over chunks: for bf16 / fp16 inputs u = Tinv diag(beta) V for its V columns, never
stored; d, the state entering every chunk and the final state), then ``_output_kernel`` (all chunks in parallel:
o from Q, Q K^T, the chunk-entry states and d). ``S1 = M S0 + c`` is affine in S0, so the state
pass holds only the products with the carried state (w S0 and the update) and runs them 16
sub-steps at a time, in one software-pipelined loop over (chunk, piece); its fp32 state stays in
registers across that loop (a (K / BK, BK, BV) tile: the K-long products are batched over K
blocks), and it writes the chunk states in a blocked layout of its own (``_chunk_state_offsets``).
Everything that does not depend on the
carried state is in the chunk-parallel kernels. The forward hands Tinv to the backward (the op's
autograd saves it; ``return_saved``); the backward reruns ``_wy_fwd_kernel`` reading it (w, G,
Q K^T: no K K^T, no inverse) and the state pass, for the chunk-entry states and d.

Decoding: ``_recurrent_fwd_kernel`` applies the sub-steps one by one with the state
in registers; the op uses it for forward passes of at most ``RECURRENT_MAX_T`` tokens.

Backward, with dS the gradient of the state leaving a chunk:
``_state_bwd_kernel`` walks the chunks in reverse, ``dd = P^T dO + (exp(G_L - G) K) dS``
(stored for the next kernel; its state-independent part, scale P^T dO, is formed by the backward's
``_wy_fwd_kernel``) and ``dS0 = exp(G_L) dS + scale (exp(G_r) Q)^T dO - w^T dd`` (the adjoint
of the same affine map, in the forward pass's pipelined loop over (chunk, piece)), storing dS
per chunk; ``_local_bwd_kernel`` then
computes, for all chunks in parallel, the gradients of q, k, v, beta and log_gate from d,
dd, S0, dS and Tinv (``dA = -(Tinv^T dd) d^T`` restricted to the strictly lower triangle,
which is ``-(Tinv^T du u^T + Tinv^T dw w^T)`` with du = dd, dw = -dd S0^T and w S0 = u - d,
and the rest by the chain rule through the formulas above).

Precision: fp32 inputs multiply as 3xTF32 ("tf32x3"): each fp32 operand is split into a TF32
high part and a TF32 low part (x - hi), and hi hi + hi lo + lo hi, three tensor-core TF32
products, is accumulated in fp32 (about 2^-21 relative error per product, against 2^-11 for one
TF32 product: fp32-level results, within the 1e-5 of the float64 reference, checked with the
GPU's arithmetic emulated in the interpreter, tests/test_householder.py). Exact "ieee" fp32
products were lowered to FMA loops that hold operand rows in registers, and every fp32 chunk and
state kernel spilled, up to 3.4 KB per thread with Triton 3.9 and 5.3 KB with 3.6 (ptxas;
bench/results/householder-traffic.md). With 3xTF32 the state passes take each chunk 16 rows at a
time for every dtype (``_state_fwd_piece``, ``_state_bwd_piece``), which keeps their product
operands small. The tensor cores run three TF32 products per fp32 product. For bf16 / fp16 inputs the
products of two input tiles (K K^T, Q K^T, in ``_wy_fwd_kernel``) take bf16 / fp16 operands;
every product with a computed operand (Tinv, scores, d, dd, dL/dA) takes fp32 operands as TF32 (bf16 operands
there were measured past the 1e-2 accuracy bound, see ``_dot32``), but Q S0 in ``_output_kernel``,
whose S0 is stored in the inputs' dtype. Accumulation is fp32 throughout, and the state passes
carry the states in fp32; w, Tinv and the chunk states and their gradients handed to the
chunk-parallel kernels are stored in the inputs' dtype (the states: bf16 relative errors of the
gradients up to 6.0e-3 instead of 4.6e-3, measured with TF32 emulated; of o 4.6e-3 / 4.8e-3 instead
of 4.4e-3 / 3.5e-3 at K = 16 / 128, interpreter), Q K^T, d and dd in fp32, and the kernels write
every gradient in its input's dtype.

Only plain pointer arithmetic with masks is used (no block pointers), and offsets
that can pass 2**31 are int64.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from linrec._common import HOUSEHOLDER_RECURRENT_MAX_T as RECURRENT_MAX_T
from linrec._common import HOUSEHOLDER_SUBSTEPS_PER_CHUNK as SUBSTEPS_PER_CHUNK
from linrec._common import num_sequences

from . import config_override


# ----------------------------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, ref_ptr, PREC: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr):
    """a @ b for operands stored in the inputs' dtype (q, k), accumulated in fp32.

    LOWP (bf16 / fp16 inputs): the operands stay in the element type of ``ref_ptr`` (exact: they
    are the inputs), the tensor cores' full rate; otherwise fp32 operands with input precision
    PREC ("tf32x3" for fp32 inputs: 3xTF32, see the module docstring). Under the interpreter (INTERP), whose
    ``tl.dot`` on bf16 operands is wrong, the same values are multiplied as fp32 (products of
    bf16 / fp16 values are exact in fp32: the GPU's arithmetic up to the order of accumulation).
    """
    if LOWP:
        if INTERP:
            a = a.to(ref_ptr.dtype.element_ty).to(tl.float32)
            b = b.to(ref_ptr.dtype.element_ty).to(tl.float32)
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a.to(ref_ptr.dtype.element_ty), b.to(ref_ptr.dtype.element_ty))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _dot32(a, b, PREC: tl.constexpr):
    """a @ b with fp32 operands (input precision PREC: "tf32x3" for fp32 inputs, "tf32" for bf16 /
    fp16 ones) and fp32 accumulation: every product with a computed operand (states, Tinv,
    scores, d, dd, ...). Rounding those to bf16 instead was measured (the interpreter, every
    product on its own, test_half_precision's case): each adds 1e-3 to 5e-3 of relative error to
    o or a gradient, and together they exceed the 1e-2 bound (1.5e-2 for o, 1.8e-2 for dk)."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _split_nonfinite(x, rows, BL: tl.constexpr):
    """For a (BL, BX) tile whose rows are sub-steps: (x with non-finite entries set to 0,
    (BX,) index of the first row holding one in each column, BL where none).

    Products with causally masked (lower-triangular) left operands would otherwise add
    0 * NaN to earlier rows; ``_poison_from`` puts the NaN back where causality says."""
    finite = tl.abs(x) < float("inf")
    first_bad = tl.min(tl.where(finite, BL, rows[:, None]), axis=0)
    return tl.where(finite, x, 0.0), first_bad


@triton.jit
def _poison_from(y, row_pos, first_bad):
    """NaN in y[i, j] wherever row i (at sub-step ``row_pos[i]``) is at or past ``first_bad[j]``."""
    return tl.where(row_pos[:, None] >= first_bad[None, :], float("nan"), y)


@triton.jit
def _pick(x, axis: tl.constexpr, index: tl.constexpr):
    """x[..., index, ...] along ``axis``, a dimension of size 2 (a masked sum: no gather)."""
    if axis == 1:
        return tl.sum(tl.where(tl.arange(0, 2)[None, :, None, None] == index, x, 0.0), axis=1)
    else:
        return tl.sum(tl.where(tl.arange(0, 2)[None, None, :, None] == index, x, 0.0), axis=2)


@triton.jit
def _unit_lower_inverse(A, BL: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^{-1} for a strictly lower-triangular (BL, BL) fp32 tile A of finite entries
    (BL = 16 * 2^j), with no serial chain longer than 15 steps.

    1. The BL / 16 diagonal 16 x 16 blocks, held as one (NB, 16, 16) tile, are inverted
       together by forward substitution: row s of each block's inverse is e_s - A[s, :s] T[:s, :]
       (rows before s are final), 15 dependent steps for all blocks at once.
    2. Pairs of neighbouring diagonal blocks of size m are merged into blocks of size 2m, all
       pairs at once, until one block remains. For a 2m block [[A11, 0], [A21, A22]] with
       T11 = (I + A11)^{-1} and T22 = (I + A22)^{-1},
           (I + A)^{-1} = [[T11, 0], [-T22 A21 T11, T22]],
       two batched (m x m) products per level: 16^3 and 32^3 multiply-adds per pair, not 64^3.
    No division anywhere: a hard reset (exp(G_i - G_m) = 0) gives exact zeros.
    """
    NB: tl.constexpr = BL // 16
    r16 = tl.arange(0, 16)
    blk = tl.arange(0, NB)
    same_blk = blk[:, None, None, None] == blk[None, None, :, None]          # (NB, 1, NB, 1)
    # The diagonal blocks: A viewed as (NB, 16, NB, 16), the two block indices equal.
    Ad = tl.sum(tl.where(same_blk, tl.reshape(A, (NB, 16, NB, 16)), 0.0), axis=2)   # (NB, 16, 16)
    eye = tl.where(r16[:, None] == r16[None, :], 1.0, 0.0)
    T = eye[None, :, :] + tl.zeros((NB, 16, 16), tl.float32)
    for s in range(1, 16):
        at_s = r16[None, :, None] == s
        a_s = tl.sum(tl.where(at_s, Ad, 0.0), axis=1)                       # (NB, 16): row s of each block
        row = tl.sum(a_s[:, :, None] * T, axis=1)                            # (NB, 16): a_s @ T
        T = tl.where(at_s, T - row[:, None, :], T)
    for lvl in tl.static_range(8):
        if (16 << lvl) < BL:
            # T: (P * 2, m, m), the inverses of the diagonal blocks of size m = 16 << lvl.
            T4 = tl.reshape(T, (BL // (32 << lvl), 2, 16 << lvl, 16 << lvl))
            T11 = _pick(T4, 1, 0)                                            # (P, m, m)
            T22 = _pick(T4, 1, 1)
            # A21 of every 2m diagonal block: A restricted to the diagonal 2m blocks, then its
            # lower-left m x m quarter.
            pair = tl.arange(0, BL // (32 << lvl))
            A2 = tl.sum(tl.where(pair[:, None, None, None] == pair[None, None, :, None],
                                 tl.reshape(A, (BL // (32 << lvl), 32 << lvl, BL // (32 << lvl), 32 << lvl)), 0.0),
                        axis=2)                                              # (P, 2m, 2m)
            A21 = _pick(tl.reshape(_pick(tl.reshape(A2, (BL // (32 << lvl), 2, 16 << lvl, 32 << lvl)), 1, 1),
                                   (BL // (32 << lvl), 16 << lvl, 2, 16 << lvl)), 2, 0)     # (P, m, m)
            T21 = -tl.dot(T22, tl.dot(A21, T11, input_precision=PREC), input_precision=PREC)
            # Assemble [[T11, 0], [T21, T22]] as (P, 2m, 2m).
            half = tl.arange(0, 2)[None, None, :, None]
            top = tl.reshape(tl.where(half == 0, T11[:, :, None, :], 0.0),
                             (BL // (32 << lvl), 16 << lvl, 32 << lvl))
            bottom = tl.reshape(tl.where(half == 0, T21[:, :, None, :], T22[:, :, None, :]),
                                (BL // (32 << lvl), 16 << lvl, 32 << lvl))
            T = tl.reshape(tl.where(tl.arange(0, 2)[None, :, None, None] == 0, top[:, None, :, :],
                                    bottom[:, None, :, :]),
                           (BL // (32 << lvl), 32 << lvl, 32 << lvl))
    return tl.reshape(T, (BL, BL))


# ----------------------------------------------------------------------------------------------
# Forward kernel 1: the chunk-local WY representation, all chunks in parallel.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _wy_fwd_kernel(
    q_ptr,        # (B*T, H, K) queries, contiguous, any float dtype
    k_ptr,        # (B*T*n, H, K) keys
    beta_ptr,     # (B*T*n, H)
    lg_ptr,       # (B*T, H) log-gates, read when HAS_GATE
    w_ptr,        # out (B*T*n, H, K) work dtype (fp32, or the bf16 / fp16 of the inputs)
    tinv_ptr,     # out (B*T*n, H, BL) work dtype: rows of (I + A)^{-1}
    qk_ptr,       # out (B*T, H, BL) fp32: Q K^T, row c holding q_c . k_m for the sub-steps m <= c's last
    g_ptr,        # out (B*T*n, H) fp64: cumulative log-gate within the chunk
    do_ptr,       # (B*T, H, V) gradient of o, read when WITH_DO (the backward)
    dd_ptr,       # out (B*T*n, H, V) fp32, written when WITH_DO: scale P^T dO, dd's state-independent part
    v_ptr,        # (B*T*n, H, V) values, read when WITH_U
    u_ptr,        # out (B*T*n, H, V) fp32, written when WITH_U: u = Tinv diag(beta) V
    cu_tok_ptr,   # (N + 1,) int64 token offsets of the sequences
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_GATE: tl.constexpr, TINV_GIVEN: tl.constexpr, WITH_DO: tl.constexpr,
    WITH_U: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """One program per (chunk, sequence * head): A, Tinv = (I + A)^{-1}, w = Tinv diag(beta exp(G)) K,
    the causal part of Q K^T and G. Everything here is independent of the carried state. u =
    Tinv diag(beta) V: for bf16 / fp16 inputs left to the forward state pass (per V block, at no extra
    FLOPs: never written to memory); for fp32 inputs (WITH_U) computed here and written (fp32) for it,
    whose 3xTF32 product with Tinv held 100-150 registers more than the rest of its pass (see
    ``_config``). Q K^T is computed once per chunk here rather than once per V block in each state
    pass. TINV_GIVEN (the backward, with the forward's Tinv): Tinv is read from
    ``tinv_ptr`` instead of computed (no K K^T, no inverse). WITH_DO (the backward): also the part of
    dd = dL/dd that does not depend on the carried state, scale P^T dO with P = (exp(G_r - G_m) Q K^T)
    restricted to m <= r (r a token's last sub-step), for the adjoint state pass to complete: formed
    here from the Q K^T this program holds, not in the sequential pass."""
    chunk = tl.program_id(0)
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    head = pid_nh % H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    tok0 = bos + chunk * CT
    if tok0 >= eos:
        return
    n_sub = tl.minimum(eos - tok0, CT) * NFAC     # valid sub-steps in this chunk
    sub0 = tok0 * NFAC                            # global index of its first sub-step

    rows = tl.arange(0, BL)
    valid = rows < n_sub
    sub = (sub0 + rows).to(tl.int64)
    beta = tl.load(beta_ptr + sub * H + head, mask=valid, other=0.0).to(tl.float32)
    if HAS_GATE:
        first = valid & (rows % NFAC == 0)        # the gate acts at each token's first sub-step
        lg = tl.load(lg_ptr + (tok0 + rows // NFAC).to(tl.int64) * H + head, mask=first, other=0.0)
        G = tl.cumsum(lg.to(tl.float64), 0)
    else:
        G = tl.zeros((BL,), tl.float64)
    tl.store(g_ptr + sub * H + head, G, mask=valid)

    # A[i, m] = beta_i exp(G_i - G_m) k_i . k_m for m < i (both valid), else 0; K K^T is
    # accumulated over blocks of BK key columns.
    # Q K^T likewise (token rows c, sub-step columns m), kept where m <= r_c, the token's last
    # sub-step: the state passes and the chunk-local backward read it from here.
    tok_rows = tl.arange(0, BC)
    valid_tok = tok_rows < n_sub // NFAC
    tok = (tok0 + tok_rows).to(tl.int64)
    kkt = tl.zeros((BL, BL), tl.float32)
    qk = tl.zeros((BC, BL), tl.float32)
    for k0 in range(0, K, BK):
        cols_k = k0 + tl.arange(0, BK)
        k_ok = cols_k[None, :] < K
        kk = tl.load(k_ptr + (sub[:, None] * H + head) * K + cols_k[None, :], mask=valid[:, None] & k_ok, other=0.0)
        q = tl.load(q_ptr + (tok[:, None] * H + head) * K + cols_k[None, :], mask=valid_tok[:, None] & k_ok,
                    other=0.0)
        if not TINV_GIVEN:
            kkt += _mm(kk, tl.trans(kk), k_ptr, PREC, LOWP, INTERP)
        qk += _mm(q, tl.trans(kk), q_ptr, PREC, LOWP, INTERP)
    read = (rows[None, :] <= (tok_rows * NFAC + NFAC - 1)[:, None]) & valid[None, :] & valid_tok[:, None]
    tl.store(qk_ptr + (tok[:, None] * H + head) * BL + rows[None, :], qk, mask=read)
    if WITH_DO:
        # scale P^T dO, (BL, BV) per block of V, from the Q K^T held here (the backward reads Tinv, so
        # the inverse's registers are free: no spills; read back from memory after a barrier instead,
        # it cost 130 B per token and head of (L2) reads). G_r, G at each token's last sub-step, is the
        # cumulative sum of the tokens' log-gates.
        if HAS_GATE:
            lg_tok = tl.load(lg_ptr + tok * H + head, mask=valid_tok, other=0.0)
            G_r = tl.cumsum(lg_tok.to(tl.float64), 0)
        else:
            G_r = tl.zeros((BC,), tl.float64)
        decay_read = tl.exp(tl.where(read, (G_r[:, None] - G[None, :]).to(tl.float32), float("-inf")))
        P_t = tl.trans(tl.where(decay_read > 0.0, decay_read * qk, 0.0))            # (BL, BC)
        for v0 in range(0, V, BV):
            cols_v = v0 + tl.arange(0, BV)
            v_ok = cols_v < V
            do = tl.load(do_ptr + (tok[:, None] * H + head) * V + cols_v[None, :],
                         mask=valid_tok[:, None] & v_ok[None, :], other=0.0)
            tl.store(dd_ptr + (sub[:, None] * H + head) * V + cols_v[None, :], scale * _dot32(P_t, do, PREC),
                     mask=valid[:, None] & v_ok[None, :])
    if TINV_GIVEN:
        tinv = tl.load(tinv_ptr + (sub[:, None] * H + head) * BL + rows[None, :], mask=valid[:, None], other=0.0)
    else:
        tinv = _chunk_inverse(kkt, beta, G, rows, valid, tinv_ptr, sub, head, H, BL, PREC)

    # w = Tinv diag(beta exp(G)) K, and for fp32 inputs u = Tinv diag(beta) V.
    _tinv_apply(tinv, k_ptr, w_ptr, beta * tl.exp(G.to(tl.float32)), sub, head, H, K, rows, valid, BL, BK, PREC)
    if WITH_U:
        _tinv_apply(tinv, v_ptr, u_ptr, beta, sub, head, H, V, rows, valid, BL, BV, PREC)


@triton.jit
def _tinv_apply(tinv, x_ptr, out_ptr, row_scale, sub, head, H, D, rows, valid, BL: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr):
    """out = Tinv diag(row_scale) X for one chunk, BD columns at a time: X the chunk's (BL, D) rows of an
    (..., H, D) tensor (rows ``sub``, head ``head``; ``valid`` masks the chunk's sub-steps), Tinv (BL, BL),
    row_scale (BL,) fp32; stored in ``out_ptr``'s dtype at the same offsets. Non-finite values of
    diag(row_scale) X are zeroed in the product and put back in the rows at or past them."""
    for c0 in range(0, D, BD):
        cols = c0 + tl.arange(0, BD)
        off = (sub[:, None] * H + head) * D + cols[None, :]
        mask = valid[:, None] & (cols[None, :] < D)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rhs, first_bad = _split_nonfinite(x * row_scale[:, None], rows, BL)
        out = _poison_from(_dot32(tinv, rhs, PREC), rows, first_bad)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_inverse(kkt, beta, G, rows, valid, tinv_ptr, sub, head, H, BL: tl.constexpr, PREC: tl.constexpr):
    """Tinv = (I + A)^{-1} of one chunk from its (BL, BL) fp32 K K^T; stored to ``tinv_ptr`` and returned,
    (BL, BL) in the work dtype."""
    strict = (rows[:, None] > rows[None, :]) & valid[:, None] & valid[None, :]
    diff = tl.where(strict, (G[:, None] - G[None, :]).to(tl.float32), float("-inf"))
    # Masks go through where, not a product: 0 * NaN would carry a later NaN back in time.
    A = tl.where(strict, beta[:, None] * tl.exp(diff) * kkt, 0.0)

    # Non-finite values (NaN / inf in k, beta or the gates, or an overflow) are causal: row i
    # of A holds sub-steps <= i only, and row i of (I + A)^{-1} depends on rows <= i of A. The
    # inverse is taken of A with the rows from the first non-finite one on cleared, and those
    # rows of the result are NaN (what substitution through them would give).
    row_ok = tl.min(tl.where(tl.abs(A) < float("inf"), 1, 0), axis=1)
    bad_row = tl.min(tl.where(row_ok == 1, BL, rows), axis=0)
    A = tl.where(rows[:, None] < bad_row, A, 0.0)
    tinv = _unit_lower_inverse(A, BL, PREC)
    tinv = tl.where(rows[:, None] < bad_row, tinv, float("nan")).to(tinv_ptr.dtype.element_ty)
    tl.store(tinv_ptr + (sub[:, None] * H + head) * BL + rows[None, :], tinv, mask=valid[:, None])
    return tinv


@triton.jit
def _state_program(cu_tok_ptr, cu_chunk_ptr, H):
    """What a program of the state passes (grid (V blocks, N * H)) works on.

    Returns (head, bos, eos, chunk_base, n_chunks): the head; the sequence's token span [bos, eos);
    the index of its first chunk and its number of chunks.
    """
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    head = pid_nh % H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    chunk_base = tl.load(cu_chunk_ptr + seq)
    n_chunks = tl.load(cu_chunk_ptr + seq + 1) - chunk_base
    return head, bos, eos, chunk_base, n_chunks


@triton.jit
def _state_slice(K, V, NKB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """(offsets, mask) of a state pass program's (NKB, BK, BV) slice of its sequence and head's (K, V)
    state in an (N, H, K, V) tensor (the initial and final states and their gradients): int64 offsets,
    built from the program ids (program_id(1) = sequence * H + head, program_id(0) the V block) where
    they are used, so that none is held across the chunk loop (held, they spilled at maxnreg 128)."""
    rows_k = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    cols_v = tl.program_id(0) * BV + tl.arange(0, BV)[None, None, :]
    return tl.program_id(1).to(tl.int64) * K * V + rows_k * V + cols_v, (rows_k < K) & (cols_v < V)


@triton.jit
def _chunk_program(cu_tok_ptr, cu_chunk_ptr, H, CT: tl.constexpr):
    """What a program of the chunk-parallel kernels (grid (chunks, N * H, ...)) works on: (head, tok0,
    eos, chunk_idx), the head, the first token of its chunk and the end of its sequence (the program
    has nothing to do when tok0 >= eos: past its sequence's last chunk), and the chunk's index among
    all sequences' chunks (int64: the offsets are)."""
    chunk = tl.program_id(0)
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    return pid_nh % H, bos + chunk * CT, eos, tl.load(cu_chunk_ptr + seq) + chunk


@triton.jit
def _chunk_span(tok0, eos, CT: tl.constexpr, NFAC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """The rows of the chunk that starts at token ``tok0`` of a sequence ending at ``eos``.

    Returns (sub0, n_sub, valid, valid_tok, sub, tok): the global index of the chunk's first
    sub-step (NFAC per token) and its number of valid sub-steps; masks of the valid sub-step
    rows (BL,) and token rows (BC,); the int64 global sub-step (BL,) and token (BC,) indices.
    """
    n_tok = tl.minimum(eos - tok0, CT)
    n_sub = n_tok * NFAC
    sub0 = tok0 * NFAC
    valid = tl.arange(0, BL) < n_sub
    valid_tok = tl.arange(0, BC) < n_tok
    sub = (sub0 + tl.arange(0, BL)).to(tl.int64)
    tok = (tok0 + tl.arange(0, BC)).to(tl.int64)
    return sub0, n_sub, valid, valid_tok, sub, tok


@triton.jit
def _chunk_decays(g_ptr, sub, tok_rows, valid, valid_tok, sub0, n_sub, head, H, NFAC: tl.constexpr,
                  BL: tl.constexpr):
    """Loads G and returns (G, G_L, G_r, decay_last, decay_read) for one chunk.

    G: (BL,) fp64; G_L: G at the chunk's last valid sub-step (scalar, fp64);
    G_r: (BC,) G at each token's last sub-step (fp64);
    decay_last: (BL,) exp(G_L - G_m) for valid m, else 0;
    decay_read: (BC, BL) exp(G_r - G_m) for valid m <= r, else 0.
    """
    rows = tl.arange(0, BL)
    G = tl.load(g_ptr + sub * H + head, mask=valid, other=0.0)
    G_L = tl.load(g_ptr + (sub0 + n_sub - 1) * H + head)
    r = tok_rows * NFAC + NFAC - 1
    G_r = tl.load(g_ptr + (sub0 + r).to(tl.int64) * H + head, mask=valid_tok, other=0.0)
    decay_last = tl.exp(tl.where(valid, (G_L - G).to(tl.float32), float("-inf")))
    read = (rows[None, :] <= r[:, None]) & valid[None, :] & valid_tok[:, None]
    decay_read = tl.exp(tl.where(read, (G_r[:, None] - G[None, :]).to(tl.float32), float("-inf")))
    return G, G_L, G_r, decay_last, decay_read


@triton.jit
def _load_scores(qk_ptr, tok, valid, valid_tok, head, H, NFAC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """The chunk's Q K^T as ``_wy_fwd_kernel`` stored it: (BC, BL) fp32, row c holding q_c . k_m for
    the valid sub-steps m <= r_c (the token's last sub-step), zeros elsewhere."""
    rows = tl.arange(0, BL)
    r = tl.arange(0, BC) * NFAC + NFAC - 1
    read = (rows[None, :] <= r[:, None]) & valid[None, :] & valid_tok[:, None]
    return tl.load(qk_ptr + (tok[:, None] * H + head) * BL + rows[None, :], mask=read, other=0.0)


# ----------------------------------------------------------------------------------------------
# The state kernels: one program per (sequence, head, block of BV state columns) holds its
# (K, BV) fp32 slice of the state (or of its gradient) in registers across the chunk loop and
# per chunk reads only the chunk's tiles. The slice is a (NKB, BK, BV) tile, K in NKB = BKF / BK
# blocks, and the K-long products are batched products over the blocks summed over the batch:
# each product's reduction is then at most 64 long (which kept the exact fp32 "ieee" products, done
# with FMAs, in registers when fp32 inputs used them; they now take 3xTF32 tensor-core products).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kblocks(ptr, rows, rows_ok, head, H, K, NKB: tl.constexpr, BK: tl.constexpr):
    """The (rows, K) tile of a (..., H, K) tensor, as (NKB, len(rows), BK): block b holds
    columns b * BK .. b * BK + BK - 1 (zeros past K and in masked rows)."""
    cols = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, None, :]
    return tl.load(ptr + (rows[None, :, None] * H + head) * K + cols, mask=rows_ok[None, :, None] & (cols < K),
                   other=0.0)


@triton.jit
def _bdot(a, b, PREC: tl.constexpr):
    """Batched a @ b with fp32 operands (input precision PREC) and fp32 accumulation."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _chunk_state_offsets(rows_k, cols_v, KP: tl.constexpr, VB: tl.constexpr):
    """Offsets of the elements (rows_k, cols_v) (broadcast against each other) of one head's state in
    the layout of the chunk-state buffers (``states``, ``dstates``: (chunks, H, cdiv(V, VB), KP, VB),
    K padded to KP = BKF and V to VB = BVS columns a block): each state-pass program's (K, VB) slice is
    one contiguous block, which it stores with compile-time offsets and no mask (the padding holds
    zeros: the states' rows past K and columns past V are zeros)."""
    return (cols_v // VB) * (KP * VB) + rows_k * VB + cols_v % VB


@triton.jit
def _chunk_state_block(ptr, chunk_base, head, H, V, NKB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A state pass program's block of the chunk-state layout (``_chunk_state_offsets``, BV = VB and
    NKB * BK = KP): returns (ptr, block, offsets), ``ptr`` moved to the program's block of its
    sequence's first chunk (chunk c's is ``c * H * block`` further), ``block`` the elements of one
    head's chunk state, and the (NKB, BK, BV) int32 offsets within the block, compile-time
    constants a thread (stored with no mask: the padding rows and columns hold zeros)."""
    block = tl.cdiv(V, BV) * NKB * BK * BV
    ptr += (chunk_base * H + head) * block + tl.program_id(0) * NKB * BK * BV
    rows_k = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    return ptr, block, rows_k * BV + tl.arange(0, BV)[None, None, :]


@triton.jit
def _state_fwd_piece(S, S_next, k_ptr, v_ptr, beta_ptr, w_ptr, tinv_ptr, g_ptr, d_ptr, row0, n_sub, p0, G_L, H, K, V,
                     BL: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                     U_GIVEN: tl.constexpr):
    """One piece of 16 sub-steps (rows p0 .. p0 + 15 of its chunk) in ``_state_fwd_kernel``; returns
    S_next plus the piece's share of the state update.

    S: (NKB, BK, BV) fp32, the state entering the chunk (this program's BV columns of V, from
    ``program_id(0) * BV``); S_next: (NKB, BK, BV) fp32, exp(G_L) S0 plus the shares of the chunk's
    earlier pieces; row0: int64, (the chunk's first sub-step) * H + head; n_sub: int32, its valid
    sub-steps; G_L: fp64, G at its last sub-step. Writes d = u - w S0 of the piece's rows ((16, BV)
    of ``d_ptr``, fp32) and adds (exp(G_L - G) K)^T d of those rows to S_next.

    u = Tinv diag(beta) V of the piece's rows is one (16, BL) x (BL, BV) product (diag(beta) V's
    BL rows re-read per piece: L1 / L2 hits), or, U_GIVEN (fp32 inputs), read from ``d_ptr``, where
    ``_wy_fwd_kernel`` wrote it (d then overwrites it row for row: the pipeline's prefetch reads the
    next piece's rows, never rows already overwritten). k's piece is loaded transposed, (NKB, BK, 16), so that
    the update is a batched product with no permute of its result; the decays exp(G_L - G_m) scale
    the rows of d, a 2-D (16, BV) tile, not the 3-D k tile (in whose layout Triton 3.6 replicated
    per-row vectors). Every product has a computed operand and takes fp32 operands (PREC: "tf32x3"
    for fp32 inputs, "tf32" for bf16 / fp16, whose tiles are loaded as such and widened in
    registers). Rows past n_sub are masked to zeros (a chunk shorter than BL: its last pieces add
    nothing). Non-finite values of diag(beta) V are zeroed in the product and put back by
    ``_poison_from`` in the rows at or past them (Tinv's rows past a non-finite k are NaN already)."""
    # The chunk's rows are int32 offsets from 64-bit pointers moved to it (row0), which hold the head
    # and, for v and d, the program's first V column c0; they stay below 64 H max(K, V, BL), under
    # 2**31 for H max(K, V) < 2**25.
    c0 = tl.program_id(0) * BV
    cols_v = tl.arange(0, BV)                            # (this program's V columns, from c0)
    v_ok = cols_v < V - c0
    rp = p0 + tl.arange(0, 16)                           # the piece's sub-steps within the chunk
    ok = rp < n_sub
    d_ptrs = d_ptr + row0 * V + c0 + rp[:, None] * H * V + cols_v[None, :]
    if U_GIVEN:
        u = tl.load(d_ptrs, mask=ok[:, None] & v_ok[None, :], other=0.0)
    else:
        rows = tl.arange(0, BL)                          # the chunk's sub-steps
        rows_ok = rows < n_sub
        beta = tl.load(beta_ptr + row0 + rows * H, mask=rows_ok, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + row0 * V + c0 + rows[:, None] * H * V + cols_v[None, :],
                     mask=rows_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        rhs, first_bad_u = _split_nonfinite(vv * beta[:, None], rows, BL)
        tinv = tl.load(tinv_ptr + row0 * BL + rp[:, None] * H * BL + rows[None, :], mask=ok[:, None], other=0.0)
        u = _poison_from(_dot32(tinv, rhs, PREC), rp, first_bad_u)
    w = _kblocks(w_ptr + row0 * K, rp, ok, 0, H, K, NKB, BK)
    d = u - tl.sum(_bdot(w, S, PREC), axis=0)                                    # (16, BV)
    tl.store(d_ptrs, d.to(d_ptr.dtype.element_ty), mask=ok[:, None] & v_ok[None, :])
    G_p = tl.load(g_ptr + row0 + rp * H, mask=ok, other=0.0)
    decay_last = tl.exp(tl.where(ok, (G_L - G_p).to(tl.float32), float("-inf")))
    kT = _kblocks_t(k_ptr + row0 * K, rp, ok, 0, H, K, NKB, BK)                 # (NKB, BK, 16)
    return S_next + _bdot(kT, tl.broadcast_to((d * decay_last[:, None])[None, :, :], (NKB, 16, BV)), PREC)


# ----------------------------------------------------------------------------------------------
# Forward kernel 2: the state pass over chunks. It writes the state entering every chunk and
# d = u - w S0 of every sub-step (for ``_output_kernel`` in the forward, for the chunk-local
# backward in the backward's recomputation), and the final state when asked (the forward).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_fwd_kernel(
    k_ptr,        # (B*T*n, H, K)
    v_ptr,        # (B*T*n, H, V)
    beta_ptr,     # (B*T*n, H)
    w_ptr,        # (B*T*n, H, K) work dtype
    tinv_ptr,     # (B*T*n, H, BL) work dtype
    g_ptr,        # (B*T*n, H) fp64
    h0_ptr,       # (N, H, K, V) initial states, read when HAS_H0
    d_ptr,        # out (B*T*n, H, V) fp32: d = u - w S0 (U_GIVEN: holds u on entry)
    states_ptr,   # out (total chunks, H, cdiv(V, BV), NKB * BK, BV) state dtype: the state entering every chunk
    final_ptr,    # out (N, H, K, V) fp32, written when HAS_FINAL
    cu_tok_ptr,   # (N + 1,) int64 token offsets
    cu_chunk_ptr,  # (N + 1,) int64 chunk offsets (index of a sequence's first chunk)
    H, K, V,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    BV: tl.constexpr, HAS_H0: tl.constexpr, HAS_FINAL: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    U_GIVEN: tl.constexpr,
):
    """One program per (block of BV columns of V, sequence * head), sequential over the sequence's
    chunks, its (K, BV) fp32 slice of the state in registers across the chunk loop. Only the products
    that depend on the carried state are here (d = u - w S0 and the state update, ``_state_fwd_piece``);
    the outputs are ``_output_kernel``'s, chunk-parallel."""
    head, bos, eos, chunk_base, n_chunks = _state_program(cu_tok_ptr, cu_chunk_ptr, H)
    # What the loop below holds is kept small (at maxnreg 128 a few registers more spilled): the
    # sequence's sub-step rows as one 64-bit base (row_base: its first sub-step * H + head) and an int32
    # length; the chunk states through a pointer to this program's block of its first chunk's state in
    # the chunk-state layout (``_chunk_state_offsets``: contiguous, stored with constant offsets and no
    # mask); the initial and final states' offsets are built where used (``_state_slice``), the final
    # state stored by the loop's last iteration (stored after the loop, its offsets, shared with the
    # initial state's, were held across the loop: 8-12 B of spills at 8 warps and maxnreg 128).
    if HAS_H0:
        h0_off, h0_mask = _state_slice(K, V, NKB, BK, BV)
        S = tl.load(h0_ptr + h0_off, mask=h0_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((NKB, BK, BV), tl.float32)
    states_ptr, block, st_off = _chunk_state_block(states_ptr, chunk_base, head, H, V, NKB, BK, BV)
    row_base = bos * NFAC * H + head
    seq_len = (eos - bos).to(tl.int32)
    # One loop over (chunk, piece of 16 sub-steps), NP = BL / 16 pieces a chunk, software-pipelined
    # STAGES deep: the next piece's tiles (of the next chunk, at a chunk's last piece) are loaded while
    # this one's products run. A chunk's first piece stores the state entering it and starts
    # S_next = exp(G_L) S0; its last piece makes S_next the state. (A loop over chunks holding a
    # loop over pieces was not pipelined at all: Triton pipelines innermost loops only.) An empty
    # sequence (no chunks) runs one chunk's pieces with no valid row (n_sub = 0: every load masked,
    # G_L = 0), which store no chunk state and leave the state as it came, so that the last iteration
    # still stores the final state.
    NP: tl.constexpr = BL // 16
    n_iter = tl.maximum(n_chunks, 1) * NP
    S_next = S
    for i in tl.range(0, n_iter, num_stages=STAGES):
        c = i // NP
        p0 = (i % NP) * 16
        n_sub = tl.minimum(seq_len - c * CT, CT) * NFAC
        row0 = row_base + (c * CT * NFAC).to(tl.int64) * H
        G_L = tl.load(g_ptr + row0 + (n_sub - 1) * H, mask=n_sub > 0, other=0.0)
        if p0 == 0:
            if n_chunks > 0:
                tl.store(states_ptr + c.to(tl.int64) * H * block + st_off, S.to(states_ptr.dtype.element_ty))
            S_next = tl.exp(G_L.to(tl.float32)) * S
        S_next = _state_fwd_piece(S, S_next, k_ptr, v_ptr, beta_ptr, w_ptr, tinv_ptr, g_ptr, d_ptr, row0, n_sub, p0,
                                  G_L, H, K, V, BL, BK, NKB, BV, PREC, U_GIVEN)
        if p0 == BL - 16:
            S = S_next
            if HAS_FINAL:
                if i == n_iter - 1:
                    f_off, f_mask = _state_slice(K, V, NKB, BK, BV)
                    tl.store(final_ptr + f_off, S, mask=f_mask)


# ----------------------------------------------------------------------------------------------
# Forward kernel 3: the outputs, all chunks in parallel, from the states the state pass wrote.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _output_kernel(
    q_ptr,        # (B*T, H, K)
    qk_ptr,       # (B*T, H, BL) fp32: the causal part of Q K^T (from _wy_fwd_kernel)
    g_ptr,        # (B*T*n, H) fp64
    states_ptr,   # (total chunks, H, cdiv(V, VB), KP, VB) state dtype: the state entering every chunk
    d_ptr,        # (B*T*n, H, V) fp32: d = u - w S0
    o_ptr,        # out (B*T, H, V) q's dtype
    cu_tok_ptr, cu_chunk_ptr,
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, KP: tl.constexpr, VB: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
    INTERP: tl.constexpr,
):
    """One program per (chunk, sequence * head, block of BV columns of V):
    o = scale (exp(G_r) Q S0 + P d) for the chunk's tokens, P = (exp(G_r - G_m) Q K^T)_{m <= r} the
    read-out scores (Q K^T from ``_wy_fwd_kernel``), r a token's last sub-step.

    Q S0 takes operands in the inputs' dtype for bf16 / fp16 (the chunk states are stored in it; the
    tensor cores' full rate), 3xTF32 for fp32 (``_mm``); P d fp32 operands (``_dot32``). Non-finite rows
    of d (sub-steps at or after a NaN / inf input) reach only the tokens whose last sub-step is at or
    past them (``_split_nonfinite`` / ``_poison_from``); a non-finite state reaches every token."""
    head, tok0, eos, chunk_idx = _chunk_program(cu_tok_ptr, cu_chunk_ptr, H, CT)
    if tok0 >= eos:
        return
    n_tok = tl.minimum(eos - tok0, CT)
    sub0 = tok0 * NFAC
    # Pointers moved once to the chunk, its rows int32 offsets from there (as in _local_bwd_kernel).
    q_ptr += tok0 * H * K + head * K
    qk_ptr += tok0 * H * BL + head * BL
    o_ptr += tok0 * H * V + head * V
    d_ptr += sub0 * H * V + head * V
    g_ptr += sub0 * H + head
    states_ptr += (chunk_idx * H + head) * tl.cdiv(V, VB) * KP * VB
    rows = tl.arange(0, BL)
    tok_rows = tl.arange(0, BC)
    valid = rows < n_tok * NFAC
    valid_tok = tok_rows < n_tok
    cols_v = tl.program_id(2) * BV + tl.arange(0, BV)
    v_ok = cols_v < V

    qs = tl.zeros((BC, BV), tl.float32)                  # Q S0, over blocks of BK columns of K
    for k0 in range(0, K, BK):
        cols_k = k0 + tl.arange(0, BK)
        k_ok = cols_k < K
        q = tl.load(q_ptr + tok_rows[:, None] * H * K + cols_k[None, :], mask=valid_tok[:, None] & k_ok[None, :],
                    other=0.0)
        s0 = tl.load(states_ptr + _chunk_state_offsets(cols_k[:, None], cols_v[None, :], KP, VB),
                     mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        qs += _mm(q, s0, q_ptr, PREC, LOWP, INTERP)
    r = tok_rows * NFAC + NFAC - 1                       # each token's last sub-step
    G_r = tl.load(g_ptr + r * H, mask=valid_tok, other=0.0)
    G = tl.load(g_ptr + rows * H, mask=valid, other=0.0)
    read = (rows[None, :] <= r[:, None]) & valid[None, :] & valid_tok[:, None]
    decay_read = tl.exp(tl.where(read, (G_r[:, None] - G[None, :]).to(tl.float32), float("-inf")))
    qk = tl.load(qk_ptr + tok_rows[:, None] * H * BL + rows[None, :], mask=read, other=0.0)
    scores = tl.where(decay_read > 0.0, decay_read * qk, 0.0)
    d = tl.load(d_ptr + rows[:, None] * H * V + cols_v[None, :], mask=valid[:, None] & v_ok[None, :], other=0.0)
    d_finite, first_bad = _split_nonfinite(d, rows, BL)
    o = scale * (qs * tl.exp(G_r.to(tl.float32))[:, None] + _dot32(scores, d_finite, PREC))
    o = _poison_from(o, r, first_bad)
    tl.store(o_ptr + tok_rows[:, None] * H * V + cols_v[None, :], o.to(o_ptr.dtype.element_ty),
             mask=valid_tok[:, None] & v_ok[None, :])


@triton.jit
def _kblocks_t(ptr, rows, rows_ok, head, H, K, NKB: tl.constexpr, BK: tl.constexpr):
    """``_kblocks`` transposed: the (rows, K) tile of a (..., H, K) tensor as (NKB, BK, len(rows))."""
    cols = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    return tl.load(ptr + (rows[None, None, :] * H + head) * K + cols, mask=rows_ok[None, None, :] & (cols < K),
                   other=0.0)


@triton.jit
def _state_bwd_piece(dS, dS_prev, q_ptr, k_ptr, w_ptr, g_ptr, do_ptr, dd_ptr, row0, head, n_sub, p0, G_L, H, K, V,
                     scale, NFAC: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr,
                     PREC: tl.constexpr):
    """One piece of ``_state_bwd_kernel``: sub-steps p0 .. p0 + 15 and tokens p0 .. p0 + 15 of a chunk;
    returns dS_prev plus the piece's share of the gradient of the state entering the chunk.

    dS: (NKB, BK, BV) fp32, the gradient of the state leaving the chunk (this program's BV columns of
    V, from ``program_id(0) * BV``); dS_prev: exp(G_L) dS plus the shares of the chunk's earlier
    pieces; row0: int64, (the chunk's first sub-step) * H + head; n_sub: int32, its valid sub-steps;
    G_L: fp64, G at its last sub-step. The chunk's first token's row, (first sub-step / NFAC) * H +
    head, is formed from row0 where it is used (a second 64-bit row offset held across the loop
    spilled 8 B in fp32 specialisations at maxnreg 128).

    The adjoint of the chunk's state update (S1 = exp(G_L) S0 + (exp(G_L - G) K)^T d, d = u - w S0,
    o = scale (exp(G_r) Q S0 + P d)): dd = scale P^T dO (written by ``_wy_fwd_kernel``, read here) +
    (exp(G_L - G) K) dS for the piece's sub-steps, stored; dS0 gets - w^T dd of them and scale
    (exp(G_r) Q)^T dO of the piece's tokens (a chunk has at most BL / NFAC <= BL tokens: the pieces
    past them add nothing). Products take fp32 operands (PREC: "tf32x3" for fp32 inputs, "tf32" for
    bf16 / fp16, whose tiles are loaded as such and widened in registers); w and q are loaded
    transposed, (NKB, BK, 16), for their batched products (no permute in registers)."""
    c0 = tl.program_id(0) * BV
    cols_v = tl.arange(0, BV)                            # (this program's V columns, from c0)
    v_ok = cols_v < V - c0
    rp = p0 + tl.arange(0, 16)                           # the piece's sub-steps within the chunk
    ok = rp < n_sub
    G_p = tl.load(g_ptr + row0 + rp * H, mask=ok, other=0.0)
    decay_last = tl.exp(tl.where(ok, (G_L - G_p).to(tl.float32), float("-inf")))
    kk = _kblocks(k_ptr + row0 * K, rp, ok, 0, H, K, NKB, BK)                   # (NKB, 16, BK)
    dd_ptrs = dd_ptr + row0 * V + c0 + rp[:, None] * H * V + cols_v[None, :]
    dd_mask = ok[:, None] & v_ok[None, :]
    dd = tl.load(dd_ptrs, mask=dd_mask, other=0.0) + tl.sum(_bdot(kk, dS, PREC), axis=0) * decay_last[:, None]
    tl.store(dd_ptrs, dd.to(dd_ptr.dtype.element_ty), mask=dd_mask)
    w = _kblocks_t(w_ptr + row0 * K, rp, ok, 0, H, K, NKB, BK)                 # (NKB, BK, 16)
    dS_prev -= _bdot(w, tl.broadcast_to(dd[None, :, :], (NKB, 16, BV)), PREC)
    tp = p0 + tl.arange(0, 16)                           # the piece's tokens within the chunk
    tok_ok = tp < n_sub // NFAC
    G_rp = tl.load(g_ptr + row0 + (tp * NFAC + NFAC - 1) * H, mask=tok_ok, other=0.0)
    tok_row0 = (row0 - head) // NFAC + head
    do_p = tl.load(do_ptr + tok_row0 * V + c0 + tp[:, None] * H * V + cols_v[None, :],
                   mask=tok_ok[:, None] & v_ok[None, :], other=0.0)
    dos = do_p.to(tl.float32) * (scale * tl.exp(G_rp.to(tl.float32)))[:, None]
    qs = _kblocks_t(q_ptr + tok_row0 * K, tp, tok_ok, 0, H, K, NKB, BK)          # (NKB, BK, 16)
    return dS_prev + _bdot(qs, tl.broadcast_to(dos[None, :, :], (NKB, 16, BV)), PREC)


# ----------------------------------------------------------------------------------------------
# Backward kernel 1: the adjoint state pass, chunks in reverse, the gradient state dS held
# like the state in the forward pass; writes dS per chunk and dd.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_bwd_kernel(
    q_ptr, k_ptr, w_ptr,
    g_ptr,
    do_ptr,       # (B*T, H, V) gradient of o
    dfinal_ptr,   # (N, H, K, V) gradient of the final state, read when HAS_DFINAL
    dstates_ptr,  # out (total chunks, H, cdiv(V, BV), NKB * BK, BV) state dtype: gradient of the state leaving
                  # every chunk
    dh0_ptr,      # out (N, H, K, V) gradient of the initial state (its dtype), written when HAS_H0
    dd_ptr,       # (B*T*n, H, V) fp32: scale P^T dO on entry (``_wy_fwd_kernel``), dL/dd on exit
    cu_tok_ptr, cu_chunk_ptr,
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    BV: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
):
    """One program per (block of BV columns of V, sequence * head), over the sequence's chunks in
    reverse, the (K, BV) fp32 slice of the state's gradient dS held in registers, as the state is in
    ``_state_fwd_kernel``, with the same loop: one loop over (chunk, piece of 16 rows), software-
    pipelined STAGES deep, a chunk's first piece storing the gradient of the state leaving it and
    starting dS_prev = exp(G_L) dS, its last making dS_prev the gradient. Only the products with the
    carried dS are here (``_state_bwd_piece``); dd's state-independent part, scale P^T dO, comes from
    ``_wy_fwd_kernel``."""
    head, bos, eos, chunk_base, n_chunks = _state_program(cu_tok_ptr, cu_chunk_ptr, H)
    # The gradient of the state leaving the last chunk is that of the final state.
    if HAS_DFINAL:
        f_off, f_mask = _state_slice(K, V, NKB, BK, BV)
        dS = tl.load(dfinal_ptr + f_off, mask=f_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((NKB, BK, BV), tl.float32)
    # As in _state_fwd_kernel: a 64-bit base of the sequence's sub-step rows, an int32 length, a pointer
    # to this program's block of its first chunk's dS (``_chunk_state_offsets``); the gradient of the
    # initial state stored by the last iteration, and an empty sequence run as one chunk with no row.
    dstates_ptr, block, st_off = _chunk_state_block(dstates_ptr, chunk_base, head, H, V, NKB, BK, BV)
    row_base = bos * NFAC * H + head
    seq_len = (eos - bos).to(tl.int32)
    NP: tl.constexpr = BL // 16
    n_iter = tl.maximum(n_chunks, 1) * NP
    dS_prev = dS
    for i in tl.range(0, n_iter, num_stages=STAGES):
        c = n_iter // NP - 1 - i // NP
        p0 = (i % NP) * 16
        n_sub = tl.minimum(seq_len - c * CT, CT) * NFAC
        row0 = row_base + (c * CT * NFAC).to(tl.int64) * H
        G_L = tl.load(g_ptr + row0 + (n_sub - 1) * H, mask=n_sub > 0, other=0.0)
        if p0 == 0:
            if n_chunks > 0:
                tl.store(dstates_ptr + c.to(tl.int64) * H * block + st_off, dS.to(dstates_ptr.dtype.element_ty))
            dS_prev = tl.exp(G_L.to(tl.float32)) * dS
        dS_prev = _state_bwd_piece(dS, dS_prev, q_ptr, k_ptr, w_ptr, g_ptr, do_ptr, dd_ptr, row0, head, n_sub, p0,
                                   G_L, H, K, V, scale, NFAC, BK, NKB, BV, PREC)
        if p0 == BL - 16:
            dS = dS_prev
            if HAS_H0:
                if i == n_iter - 1:
                    h0_off, h0_mask = _state_slice(K, V, NKB, BK, BV)
                    tl.store(dh0_ptr + h0_off, dS.to(dh0_ptr.dtype.element_ty), mask=h0_mask)


@triton.jit
def _col_piece(x, j, R: tl.constexpr, C: tl.constexpr):
    """Columns 16 j .. 16 j + 15 of an (R, C) register tile, as (R, 16), for a runtime piece index j
    (a masked sum over the C / 16 column pieces: register tiles cannot be indexed at run time)."""
    x3 = tl.reshape(x, (R, C // 16, 16))
    return tl.sum(tl.where(tl.arange(0, C // 16)[None, :, None] == j, x3, 0.0), axis=1)


@triton.jit
def _row_piece(x, j, R: tl.constexpr, C: tl.constexpr):
    """Rows 16 j .. 16 j + 15 of an (R, C) register tile, as (16, C), for a runtime piece index j."""
    x3 = tl.reshape(x, (R // 16, 16, C))
    return tl.sum(tl.where(tl.arange(0, R // 16)[:, None, None] == j, x3, 0.0), axis=0)


@triton.jit
def _local_bwd_kblock(k0, rows, tok_rows, valid, valid_tok, head, H, K, BK: tl.constexpr):
    """Pass B's K block at column k0: returns (cols_k, k_ok, kmask, qmask, k_off, q_off), its columns
    (BK,) and their mask, the masks of its sub-step (BL, BK) and token (BC, BK) tiles, and their int32
    offsets from the chunk's first sub-step / token in a (..., H, K) tensor."""
    cols_k = k0 + tl.arange(0, BK)
    k_ok = cols_k < K
    kmask = valid[:, None] & k_ok[None, :]
    qmask = valid_tok[:, None] & k_ok[None, :]
    k_off = (rows[:, None] * H + head) * K + cols_k[None, :]
    q_off = (tok_rows[:, None] * H + head) * K + cols_k[None, :]
    return cols_k, k_ok, kmask, qmask, k_off, q_off


@triton.jit
def _local_bwd_state_terms(states_ptr, dstates_ptr, d_ptr, dd_ptr, do_ptr, kkf, q, cols_k, k_ok, valid, valid_tok,
                           rows, tok_rows, head, H, V, scale, gamma_r, gamma_L, decay_last, dG, dG_r, dG_L,
                           BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           KP: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    """Pass B's terms through the state entering the chunk (S0) and the gradient of the state leaving
    it (dS), for one block of K columns ``cols_k``, summed over V blocks (STAGES: their loop's
    pipelining depth). Returns (dw, dqs, dk, dG, dG_r, dG_L):

    dw = -dd S0^T (BL, BK), the gradient of w through d = u - w S0; dqs = scale exp(G_r) dO S0^T
    (BC, BK), the read-out's share of dq; dk = exp(G_L - G) d dS^T (BL, BK), the state exit's share of
    dk (S1 = exp(G_L) S0 + (exp(G_L - G) K)^T d); and the gates' accumulators dG (BL,), dG_r (BC,) and
    dG_L (scalar), fp32, updated with the same three terms.
    kkf (BL, BK) / q (BC, BK): the block's keys and queries as fp32; gamma_r = exp(G_r) (BC,),
    gamma_L = exp(G_L), decay_last = exp(G_L - G) (BL,). The pointers are those of the chunk (its first
    sub-step, token, state), ``rows`` / ``tok_rows`` int32 row indices within it."""
    dw = tl.zeros((BL, BK), tl.float32)
    dqs = tl.zeros((BC, BK), tl.float32)
    dkd = tl.zeros((BL, BK), tl.float32)
    for v0 in tl.range(0, V, BV, num_stages=STAGES):
        cols_v = v0 + tl.arange(0, BV)
        v_ok = cols_v < V
        vmask = valid[:, None] & v_ok[None, :]
        v_off = (rows[:, None] * H + head) * V + cols_v[None, :]
        smask = k_ok[:, None] & v_ok[None, :]
        # (the chunk-state layout, ``_chunk_state_offsets``, with v0 a multiple of BV, the blocks' width)
        s_off = (v0 // BV) * (KP * BV) + cols_k[:, None] * BV + tl.arange(0, BV)[None, :]
        S0 = tl.load(states_ptr + s_off, mask=smask, other=0.0).to(tl.float32)
        dS = tl.load(dstates_ptr + s_off, mask=smask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + v_off, mask=vmask, other=0.0)
        dd = tl.load(dd_ptr + v_off, mask=vmask, other=0.0)
        do = tl.load(do_ptr + (tok_rows[:, None] * H + head) * V + cols_v[None, :],
                     mask=valid_tok[:, None] & v_ok[None, :], other=0.0)
        dw -= _dot32(dd, tl.trans(S0), PREC)       # d = u - w S0
        dqs += _dot32(do, tl.trans(S0), PREC)      # o = scale exp(G_r) Q S0 + ...
        dkd += _dot32(d, tl.trans(dS), PREC)       # S1 = exp(G_L) S0 + (exp(G_L - G) K)^T d
        dG_L += gamma_L * tl.sum(tl.sum(S0 * dS, axis=1), axis=0)
    dqs = dqs * (scale * gamma_r)[:, None]
    dG_r += tl.sum(dqs * q, axis=1)
    dk = decay_last[:, None] * dkd
    t = decay_last * tl.sum(kkf * dkd, axis=1)
    dG -= t
    dG_L += tl.sum(t, axis=0)
    return dw, dqs, dk, dG, dG_r, dG_L


@triton.jit
def _local_bwd_passb32(q_ptr, k_ptr, beta_ptr, tinv_ptr, do_ptr, states_ptr, dstates_ptr, d_ptr, dd_ptr, dq_ptr, dk_ptr,
                       E, dqk, beta, gamma, gamma_r, gamma_L, decay_last, dbeta, dG, dG_r, dG_L, n_sub,
                       valid, valid_tok, rows, tok_rows, head, H, K, V, scale, NFAC: tl.constexpr,
                       BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KP: tl.constexpr,
                       HAS_GATE: tl.constexpr, PREC: tl.constexpr):
    """Pass B of ``_local_bwd_kernel`` for fp32 inputs; returns (dbeta, dG, dG_r, dG_L) updated.

    The same terms as the bf16 / fp16 body (see there), but every product whose reduction runs over
    the chunk's sub-steps or tokens - Tinv^T dw, dL/d(Q K^T) K_b, p1 = E K_b, p2 = E^T diag(beta) K_b
    and dL/d(Q K^T)^T Q_b - is summed over pieces of 16 sub-steps (tokens): per piece, a (BL, 16)
    or (BC, 16) slice of the (BL, BL) / (BC, BL) left operand times the piece's 16 rows of the
    right one, accumulated in fp32. With 3xTF32 every operand is split into two TF32 tiles, and the
    whole 64 x 64 left operands (Tinv^T, E, E^T, dL/d(Q K^T) and its transpose, invariant over the
    K blocks and so held across their loop) spilled; a 64 x 16 slice is a quarter of one.
    Tinv's slices are read from memory (the piece's rows of Tinv, transposed: columns of Tinv^T);
    those of E and dL/d(Q K^T), which are held in registers, are picked by masked sums
    (``_col_piece``, ``_row_piece``). The pieces are runtime loops over the valid rows (neither
    unrolled nor pipelined), so that a piece's slices are formed inside the loop and never all live
    at once, and the products go in two loops (Tinv^T dw with dq's term, then p1 with p2; with all
    four in one loop the gated kernel still spilled 240 B at sm_90a under Triton 3.6), then the
    token loop. Same products and FLOPs as the whole-tile form for full chunks (fewer for a
    sequence's last, partial chunk).

    E: (BL, BL) fp32, dL/dA exp(G_i - G_m) on the strict lower triangle; dqk: (BC, BL) fp32,
    dL/d(Q K^T); beta, gamma = exp(G), decay_last: (BL,) fp32; gamma_r: (BC,) fp32; gamma_L fp32;
    dbeta, dG: (BL,) fp32; dG_r: (BC,) fp32; dG_L: fp32 scalar. Pointers and row indices as in
    ``_local_bwd_state_terms``."""
    n_tok = n_sub // NFAC
    bg = beta * gamma
    for k0 in tl.range(0, K, BK, num_stages=1):
        cols_k, k_ok, kmask, qmask, k_off, q_off = _local_bwd_kblock(
            k0, rows, tok_rows, valid, valid_tok, head, H, K, BK)
        kkf = tl.load(k_ptr + k_off, mask=kmask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32)
        dw, dqs, dk, dG, dG_r, dG_L = _local_bwd_state_terms(
            states_ptr, dstates_ptr, d_ptr, dd_ptr, do_ptr, kkf, q, cols_k, k_ok, valid, valid_tok, rows, tok_rows,
            head, H, V, scale, gamma_r, gamma_L, decay_last, dG, dG_r, dG_L, BL, BC, BK, BV, KP, PREC, 1)
        # Products over the sub-steps, 16 at a time: dxw = Tinv^T dw (w = Tinv diag(beta exp(G)) K) and
        # dq's dL/d(Q K^T) K_b; then p1 = E K_b and p2 = E^T diag(beta) K_b (the K K^T terms).
        dxw = tl.zeros((BL, BK), tl.float32)
        dq = dqs
        p1 = tl.zeros((BL, BK), tl.float32)
        p2 = tl.zeros((BL, BK), tl.float32)
        for m0 in tl.range(0, n_sub, 16, num_stages=1):    # (runtime bounds: the valid pieces only)
            j = m0 // 16
            rp = m0 + tl.arange(0, 16)
            ok = rp < n_sub
            # Tinv's rows of the piece as columns, (BL, 16): loaded transposed rather than transposed in
            # registers (a layout conversion less; so are d's pieces in pass A).
            tinv_pt = tl.load(tinv_ptr + (rp[None, :] * H + head) * BL + rows[:, None], mask=ok[None, :],
                              other=0.0).to(tl.float32)
            kk_p = tl.load(k_ptr + (rp[:, None] * H + head) * K + cols_k[None, :],
                           mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)     # (16, BK)
            dxw += _dot32(tinv_pt, _row_piece(dw, j, BL, BK), PREC)
            dq += _dot32(_col_piece(dqk, j, BC, BL), kk_p, PREC)
        for m0 in tl.range(0, n_sub, 16, num_stages=1):    # (the piece's k rows again: L1 / L2)
            j = m0 // 16
            rp = m0 + tl.arange(0, 16)
            ok = rp < n_sub
            kk_p = tl.load(k_ptr + (rp[:, None] * H + head) * K + cols_k[None, :],
                           mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)     # (16, BK)
            beta_p = tl.load(beta_ptr + rp * H + head, mask=ok, other=0.0).to(tl.float32)
            p1 += _dot32(_col_piece(E, j, BL, BL), kk_p, PREC)
            p2 += _dot32(tl.trans(_row_piece(E, j, BL, BL)), beta_p[:, None] * kk_p, PREC)
        # dk's dL/d(Q K^T)^T Q, 16 tokens at a time.
        for c0 in tl.range(0, n_tok, 16, num_stages=1):
            tp = c0 + tl.arange(0, 16)
            q_p = tl.load(q_ptr + (tp[:, None] * H + head) * K + cols_k[None, :],
                          mask=(tp < n_tok)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            dk += _dot32(tl.trans(_row_piece(dqk, c0 // 16, BC, BL)), q_p, PREC)
        dk += bg[:, None] * dxw
        t = tl.sum(dxw * kkf, axis=1)
        dbeta += gamma * t
        dG += bg * t
        tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=qmask)
        t = tl.sum(kkf * p1, axis=1)
        dbeta += t
        if HAS_GATE:
            dG += beta * t - tl.sum(kkf * p2, axis=1)
        dk += beta[:, None] * p1 + p2
        tl.store(dk_ptr + k_off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
    return dbeta, dG, dG_r, dG_L


# ----------------------------------------------------------------------------------------------
# Backward kernel 2: chunk-local gradients, all chunks in parallel.
#
# d (from the backward's recomputed state pass) and dd (from the adjoint state pass) are read,
# not recomputed, so this kernel holds no state-sized product but those of the chain rule:
# Pass A (over V blocks): dv, d beta from V, dP = dO d^T and the whole of dA: with du = dd and
#   dw = -dd S0^T, Tinv^T (du u^T + dw w^T) = Tinv^T dd (u - w S0)^T = (Tinv^T dd) d^T.
# Pass B (over K blocks, V blocks inside): dw, the S0 read-out and state-exit terms, dq and dk
#   complete (the K K^T term uses the dA of pass A), K K^T for d beta and the gates.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _local_bwd_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, tinv_ptr,
    qk_ptr,       # (B*T, H, BL) fp32: the causal part of Q K^T (from _wy_fwd_kernel)
    g_ptr,
    do_ptr,       # (B*T, H, V)
    states_ptr,   # (total chunks, H, cdiv(V, BV), KP, BV) state dtype: state entering each chunk
    dstates_ptr,  # (total chunks, H, cdiv(V, BV), KP, BV) state dtype: gradient of the state leaving each chunk
    d_ptr,        # (B*T*n, H, V) fp32: d = u - w S0
    dd_ptr,       # (B*T*n, H, V) fp32: dL/dd
    dq_ptr,       # out (B*T, H, K) q's dtype
    dk_ptr,       # out (B*T*n, H, K) k's dtype
    dv_ptr,       # out (B*T*n, H, V) v's dtype
    dbeta_ptr,    # out (B*T*n, H) beta's dtype
    dlg_ptr,      # out (B*T, H) log_gate's dtype, written when HAS_GATE
    cu_tok_ptr, cu_chunk_ptr,
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, KP: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
    INTERP: tl.constexpr,
):
    head, tok0, eos, chunk_idx = _chunk_program(cu_tok_ptr, cu_chunk_ptr, H, CT)
    if tok0 >= eos:
        return
    sub0, n_sub, _, _, _, _ = _chunk_span(tok0, eos, CT, NFAC, BL, BC)
    # The chunk's sub-step count as int32 (at most BL): _chunk_span's is int64, from the int64 sequence
    # offsets, and every mask and loop bound made from it took 64-bit compares, with a register pair
    # held to the end for the last sub-step's (fp32 with the gate, Triton 3.6, sm_80 / sm_90a: 20 / 92 B
    # of spills before, none now; bf16 registers at sm_90a, no gate / gate, Triton 3.9: 222 / 220 before,
    # 198 / 230 now).
    n_sub = n_sub.to(tl.int32)
    valid = tl.arange(0, BL) < n_sub
    valid_tok = tl.arange(0, BC) < n_sub // NFAC
    # Every pointer is moved once to the chunk (its first sub-step, token or state), in 64-bit scalar
    # arithmetic, and the chunk's rows are int32 offsets from there (rows: sub-steps, tok_rows:
    # tokens), so that no 64-bit index vector or address arithmetic is held across the loops.
    # (bf16, registers at sm_80 / sm_90a with Triton 3.9: 244-255 / 216-232 before, 240 / 220-222 now.)
    q_ptr += tok0 * H * K
    dq_ptr += tok0 * H * K
    do_ptr += tok0 * H * V
    qk_ptr += tok0 * H * BL
    dlg_ptr += tok0 * H
    k_ptr += sub0 * H * K
    dk_ptr += sub0 * H * K
    v_ptr += sub0 * H * V
    dv_ptr += sub0 * H * V
    d_ptr += sub0 * H * V
    dd_ptr += sub0 * H * V
    tinv_ptr += sub0 * H * BL
    beta_ptr += sub0 * H
    dbeta_ptr += sub0 * H
    g_ptr += sub0 * H
    states_ptr += (chunk_idx * H + head) * tl.cdiv(V, BV) * KP * BV
    dstates_ptr += (chunk_idx * H + head) * tl.cdiv(V, BV) * KP * BV
    rows = tl.arange(0, BL)
    tok_rows = tl.arange(0, BC)

    beta = tl.load(beta_ptr + rows * H + head, mask=valid, other=0.0).to(tl.float32)
    tinv = tl.load(tinv_ptr + (rows[:, None] * H + head) * BL + rows[None, :], mask=valid[:, None], other=0.0)

    dA = tl.zeros((BL, BL), tl.float32)      # Tinv^T dd d^T, negated and masked below
    dP = tl.zeros((BC, BL), tl.float32)      # gradient of the scores P: dO d^T
    dbeta = tl.zeros((BL,), tl.float32)
    dG = tl.zeros((BL,), tl.float32)         # gradient of G (the cumulative gate) per sub-step
    dG_r = tl.zeros((BC,), tl.float32)       # ... at each token's read-out sub-step
    dG_L = tl.sum(tl.zeros((BL,), tl.float32), axis=0)   # ... at the chunk's last sub-step

    # Pass A.
    tinv_t = tl.trans(tinv)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        v_ok = cols_v < V
        vmask = valid[:, None] & v_ok[None, :]
        v_off = (rows[:, None] * H + head) * V + cols_v[None, :]
        d = tl.load(d_ptr + v_off, mask=vmask, other=0.0)
        dd = tl.load(dd_ptr + v_off, mask=vmask, other=0.0)
        do = tl.load(do_ptr + (tok_rows[:, None] * H + head) * V + cols_v[None, :],
                     mask=valid_tok[:, None] & v_ok[None, :], other=0.0)
        # u = Tinv diag(beta) V
        if LOWP:
            dxu = _dot32(tinv_t, dd, PREC)
        else:
            # fp32: Tinv^T dd summed over pieces of 16 sub-steps (reduction), Tinv's rows of the piece
            # read from memory, not a 64 x 64 Tinv^T held through the loop (see _local_bwd_passb32).
            dxu = tl.zeros((BL, BV), tl.float32)
            for m0 in tl.range(0, n_sub, 16, num_stages=1):
                rp = m0 + tl.arange(0, 16)
                ok = rp < n_sub
                tinv_pt = tl.load(tinv_ptr + (rp[None, :] * H + head) * BL + rows[:, None], mask=ok[None, :],
                                  other=0.0)
                dd_p = tl.load(dd_ptr + (rp[:, None] * H + head) * V + cols_v[None, :],
                               mask=ok[:, None] & v_ok[None, :], other=0.0)
                dxu += _dot32(tinv_pt, dd_p, PREC)
        vv = tl.load(v_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
        tl.store(dv_ptr + v_off, (dxu * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=vmask)
        dbeta += tl.sum(dxu * vv, axis=1)
        if LOWP:
            dA += _dot32(dxu, tl.trans(d), PREC)
        else:
            # fp32: dA's 16-column pieces, (BL, 16) products placed into the (BL, BL) tile. A whole
            # (BL, BL) product's 3xTF32 split keeps its two low-part products in a temporary (BL, BL)
            # tile in another layout (warps along the rows, replicated), which with dA and dP
            # spilled at sm_90a (a (BL, 16) temporary is a quarter).
            for j in tl.static_range(BL // 16):
                rj = j * 16 + tl.arange(0, 16)
                d_jt = tl.load(d_ptr + (rj[None, :] * H + head) * V + cols_v[:, None],
                               mask=(rj < n_sub)[None, :] & v_ok[:, None], other=0.0)
                part = _dot32(dxu, d_jt, PREC)
                dA += tl.reshape(tl.where(tl.arange(0, BL // 16)[None, :, None] == j, part[:, None, :], 0.0), (BL, BL))
        if LOWP:
            # o = scale exp(G_r) Q S0 + P d
            dP += _dot32(do, tl.trans(d), PREC)

    # Tinv = (I + A)^{-1}, w = Tinv X_w, u = Tinv X_u: dL/dA = -Tinv^T (dw X_w^T + du X_u^T) Tinv^T
    # = -(Tinv^T dw) w^T - (Tinv^T du) u^T = -(Tinv^T dd) d^T (pass A), kept on the strict lower
    # triangle, with A[i, m] = beta_i exp(G_i - G_m) k_i . k_m. E = dL/dA exp(G_i - G_m) (strictly
    # lower): the gradient of K K^T is diag(beta) E, and d beta and the gates take E times K K^T.
    # G, the decays and their exponentials are loaded (formed) here, not at the chunk's start, and Q K^T
    # is read only for the gates (below): pass A needs none of them, and no (BL,) / (BC,) vector or
    # (BC, BL) tile but dP is held through it (fp32 with the gate, spills at sm_80 / sm_90a: Triton
    # 3.9 0 / 0 now, Triton 3.6 116 / 32 B before, 20 / 92 B after, none since n_sub is int32, see
    # above: ptxas' allocation at 255 registers moves tens of bytes either way with any change).
    G, G_L, G_r, decay_last, decay_read = _chunk_decays(g_ptr, rows, tok_rows, valid, valid_tok, 0, n_sub, head, H,
                                                        NFAC, BL)
    gamma = tl.where(valid, tl.exp(G.to(tl.float32)), 0.0)
    gamma_r = tl.exp(G_r.to(tl.float32))
    gamma_L = tl.exp(G_L.to(tl.float32))
    strict = (rows[:, None] > rows[None, :]) & valid[:, None] & valid[None, :]
    E = tl.where(strict, -dA * tl.exp(tl.where(strict, (G[:, None] - G[None, :]).to(tl.float32), float("-inf"))),
                 0.0)
    if not LOWP:
        # fp32: dP = dO d^T in a second loop over V, after dA has become E (one (BL, BL) accumulator
        # live in each loop), in 16-column pieces as dA.
        for v0 in tl.range(0, V, BV, num_stages=1):
            cols_v = v0 + tl.arange(0, BV)
            v_ok = cols_v < V
            do = tl.load(do_ptr + (tok_rows[:, None] * H + head) * V + cols_v[None, :],
                         mask=valid_tok[:, None] & v_ok[None, :], other=0.0)
            for j in tl.static_range(BL // 16):      # o = scale exp(G_r) Q S0 + P d
                rj = j * 16 + tl.arange(0, 16)
                d_jt = tl.load(d_ptr + (rj[None, :] * H + head) * V + cols_v[:, None],
                               mask=(rj < n_sub)[None, :] & v_ok[:, None], other=0.0)
                part = _dot32(do, d_jt, PREC)
                dP += tl.reshape(tl.where(tl.arange(0, BL // 16)[None, :, None] == j, part[:, None, :], 0.0), (BC, BL))
    # The scores P = scale exp(G_r - G_m) Q K^T: dL/d(Q K^T) = scale exp(G_r - G_m) dP, and the gates
    # take dP * P = dL/d(Q K^T) * Q K^T, Q K^T reloaded now.
    dqk = dP * scale * decay_read            # gradient of Q K^T through P
    if HAS_GATE:
        dPP = dqk * _load_scores(qk_ptr, tok_rows, valid, valid_tok, head, H, NFAC, BL, BC)
        dG -= tl.sum(dPP, axis=0)
        dG_r += tl.sum(dPP, axis=1)

    if not LOWP:
        # fp32 (3xTF32): pass B with its products over the sub-steps / tokens in 16-row pieces.
        dbeta, dG, dG_r, dG_L = _local_bwd_passb32(
            q_ptr, k_ptr, beta_ptr, tinv_ptr, do_ptr, states_ptr, dstates_ptr, d_ptr, dd_ptr, dq_ptr, dk_ptr, E, dqk,
            beta, gamma, gamma_r, gamma_L, decay_last, dbeta, dG, dG_r, dG_L, n_sub, valid, valid_tok, rows, tok_rows,
            head, H, K, V, scale, NFAC, BL, BC, BK, BV, KP, HAS_GATE, PREC)
    else:
        # Pass B. Register pressure: besides its per-block tiles, only Tinv^T, E and dL/d(Q K^T)
        # (BL x BL or BC x BL) stay live; the terms with K K^T (dk, d beta, the gates) are summed per
        # K block from products with K_b (see the end of the loop), not from an accumulated K K^T.
        bg = beta * gamma
        for k0 in range(0, K, BK):
            cols_k, k_ok, kmask, qmask, k_off, q_off = _local_bwd_kblock(
                k0, rows, tok_rows, valid, valid_tok, head, H, K, BK)
            kk = tl.load(k_ptr + k_off, mask=kmask, other=0.0)
            q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
            kkf = kk.to(tl.float32)
            dw, dqs, dk, dG, dG_r, dG_L = _local_bwd_state_terms(
                states_ptr, dstates_ptr, d_ptr, dd_ptr, do_ptr, kkf, q.to(tl.float32), cols_k, k_ok, valid, valid_tok,
                rows, tok_rows, head, H, V, scale, gamma_r, gamma_L, decay_last, dG, dG_r, dG_L, BL, BC, BK, BV,
                KP, PREC, 3)
            # w = Tinv diag(beta exp(G)) K
            dxw = _dot32(tinv_t, dw, PREC)
            dk += bg[:, None] * dxw
            t = tl.sum(dxw * kkf, axis=1)
            dbeta += gamma * t
            dG += bg * t
            # P = scale exp(G_r - G_m) q_c . k_m, and A through K K^T.
            tl.store(dq_ptr + q_off, (dqs + _dot32(dqk, kk, PREC)).to(dq_ptr.dtype.element_ty), mask=qmask)
            # A[i, m] = beta_i exp(G_i - G_m) k_i . k_m, so dL/d(k_i . k_m) = beta_i E[i, m] and
            #   dK      = diag(beta) E K + E^T diag(beta) K                  (both sides of k_i . k_m)
            #   dbeta_i = sum_m E[i, m] k_i . k_m = rowsum(K o (E K))_i       (o: elementwise)
            #   dG      = beta o rowsum(K o (E K)) - rowsum(K o (E^T diag(beta) K))      (G_i and -G_m)
            # summed over K blocks from the two (BL, BL) @ (BL, BK) products p1 = E K_b and
            # p2 = E^T diag(beta) K_b. Neither K_b K_b^T nor diag(beta) E + its transpose is formed or
            # held (BL x BL each): pass B keeps only E, Tinv^T and dL/d(Q K^T) live across its loop, which
            # is what keeps the bf16 kernel from spilling at sm_80 (gated: 180 B with Triton 3.9, 200 B
            # with 3.6 before). Same tensor FLOPs (two BL x BL x BK products per block, as K_b K_b^T and
            # (diag(beta) E + E^T diag(beta)) K_b were), but both take fp32 operands now (TF32 for bf16 /
            # fp16 inputs, where K_b K_b^T took the inputs' dtype).
            p1 = _dot32(E, kk, PREC)
            p2 = _dot32(tl.trans(E), beta[:, None] * kkf, PREC)
            t = tl.sum(kkf * p1, axis=1)
            dbeta += t
            if HAS_GATE:
                dG += beta * t - tl.sum(kkf * p2, axis=1)
            dk += _dot32(tl.trans(dqk), q, PREC) + beta[:, None] * p1 + p2
            tl.store(dk_ptr + k_off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)

    tl.store(dbeta_ptr + rows * H + head, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)
    if HAS_GATE:
        # Scatter the read-out and last-sub-step terms onto their sub-steps, then
        # d lg_i = sum_{j >= i} dG_j (G is the cumulative sum of lg), read at each
        # token's first sub-step.
        r = tok_rows * NFAC + NFAC - 1
        dG += tl.sum(tl.where((rows[None, :] == r[:, None]) & valid_tok[:, None], dG_r[:, None], 0.0), axis=0)
        dG += tl.where(rows == n_sub - 1, dG_L, 0.0)
        dG = tl.where(valid, dG, 0.0)
        dlg = tl.sum(tl.where(rows[None, :] >= rows[:, None], dG[None, :], 0.0), axis=1)
        first = (rows[None, :] == (tok_rows * NFAC)[:, None])
        dlg_tok = tl.sum(tl.where(first, dlg[None, :], 0.0), axis=1)
        tl.store(dlg_ptr + tok_rows * H + head, dlg_tok.to(dlg_ptr.dtype.element_ty), mask=valid_tok)


# ----------------------------------------------------------------------------------------------
# Decoding: the recurrence one sub-step at a time (T small), state in registers.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _recurrent_fwd_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, lg_ptr,
    h0_ptr,       # (N, H, K, V) initial states, read when HAS_H0
    o_ptr,        # out (B*T, H, V)
    final_ptr,    # out (N, H, K, V) fp32
    cu_tok_ptr,   # (N + 1,) int64 token offsets
    H, K, V, scale,
    NFAC: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, HAS_GATE: tl.constexpr, HAS_H0: tl.constexpr,
):
    """One program per (V block, sequence * head): S <- alpha S; S <- S + beta k (v - S^T k)^T per factor."""
    pid_v = tl.program_id(0)
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    head = pid_nh % H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    cols_k = tl.arange(0, BKF)
    cols_v = pid_v * BV + tl.arange(0, BV)
    k_ok = cols_k < K
    v_ok = cols_v < V
    s_off = (seq.to(tl.int64) * H + head) * K * V + cols_k[:, None] * V + cols_v[None, :]
    smask = k_ok[:, None] & v_ok[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + s_off, mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BKF, BV), tl.float32)
    for i in range(0, eos - bos):
        tok = bos + i                                                     # int64 global token index
        if HAS_GATE:
            S = S * tl.exp(tl.load(lg_ptr + tok * H + head).to(tl.float32))
        for j in range(NFAC):
            sub = tok * NFAC + j
            kk = tl.load(k_ptr + (sub * H + head) * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + (sub * H + head) * V + cols_v, mask=v_ok, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + sub * H + head).to(tl.float32)
            delta = vv - tl.sum(kk[:, None] * S, axis=0)                  # v - S^T k
            S += (beta * kk)[:, None] * delta[None, :]
        q = tl.load(q_ptr + (tok * H + head) * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
        o = scale * tl.sum(q[:, None] * S, axis=0)
        tl.store(o_ptr + (tok * H + head) * V + cols_v, o.to(o_ptr.dtype.element_ty), mask=v_ok)
    tl.store(final_ptr + s_off, S, mask=smask)


def householder_scan_recurrent_forward(q, k, v, beta, log_gate, initial_state, *, cu_seqlens, scale):
    """Step-by-step forward for decoding; same arguments and results as ``householder_scan_forward``.
    Work grows with T, so it is meant for T <= ``RECURRENT_MAX_T`` (forward passes with at most
    that many tokens per sequence run step by step)."""
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    N = num_sequences(B, cu_seqlens)
    cu_tok, _, _, _ = _offsets(B, T, 1, cu_seqlens, q.device)
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    final = torch.empty((N, H, K, V), dtype=torch.float32, device=q.device)
    BKF = max(16, _next_pow2(K))
    BV = max(16, min(32 if BKF <= 128 else 16, _next_pow2(V)))
    if N * H > 0:
        lg = log_gate.contiguous() if log_gate is not None else beta
        h0 = initial_state.contiguous() if initial_state is not None else final
        _recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
            q, k, v, beta, lg, h0, o, final, cu_tok, H, K, V, float(scale),
            NFAC=n, BKF=BKF, BV=BV, HAS_GATE=log_gate is not None, HAS_H0=initial_state is not None,
            num_warps=1 if q.device.type != "cuda" else 4)
    if q.dtype == torch.float64:
        final = final.double()
    return o, final


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _config(n: int, K: int, V: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes: BL = 64 sub-steps per chunk (C = 64 // n tokens), K in blocks of BK, V in blocks of BV.

    The state kernels run one program per (sequence, head, V block of BVS columns) with all K rows
    (BKF) of their state slice; the chunk-parallel kernels loop over K and V blocks (BK, BV).
    PREC: input precision of fp32 products ("tf32x3" for fp32 inputs: 3xTF32, fp32-level accuracy on
    the tensor cores, where "ieee" products spilled, see the module docstring; "tf32" for bf16 /
    fp16). LOWP: bf16 / fp16 inputs, whose products take operands in the inputs' dtype. INTERP: the
    interpreter, whose ``tl.dot`` is wrong on bf16 operands (``_mm`` multiplies the rounded operands
    as fp32 there) and ignores ``input_precision`` (fp32 products exact there; the tests emulate
    3xTF32 in it).
    """
    CT = max(1, SUBSTEPS_PER_CHUNK // n)
    BL = max(16, _next_pow2(CT * n))
    BC = max(16, _next_pow2(CT))
    # 16 x 16 blocks everywhere: every product then reduces over at most 64 and every per-block tile
    # is small, which is what keeps the kernels within the registers (ptxas -v, sm_80 / sm_90a, Triton
    # 3.9, K = V = 128: with 32-column blocks the bf16 chunk-local backward spilled 1.5-4.0 KB, the
    # bf16 forward state pass 0-604 B, fp32 _wy_fwd_kernel 1.6 KB; with 16, see STATIC_BUDGET).
    BK = 16
    BV = 16
    # The state kernels hold all K rows of their (K, BVS) state slice in registers (BKF >= K), as a
    # (BKF / BKS, BKS, BVS) tile; 16 state columns per program (more programs over V, each with a
    # smaller slice: 8 fp32 registers per thread at K = 128 and 8 warps).
    BKF = max(16, _next_pow2(K))
    half = dtype in (torch.bfloat16, torch.float16)
    BVS = 16
    BKS = 16
    # GPU: 8 warps. (Interpreter: 1 warp, the same blocks.) MAXNREG: the register ceiling ptxas is
    # given for the chunk-local backward (launch option ``maxnreg``): left to itself, ptxas caps some
    # kernels at 32 or 128 registers and spills far more (Triton 3.9, fp32 chunk-local backward 6.1 KB
    # at 128, 3.2 KB at 255, before its 16-row pieces).
    # The state passes walk the chunks one after another, one program per (sequence, head, 16 columns
    # of V): at (B, T, H, K = V) = (1, 8192, 32, 128) that is 256 programs, two waves on 132 SMs at one
    # program per SM and one wave at two. Both are software-pipelined (FWD_STAGES, BWD_STAGES = 2: the
    # next piece's tiles in flight). Both run 8 warps (FWD_WARPS, BWD_WARPS) at maxnreg 128 with K <= 128
    # (FWD_MAXNREG, BWD_MAXNREG): no spills at n = 1, 2, 3, every dtype, with and without the initial and
    # final states, Triton 3.6 and 3.9, sm_80 and sm_90a, two programs an SM. For that the fp32 forward
    # pass reads u (U_IN_WY: ``_wy_fwd_kernel`` computes it): its 3xTF32 product Tinv diag(beta) V split
    # both operands in two and took it to 247-255 registers (at 128: 360-480 B of spills; without that
    # product, 100-108 registers; u costs 764 B per token and head more a run at K = V = 128: written
    # and v read by ``_wy_fwd_kernel``, u read instead of v and Tinv by the state pass; to time the other
    # way on a GPU: LINREC_HOUSEHOLDER_CONFIG="U_IN_WY=0,FWD_MAXNREG=255"). K > 128 (a larger state
    # slice): 255 for both.
    # BKO, BVO, OUT_WARPS: ``_output_kernel``'s blocks of K (its loop) and of V (its grid), and warps:
    # no spills, Triton 3.6 and 3.9, sm_80 and sm_90a (bf16 / fp16 with BVO = 64: 128-152 registers;
    # fp32, 3xTF32, with BVO = 32: 145-202; with 64 it spilled 1.0-1.2 KB at sm_80, 0.8 KB with 8 warps).
    # Measured at the launches' alignment (aot_specs' divisible_by_16), bench/results/householder-traffic.md.
    num_warps = 1 if interpret else 8
    prec = "tf32" if half else "tf32x3"
    bwd_maxnreg = 128 if BKF <= 128 else 255
    fwd_maxnreg = 128 if BKF <= 128 else 255
    cfg = config_override("householder", dict(CT=CT, BL=BL, BC=BC, BK=BK, BV=BV, BKF=BKF, BKS=BKS, BVS=BVS,
                                              BKO=32, BVO=64 if half else 32, OUT_WARPS=1 if interpret else 4,
                                              num_warps=num_warps, MAXNREG=255, FWD_MAXNREG=fwd_maxnreg, FWD_STAGES=2,
                                              BWD_STAGES=2,
                                              BWD_WARPS=1 if interpret else 8,
                                              FWD_WARPS=1 if interpret else 8,
                                              BWD_MAXNREG=bwd_maxnreg,
                                              PREC=prec, LOWP=half, INTERP=interpret, U_IN_WY=not half),
                          ("BK", "BV", "BKS", "BVS", "BKO", "BVO", "OUT_WARPS", "num_warps", "MAXNREG",
                           "FWD_MAXNREG", "BWD_MAXNREG", "FWD_STAGES", "FWD_WARPS", "BWD_STAGES", "BWD_WARPS",
                           "U_IN_WY"))
    if cfg["BV"] != cfg["BVS"]:
        raise ValueError(f"LINREC_HOUSEHOLDER_CONFIG: BV ({cfg['BV']}) must equal BVS ({cfg['BVS']}): the chunk-local "
                         "backward reads the chunk states in the state passes' blocks of BVS columns")
    return cfg


def _launch_args(n: int, cfg: dict) -> tuple:
    """Keyword arguments of the chunk-parallel kernels (``_wy_fwd_kernel``, ``_local_bwd_kernel``) and of
    the two state kernels (``num_warps`` and ``maxnreg`` the adjoint pass's; the forward pass is launched
    with FWD_WARPS and FWD_MAXNREG)."""
    shared = dict(NFAC=n, CT=cfg["CT"], BL=cfg["BL"], PREC=cfg["PREC"], num_warps=cfg["num_warps"])
    return (dict(BK=cfg["BK"], BV=cfg["BV"], LOWP=cfg["LOWP"], INTERP=cfg["INTERP"], **shared),
            dict(BK=cfg["BKS"], NKB=cfg["BKF"] // cfg["BKS"], BV=cfg["BVS"], maxnreg=cfg["BWD_MAXNREG"],
                 **dict(shared, num_warps=cfg["BWD_WARPS"])))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the saved WY factors w and Tinv: the inputs' bf16 / fp16, else fp32.

    u, d and dd stay fp32: d = u - w S0 cancels (|u| and |w S0| can be much larger than |d|),
    and storing u, d or dd as bf16 was measured (test_half_precision's case, interpreter) to
    raise the error of o or of a gradient from about 4e-3 to 7e-3 each, past 1e-2 together."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the chunk-entry states and their gradients, which the backward's state passes
    hand to the chunk-local kernel: the inputs' bf16 / fp16 (the states are carried in fp32 inside
    the state passes; only the copies read by the chunk-local gradients are rounded), fp32 else."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _offsets(B: int, T: int, CT: int, cu_seqlens: Optional[torch.Tensor], device) -> tuple:
    """Token and chunk offsets of the N sequences, computed on the device (no host synchronisation).

    Returns (cu_tok, cu_chunk, max_chunks, total_chunks): int64 (N + 1,) device tensors, and host
    bounds for the chunk grid and the chunk-state buffer: max_chunks = cdiv(T, CT) is at least any
    sequence's chunk count (programs past a sequence's end return at once) and total_chunks at
    least their sum (exact without cu_seqlens; with it, sum cdiv(L_i, CT) <= (T + N (CT - 1)) // CT).
    """
    per = -(-T // CT)
    if cu_seqlens is None:
        steps = torch.arange(B + 1, dtype=torch.int64, device=device)
        return steps * T, steps * per, per, B * per
    cu_tok = cu_seqlens.to(device=device, dtype=torch.int64)
    chunks = torch.div(cu_tok[1:] - cu_tok[:-1] + (CT - 1), CT, rounding_mode="floor")
    cu_chunk = torch.cat([cu_tok.new_zeros(1), torch.cumsum(chunks, 0)])
    N = cu_seqlens.shape[0] - 1
    return cu_tok, cu_chunk, per, min(T, (T + N * (CT - 1)) // CT)


def _prepare(q, k, v, beta, log_gate, cu_seqlens):
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    interpret = q.device.type != "cuda"
    cfg = _config(n, K, V, q.dtype, interpret)
    N = num_sequences(B, cu_seqlens)
    cu_tok, cu_chunk, max_chunks, total_chunks = _offsets(B, T, cfg["CT"], cu_seqlens, q.device)
    tensors = dict(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), beta=beta.contiguous(),
                   lg=log_gate.contiguous() if log_gate is not None else None)
    return cfg, N, cu_tok, cu_chunk, max_chunks, total_chunks, tensors


def _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n, tinv=None, grad_o=None, scale=1.0, with_u=True):
    """Runs ``_wy_fwd_kernel``: the state-independent chunk factors, as a dict of tensors
    w (B, T * n, H, K) and Tinv (B, T * n, H, BL) in the work dtype, qk (B, T, H, BL) fp32 (the
    causal part of Q K^T) and G (B, T * n, H) fp64. With ``tinv`` (the forward's, in the backward)
    Tinv is read, not computed. With ``grad_o`` (the backward, (B, T, H, V) contiguous; ``tinv``
    given) also dd (B, T * n, H, V) fp32 holding scale P^T dO, for the adjoint state pass to complete.
    For fp32 inputs (``cfg["U_IN_WY"]``) and with_u, also u (B, T * n, H, V) fp32 = Tinv diag(beta) V,
    which the state pass overwrites with d (else None: the state pass computes u)."""
    q, k, beta, lg = t["q"], t["k"], t["beta"], t["lg"]
    B, T = q.shape[:2]
    dev = q.device
    wdt = _work_dtype(q.dtype)
    w = torch.empty((B, T * n, H, K), dtype=wdt, device=dev)
    given = tinv is not None
    if not given:
        tinv = torch.empty(tinv_shape(B, T, n, H), dtype=wdt, device=dev)
    qk = torch.empty((B, T, H, cfg["BL"]), dtype=torch.float32, device=dev)
    G = torch.empty((B, T * n, H), dtype=torch.float64, device=dev)
    with_do = grad_o is not None
    dd = torch.empty((B, T * n, H, V), dtype=torch.float32, device=dev) if with_do else None
    with_u = with_u and cfg["U_IN_WY"]
    u = torch.empty((B, T * n, H, V), dtype=torch.float32, device=dev) if with_u else None
    chunk_args, _ = _launch_args(n, cfg)
    if max_chunks > 0 and N * H > 0:
        _wy_fwd_kernel[(max_chunks, N * H)](
            q, k, beta, lg if lg is not None else beta, w, tinv, qk, G, grad_o if with_do else q,
            dd if with_do else qk, t["v"], u if with_u else qk,                     # (placeholders: not read)
            cu_tok, H, K, V, float(scale),
            HAS_GATE=lg is not None, TINV_GIVEN=given, WITH_DO=with_do, WITH_U=with_u, BC=cfg["BC"], **chunk_args)
    return dict(w=w, tinv=tinv, qk=qk, G=G, dd=dd, u=u)


def chunk_states_shape(chunks: int, H: int, V: int, cfg: dict) -> tuple:
    """Shape of the chunk-state buffers the state passes write and the chunk-parallel kernels read
    (the states entering the chunks, their gradients): (chunks, H, cdiv(V, BVS), BKF, BVS), each
    state-pass program's (K, BVS) slice of a head's state one contiguous block, K padded to BKF
    (``_chunk_state_offsets``)."""
    return (chunks, H, triton.cdiv(V, cfg["BVS"]), cfg["BKF"], cfg["BVS"])


def tinv_shape(B: int, T: int, n: int, H: int) -> tuple:
    """Shape of the chunk inverse Tinv the forward hands to the backward: (B, T * n, H, BL), row s
    holding row s mod BL of its chunk's (I + A)^{-1}; stored in ``_work_dtype`` of the inputs."""
    return (B, T * n, H, max(16, _next_pow2(max(1, SUBSTEPS_PER_CHUNK // n) * n)))


def _state_pass(t, f, h0, cfg, N, cu_tok, cu_chunk, total_chunks, H, K, V, n, with_final):
    """Runs ``_state_fwd_kernel`` over the chunk factors ``f``: the state entering every chunk
    (``chunk_states_shape``, ``_state_dtype``), d = u - w S0 of every sub-step ((B, T * n, H, V)
    fp32; written over ``f["u"]`` where the chunk factors hold u) and, with_final, the final states
    ((N, H, K, V) fp32; else None). Returns (d, states, final)."""
    k, v, beta = t["k"], t["v"], t["beta"]
    B, T = k.shape[:2]
    dev = k.device
    u_given = f.get("u") is not None
    d = f.pop("u") if u_given else torch.empty((B, T * n, H, V), dtype=torch.float32, device=dev)
    states = torch.empty(chunk_states_shape(max(total_chunks, 1), H, V, cfg), dtype=_state_dtype(k.dtype), device=dev)
    final = torch.empty((N, H, K, V), dtype=torch.float32, device=dev) if with_final else None
    _, state_args = _launch_args(n, cfg)
    if N * H > 0 and V > 0:
        h0c = h0.contiguous() if h0 is not None else states                 # (placeholders: not read)
        _state_fwd_kernel[(triton.cdiv(V, cfg["BVS"]), N * H)](
            k, v, beta, f["w"], f["tinv"], f["G"], h0c, d, states, final if with_final else states, cu_tok, cu_chunk,
            H, K, V, HAS_H0=h0 is not None, HAS_FINAL=with_final, STAGES=cfg["FWD_STAGES"], U_GIVEN=u_given,
            **dict(state_args, num_warps=cfg["FWD_WARPS"], maxnreg=cfg["FWD_MAXNREG"]))
    return d, states, final


def _outputs(t, f, d, states, cfg, N, cu_tok, cu_chunk, max_chunks, scale, H, K, V, n):
    """Runs ``_output_kernel``: o (B, T, H, V) in q's dtype from the chunk states and d."""
    q = t["q"]
    B, T = q.shape[:2]
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    if max_chunks > 0 and N * H > 0 and V > 0:
        _output_kernel[(max_chunks, N * H, triton.cdiv(V, cfg["BVO"]))](
            q, f["qk"], f["G"], states, d, o, cu_tok, cu_chunk, H, K, V, float(scale), NFAC=n, CT=cfg["CT"],
            BL=cfg["BL"], BC=cfg["BC"], BK=cfg["BKO"], BV=cfg["BVO"], KP=cfg["BKF"], VB=cfg["BVS"], PREC=cfg["PREC"],
            LOWP=cfg["LOWP"], INTERP=cfg["INTERP"], num_warps=cfg["OUT_WARPS"])
    return o


def householder_scan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             log_gate: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], *,
                             cu_seqlens: Optional[torch.Tensor], scale: float, return_saved: bool = False):
    """Chunked forward pass.

    Args:
        q: (B, T, H, K); k: (B, T, n, H, K); v: (B, T, n, H, V); beta: (B, T, n, H);
        log_gate: (B, T, H) or None; initial_state: (N, H, K, V) or None;
        cu_seqlens: (N + 1,) int offsets with B = 1, or None; scale: float. Any strides.

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (N, H, K, V) fp32 (float64 for float64 q);
        with return_saved also the chunk inverse Tinv ((B, T * n, H, BL), ``tinv_shape``, in
        ``_work_dtype``: 128 B per token and head at n = 1 for bf16 / fp16, 256 B for fp32) for
        ``householder_scan_backward``, which then need not recompute it (K K^T and the blocked inverse:
        1.2 M of 41 M FLOPs per chunk and head at K = V = 128). Every dtype saves it: the backward's
        ``_wy_fwd_kernel``, which also forms scale P^T dO, then holds fewer registers (fp32 recomputing
        Tinv there spilled 8 B at sm_80 under Triton 3.6; reading it, 131-188 registers, no spills).
    """
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    cfg, N, cu_tok, cu_chunk, max_chunks, total_chunks, t = _prepare(q, k, v, beta, log_gate, cu_seqlens)
    f = _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n)
    d, states, final = _state_pass(t, f, initial_state, cfg, N, cu_tok, cu_chunk, total_chunks, H, K, V, n, True)
    del f["w"]                     # (not read by the output kernel: freed before o is allocated)
    o = _outputs(t, f, d, states, cfg, N, cu_tok, cu_chunk, max_chunks, scale, H, K, V, n)
    if q.dtype == torch.float64:  # the contract's dtype; the kernels themselves accumulate in fp32
        final = final.double()
    if return_saved:
        return o, final, f["tinv"]
    return o, final


def householder_scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                              log_gate: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                              grad_o: torch.Tensor, grad_final: Optional[torch.Tensor], *,
                              cu_seqlens: Optional[torch.Tensor], scale: float,
                              tinv: Optional[torch.Tensor] = None):
    """Chunked backward pass; recomputes the chunk states (and d), then two kernels.

    Args: as ``householder_scan_forward``, plus grad_o: (B, T, H, V), grad_final: (N, H, K, V) or None,
    and tinv: the chunk inverse the forward returned with ``return_saved`` (recomputed when None).

    Returns:
        the gradients, each in its input's dtype, written by the kernels (grad_q (B, T, H, K),
        grad_k (B, T, n, H, K), grad_v (B, T, n, H, V), grad_beta (B, T, n, H),
        grad_log_gate (B, T, H) or None, grad_initial_state (N, H, K, V) or None).
    """
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    cfg, N, cu_tok, cu_chunk, max_chunks, total_chunks, t = _prepare(q, k, v, beta, log_gate, cu_seqlens)
    grad_o = grad_o.contiguous()
    if tinv is None:
        # A backward op called without the forward's Tinv: computed first by the forward's launch, so
        # that the one below always reads it (recomputing it and forming P^T dO in one program, the
        # fp32 kernel spilled 8 B at sm_80 under Triton 3.6).
        tinv = _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n, with_u=False)["tinv"]
    f = _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n, tinv=tinv, grad_o=grad_o, scale=scale)
    d, states, _ = _state_pass(t, f, initial_state, cfg, N, cu_tok, cu_chunk, total_chunks, H, K, V, n, False)
    dev = q.device
    dstates = torch.empty_like(states)
    dd = f["dd"]
    # Every token of every sequence is written by exactly one chunk program: no zero-fills.
    dh0 = torch.empty_like(initial_state, memory_format=torch.contiguous_format) if initial_state is not None else None
    chunk_args, state_args = _launch_args(n, cfg)
    if N * H > 0:
        gf = grad_final.contiguous() if grad_final is not None else dstates      # (placeholders: not read)
        _state_bwd_kernel[(triton.cdiv(V, cfg["BVS"]), N * H)](
            t["q"], t["k"], f["w"], f["G"], grad_o, gf, dstates, dh0 if dh0 is not None else dstates, dd,
            cu_tok, cu_chunk, H, K, V, float(scale), HAS_DFINAL=grad_final is not None, HAS_H0=dh0 is not None,
            STAGES=cfg["BWD_STAGES"], **state_args)
    # w is not read by the chunk-local kernel: freed before its outputs are allocated, which lowers
    # the backward's peak memory by w.
    del f["w"]
    dq = torch.empty((B, T, H, K), dtype=q.dtype, device=dev)
    dk = torch.empty((B, T, n, H, K), dtype=k.dtype, device=dev)
    dv = torch.empty((B, T, n, H, V), dtype=v.dtype, device=dev)
    dbeta = torch.empty((B, T, n, H), dtype=beta.dtype, device=dev)
    dlg = torch.empty((B, T, H), dtype=log_gate.dtype, device=dev) if log_gate is not None else None
    if max_chunks > 0 and N * H > 0:
        _local_bwd_kernel[(max_chunks, N * H)](
            t["q"], t["k"], t["v"], t["beta"], f["tinv"], f["qk"], f["G"], grad_o, states, dstates, d, dd,
            dq, dk, dv, dbeta, dlg if dlg is not None else dbeta, cu_tok, cu_chunk, H, K, V, float(scale),
            HAS_GATE=log_gate is not None, BC=cfg["BC"], KP=cfg["BKF"], maxnreg=cfg["MAXNREG"], **chunk_args)
    return dq, dk, dv, dbeta, dlg, dh0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
# ``LINREC_HOUSEHOLDER_AOT=all`` adds the state passes for every dtype, n = 1, 2, 3 and every flag
# (72 specialisations, too many for CI's time; bench/results/householder-traffic.md's register tables):
#   LINREC_HOUSEHOLDER_AOT=all python tests/aot_compile.py linrec.kernels.householder 80 90 --spills --budget
AOT_ENV = "LINREC_HOUSEHOLDER_AOT"


def _signatures(elem: str) -> dict:
    """Triton signatures of the four kernels for inputs stored as ``elem`` (fp32 / bf16 / fp16); w,
    Tinv, the chunk states handed to the chunk-local backward and the gradients are stored in that
    dtype too (Q K^T, d, dd, the final state in fp32)."""
    x = f"*{elem}"
    return {
        _wy_fwd_kernel: {"q_ptr": x, "k_ptr": x, "beta_ptr": x, "lg_ptr": x, "w_ptr": x, "tinv_ptr": x,
                         "qk_ptr": "*fp32", "g_ptr": "*fp64", "do_ptr": x, "dd_ptr": "*fp32", "v_ptr": x,
                         "u_ptr": "*fp32", "cu_tok_ptr": "*i64",
                         "H": "i32", "K": "i32", "V": "i32", "scale": "fp32"},
        _state_fwd_kernel: {"k_ptr": x, "v_ptr": x, "beta_ptr": x, "w_ptr": x, "tinv_ptr": x, "g_ptr": "*fp64",
                            "h0_ptr": "*fp32", "d_ptr": "*fp32", "states_ptr": x, "final_ptr": "*fp32",
                            "cu_tok_ptr": "*i64", "cu_chunk_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32"},
        _output_kernel: {"q_ptr": x, "qk_ptr": "*fp32", "g_ptr": "*fp64", "states_ptr": x, "d_ptr": "*fp32",
                         "o_ptr": x, "cu_tok_ptr": "*i64", "cu_chunk_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32",
                         "scale": "fp32"},
        _state_bwd_kernel: {"q_ptr": x, "k_ptr": x, "w_ptr": x, "g_ptr": "*fp64", "do_ptr": x,
                            "dfinal_ptr": "*fp32", "dstates_ptr": x, "dh0_ptr": "*fp32", "dd_ptr": "*fp32",
                            "cu_tok_ptr": "*i64", "cu_chunk_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32",
                            "scale": "fp32"},
        _local_bwd_kernel: {"q_ptr": x, "k_ptr": x, "v_ptr": x, "beta_ptr": x, "tinv_ptr": x, "qk_ptr": "*fp32",
                            "g_ptr": "*fp64",
                            "do_ptr": x, "states_ptr": x, "dstates_ptr": x, "d_ptr": "*fp32",
                            "dd_ptr": "*fp32",
                            "dq_ptr": x, "dk_ptr": x, "dv_ptr": x, "dbeta_ptr": x, "dlg_ptr": x,
                            "cu_tok_ptr": "*i64", "cu_chunk_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32",
                            "scale": "fp32"},
    }


# The static budget CI checks at sm_90a (tests/aot_compile.py --budget, with Triton 3.9 and the GPU
# machines' 3.6): no register spills and one program per SM (registers x threads <= 65536), for every
# specialisation (``_under_static_budget`` says which entry each is held to). No vector-access
# check: the chunk tiles are 16-column blocks of rows H K elements apart, loaded through masks.
STATIC_BUDGET = {"_wy_fwd_kernel": {"programs_per_sm": 1}, "_recurrent_fwd_kernel": {"programs_per_sm": 1},
                 "_state_fwd_kernel": {"programs_per_sm": 1}, "_state_bwd_kernel": {"programs_per_sm": 1},
                 "_local_bwd_kernel": {"programs_per_sm": 1}, "_output_kernel": {"programs_per_sm": 1}}


def _under_static_budget(kernel, elem: str, constexprs: dict):
    """How CI holds this specialisation to STATIC_BUDGET: True (its kernel's entry), a dict of the
    fields that replace the entry's, or False (left out). Every specialisation is held, at sm_90a
    with Triton 3.9 and 3.6, compiled at the launches' alignment and register ceilings
    (``aot_specs``): no spills, one program per SM (at most 255 registers x 256 threads), and two for
    the state passes at 8 warps and 128 registers (``_config``'s FWD_MAXNREG, BWD_MAXNREG).

    The last one left out, the fp32 chunk-local backward with the gate (Triton 3.6: 20 / 92 B of
    spills at sm_80 / sm_90a, stored before its first loop and loaded after its last), spills
    nothing since that kernel takes the chunk's sub-step count as int32 (see there).
    Registers per thread (ptxas -v, K = V = 128; bench/results/householder-traffic.md has the
    tables): the state passes 92-128 (every dtype), the output kernel 128-202, the others 77-255. None
    spills at sm_80 either (not budgeted: the budget is sm_90a's).
    """
    if kernel in (_state_fwd_kernel, _state_bwd_kernel):
        return {"programs_per_sm": 2}    # (8 warps at up to 128 registers)
    return True


def aot_specs():
    """Yields (kernel, signature, constexprs, num_warps, options) for the launches the GPU launcher
    makes; ``options["budget"]`` says whether CI holds the specialisation to STATIC_BUDGET.

    K, V, H, T and the sequence offsets are runtime arguments, so a specialisation is fixed
    by the storage dtype, n (through C = 64 // n tokens per chunk) and the feature flags.
    Compiling every combination takes too long for CI (the backward kernel alone takes about
    a minute per target), so this covers every kernel with every flag for fp32 with n = 1
    (64 tokens per chunk) and bf16 with n = 3 (21 tokens, a chunk that does not fill its
    64 rows), and the forward kernels for fp16 with n = 2; the other combinations differ only
    in constants and pointer element types.

    Each is compiled at the alignment a launch at the GPU goals' shapes gets, on which Triton's JIT
    specialises (``divisible_by_16``): every pointer 16-byte aligned (torch allocations; the launchers
    pass contiguous tensors) and H, K, V multiples of 16 (H = 16, 32; K = V = 64, 128). Without it
    the compile is one that no such launch runs, whose 16-bit tiles are loaded element by element
    (a 64-bit address per element: the bf16 forward state pass with o then spilled 1.6 KB under
    Triton 3.6 at sm_90a, none at this alignment).
    """
    for kernel, signature, constexprs, num_warps, elem, compile_options in _plain_specs():
        options = {"budget": _under_static_budget(kernel, elem, constexprs),
                   "divisible_by_16": [name for name in signature if signature[name].startswith("*")]
                   + [name for name in ("H", "K", "V") if name in signature]}
        if compile_options:
            options["compile_options"] = compile_options
        yield kernel, signature, constexprs, num_warps, options


def _state_pass_specs(torch_dtype, elem: str, n: int, every_flag: bool, with_backward: bool):
    """``_plain_specs``' entries of the two state passes for one dtype and n (K = V = 128): the forward
    pass with an initial state, with and without the final one (the forward, the backward's
    recomputation), or with every flag; the adjoint pass with every flag (with_backward)."""
    cfg = _config(n, 128, 128, torch_dtype, interpret=False)
    _, state_args = _launch_args(n, cfg)
    del state_args["num_warps"]                              # (launch options, not constexprs)
    del state_args["maxnreg"]
    sigs = _signatures(elem)
    for has_h0 in (False, True) if every_flag else (True,):
        for with_final in (False, True):
            yield (_state_fwd_kernel, sigs[_state_fwd_kernel],
                   dict(HAS_H0=has_h0, HAS_FINAL=with_final, STAGES=cfg["FWD_STAGES"], U_GIVEN=cfg["U_IN_WY"],
                        **state_args),
                   cfg["FWD_WARPS"], elem, {"maxnreg": cfg["FWD_MAXNREG"]})
    if not with_backward:
        return
    for has_dfinal in (False, True):
        for has_h0 in (False, True):
            yield (_state_bwd_kernel, sigs[_state_bwd_kernel],
                   dict(HAS_DFINAL=has_dfinal, HAS_H0=has_h0, STAGES=cfg["BWD_STAGES"], **state_args),
                   cfg["BWD_WARPS"], elem, {"maxnreg": cfg["BWD_MAXNREG"]})


def _plain_specs():
    """The specialisations of ``aot_specs`` as (kernel, signature, constexprs, num_warps, storage dtype,
    the launch's compile options: its ``maxnreg`` where the launcher passes one)."""
    every_state_pass = os.environ.get(AOT_ENV, "") == "all"
    plans = ((torch.float32, "fp32", 1, True), (torch.bfloat16, "bf16", 3, True), (torch.float16, "fp16", 2, False))
    for torch_dtype, elem, n, with_backward in plans:
        cfg = _config(n, 128, 128, torch_dtype, interpret=False)
        chunk_args, _ = _launch_args(n, cfg)
        nw = chunk_args.pop("num_warps")
        sigs = _signatures(elem)
        with_u = cfg["U_IN_WY"]
        for gate in (False, True):
            # the forward's (computing Tinv), and the backward's (reading Tinv, forming scale P^T dO), both
            # computing u for fp32; for fp32 also the one a backward given no Tinv runs first (Tinv only)
            variants = ((False, False, with_u),) + (((True, True, with_u),) if with_backward else ())
            if with_u and with_backward:
                variants += ((False, False, False),)
            for given, with_do, u in variants:
                yield (_wy_fwd_kernel, sigs[_wy_fwd_kernel], dict(HAS_GATE=gate, TINV_GIVEN=given, WITH_DO=with_do,
                                                                 WITH_U=u, BC=cfg["BC"], **chunk_args), nw, elem, {})
        for state_n in (1, 2, 3) if every_state_pass else (n,):
            yield from _state_pass_specs(torch_dtype, elem, state_n, every_state_pass,
                                         with_backward or every_state_pass)
        yield (_output_kernel, sigs[_output_kernel],
               dict(NFAC=n, CT=cfg["CT"], BL=cfg["BL"], BC=cfg["BC"], BK=cfg["BKO"], BV=cfg["BVO"], KP=cfg["BKF"],
                    VB=cfg["BVS"], PREC=cfg["PREC"], LOWP=cfg["LOWP"], INTERP=False), cfg["OUT_WARPS"], elem, {})
        rec_sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "v_ptr": f"*{elem}", "beta_ptr": f"*{elem}",
                   "lg_ptr": f"*{elem}", "h0_ptr": "*fp32", "o_ptr": f"*{elem}", "final_ptr": "*fp32",
                   "cu_tok_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32", "scale": "fp32"}
        yield (_recurrent_fwd_kernel, rec_sig, dict(NFAC=n, BKF=128, BV=32, HAS_GATE=True, HAS_H0=True), 4, elem, {})
        if not with_backward:
            continue
        for gate in (False, True):
            yield (_local_bwd_kernel, sigs[_local_bwd_kernel],
                   dict(HAS_GATE=gate, BC=cfg["BC"], KP=cfg["BKF"], **chunk_args), nw, elem,
                   {"maxnreg": cfg["MAXNREG"]})
