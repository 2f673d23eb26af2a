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
part of Q K^T, once per chunk) then ``_state_fwd_kernel`` (per sequence, head and block of V
columns, sequentially over chunks: u = Tinv diag(beta) V for its V columns, never stored, d, the
outputs and the final state). ``S1 = M S0 + c`` is affine in S0, so the state pass is one
(BL x K) x (K x BV) product and one update per chunk. The fp32 state stays in registers across
the chunk loop (a (K / BK, BK, BV) tile: the K-long products are batched over K blocks), so the
forward writes no chunk states at all. The forward hands Tinv to the backward (the op's autograd
saves it; ``return_saved``); the backward reruns ``_wy_fwd_kernel`` reading it (w, G, Q K^T: no
K K^T, no inverse) and the state pass, which then writes the chunk-entry states and
d = u - w S0 instead of the outputs.

Decoding: ``_recurrent_fwd_kernel`` applies the sub-steps one by one with the state
in registers; the op uses it for forward passes of at most ``RECURRENT_MAX_T`` tokens.

Backward, with dS the gradient of the state leaving a chunk:
``_state_bwd_kernel`` walks the chunks in reverse, ``dd = P^T dO + (exp(G_L - G) K) dS``
(stored for the next kernel) and ``dS0 = exp(G_L) dS + scale (exp(G_r) Q)^T dO - w^T dd``
(the adjoint of the same affine map), storing dS per chunk; ``_local_bwd_kernel`` then
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
bench/results/householder-traffic.md). With 3xTF32 the fp32 forward state pass takes each chunk
16 rows at a time (``_state_fwd_chunk32``), as the adjoint pass does for every dtype
(``_state_bwd_chunk``), which keeps their product operands small. The tensor cores run three TF32 products per fp32 product. For bf16 / fp16 inputs the
products of two input tiles (K K^T, Q K^T, in ``_wy_fwd_kernel``) take bf16 / fp16 operands;
every product with a computed operand (states, Tinv, scores, d, dd, dL/dA) takes fp32 operands as TF32 (bf16 operands
there were measured past the 1e-2 accuracy bound, see ``_dot32``). Accumulation is fp32
throughout, and the state passes carry the states in fp32; w, Tinv and the chunk states and
their gradients handed to the chunk-local backward are stored in the inputs' dtype (the states:
bf16 relative errors up to 6.0e-3 instead of 4.6e-3, measured with TF32 emulated), Q K^T, d and
dd in fp32, and the kernels write every gradient in its input's dtype.

Only plain pointer arithmetic with masks is used (no block pointers), and offsets
that can pass 2**31 are int64.
"""

from __future__ import annotations

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
    cu_tok_ptr,   # (N + 1,) int64 token offsets of the sequences
    H, K, V,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_GATE: tl.constexpr, TINV_GIVEN: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    """One program per (chunk, sequence * head): A, Tinv = (I + A)^{-1}, w = Tinv diag(beta exp(G)) K,
    the causal part of Q K^T and G. Everything here is independent of the carried state; u =
    Tinv diag(beta) V is left to the state passes (per V block, at no extra FLOPs), so that it
    is never written to memory. Q K^T is computed once per chunk here rather than once per V block
    in each state pass. TINV_GIVEN (the backward, with the forward's Tinv): Tinv is read from
    ``tinv_ptr`` instead of computed (no K K^T, no inverse)."""
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
    if TINV_GIVEN:
        tinv = tl.load(tinv_ptr + (sub[:, None] * H + head) * BL + rows[None, :], mask=valid[:, None], other=0.0)
    else:
        tinv = _chunk_inverse(kkt, beta, G, rows, valid, tinv_ptr, sub, head, H, BL, PREC)

    # w = Tinv diag(beta exp(G)) K, block by block.
    bg = beta * tl.exp(G.to(tl.float32))
    for k0 in range(0, K, BK):
        cols_k = k0 + tl.arange(0, BK)
        k_off = (sub[:, None] * H + head) * K + cols_k[None, :]
        kmask = valid[:, None] & (cols_k[None, :] < K)
        kk = tl.load(k_ptr + k_off, mask=kmask, other=0.0).to(tl.float32)
        rhs, first_bad = _split_nonfinite(kk * bg[:, None], rows, BL)
        w = _poison_from(_dot32(tinv, rhs, PREC), rows, first_bad)
        tl.store(w_ptr + k_off, w.to(w_ptr.dtype.element_ty), mask=kmask)


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
def _state_program(cu_tok_ptr, cu_chunk_ptr, H, K, V):
    """What a program of the state passes (grid (V blocks, N * H)) works on.

    Returns (head, bos, eos, chunk_base, n_chunks, seq_state): the head; the sequence's token
    span [bos, eos); the index of its first chunk and its number of chunks; the
    int64 offset of its (K, V) state in an (N, H, K, V) tensor.
    """
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    head = pid_nh % H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    chunk_base = tl.load(cu_chunk_ptr + seq)
    n_chunks = tl.load(cu_chunk_ptr + seq + 1) - chunk_base
    seq_state = (seq.to(tl.int64) * H + head) * K * V
    return head, bos, eos, chunk_base, n_chunks, seq_state


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
def _state_slice(cols_v, v_ok, K, V, NKB: tl.constexpr, BK: tl.constexpr):
    """Offsets (int64) and mask of this program's (NKB, BK, BV) slice of a (K, V) state."""
    rows_k = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    return (rows_k * V + cols_v[None, None, :]).to(tl.int64), (rows_k < K) & v_ok[None, None, :]


@triton.jit
def _state_fwd_chunk32(S, q_ptr, k_ptr, v_ptr, beta_ptr, w_ptr, tinv_ptr, qk_ptr, g_ptr, o_ptr, sub0, n_sub,
                       valid_tok, tok, G_L, G_r, cols_v, v_ok, head, H, K, V, scale,
                       NFAC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                       BV: tl.constexpr, STORE_O: tl.constexpr, PREC: tl.constexpr):
    """One chunk of ``_state_fwd_kernel`` for fp32 inputs; returns the state leaving the chunk.

    The same formulas as the bf16 / fp16 body, with the chunk's BL rows taken 16 at a time: per
    piece of 16 sub-steps, u and d = u - w S0 of its rows (Tinv's rows of the piece against the whole
    of diag(beta) V), its share of the read-outs (the scores' 16 columns of the piece times d's 16 rows)
    and of the state update (16 rows of K and d). Each piece's tiles are a quarter of the chunk's:
    every product is a 3xTF32 product (three tensor-core products on hi / lo splits of both
    operands), whose operands in the whole chunk's size spilled (ptxas: 0.1-1 KB per thread with
    Triton 3.9, 2-5 KB with 3.6). The pieces are a loop, not unrolled, so that only one piece's tiles
    are live at a time.

    The piece's u = Tinv[piece rows] diag(beta) V, a product reducing over the chunk's BL sub-steps,
    is batched over blocks of 16 of them as the K-long products are over K blocks (Tinv's piece as a
    (BL / 16, 16, 16) tile, diag(beta) V as (BL / 16, 16, BV), the batch summed): as one (16, BL) x
    (BL, BV) product, its 16 rows put the whole (16, BL) operand, hi and lo parts, in the registers
    of every one of the 8 warps (ptxas, Triton 3.6, writing o: 8 / 32 B of spills at sm_80 / sm_90a;
    batched 0 / 16 B, the rest being the final state's addresses, see the kernel).
    Without o it also frees registers: 242 -> 226 at sm_80 with 3.6, 250 -> 215 with 3.9."""
    tok_rows = tl.arange(0, BC)
    rows3 = tl.arange(0, BL // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]    # (BL / 16, 16) sub-step rows
    ok3 = rows3 < n_sub
    sub3 = (sub0 + rows3).to(tl.int64)
    beta = tl.load(beta_ptr + sub3 * H + head, mask=ok3, other=0.0).to(tl.float32)
    vv = tl.load(v_ptr + (sub3[:, :, None] * H + head) * V + cols_v[None, None, :],
                 mask=ok3[:, :, None] & v_ok[None, None, :], other=0.0).to(tl.float32)
    x = vv * beta[:, :, None]                                                   # diag(beta) V: (BL / 16, 16, BV)
    finite = tl.abs(x) < float("inf")      # (as _split_nonfinite, on the 3-D tile)
    first_bad_u = tl.min(tl.min(tl.where(finite, BL, rows3[:, :, None]), axis=1), axis=0)
    rhs = tl.where(finite, x, 0.0)
    r = tok_rows * NFAC + NFAC - 1                                              # each token's last sub-step
    S_next = tl.exp(G_L.to(tl.float32)) * S
    if STORE_O:
        q = _kblocks(q_ptr, tok, valid_tok, head, H, K, NKB, BK)
        o = tl.sum(_bdot(q, S, PREC), axis=0) * tl.exp(G_r.to(tl.float32))[:, None]      # exp(G_r) Q S0
    else:
        o = tl.zeros((BC, BV), tl.float32)
    first_bad = tl.full((BV,), BL, tl.int32)
    for p0 in range(0, n_sub, 16):    # (runtime bounds: the valid pieces only, a loop, not unrolled)
        rp = (p0 + tl.arange(0, 16)).to(tl.int32)        # the piece's rows within the chunk
        ok = rp < n_sub
        sub_p = (sub0 + rp).to(tl.int64)
        G_p = tl.load(g_ptr + sub_p * H + head, mask=ok, other=0.0)
        # the piece's rows of Tinv, columns in blocks of 16: (BL / 16, 16, 16)
        tinv = tl.load(tinv_ptr + (sub_p[None, :, None] * H + head) * BL + rows3[:, None, :], mask=ok[None, :, None],
                       other=0.0)
        u = _poison_from(tl.sum(_bdot(tinv, rhs, PREC), axis=0), rp, first_bad_u)
        w = _kblocks(w_ptr, sub_p, ok, head, H, K, NKB, BK)
        d = u - tl.sum(_bdot(w, S, PREC), axis=0)                                # (16, BV)
        if STORE_O:
            read = (rp[None, :] <= r[:, None]) & ok[None, :] & valid_tok[:, None]
            decay_read = tl.exp(tl.where(read, (G_r[:, None] - G_p[None, :]).to(tl.float32), float("-inf")))
            qk = tl.load(qk_ptr + (tok[:, None] * H + head) * BL + rp[None, :], mask=read, other=0.0)
            scores = tl.where(decay_read > 0.0, decay_read * qk, 0.0)
            d_finite, bad = _split_nonfinite(d, rp, BL)
            first_bad = tl.minimum(first_bad, bad)
            o += _dot32(scores, d_finite, PREC)
        else:
            tl.store(o_ptr + (sub_p[:, None] * H + head) * V + cols_v[None, :], d.to(o_ptr.dtype.element_ty),
                     mask=ok[:, None] & v_ok[None, :])
        decay_last = tl.exp(tl.where(ok, (G_L - G_p).to(tl.float32), float("-inf")))
        kk = _kblocks(k_ptr, sub_p, ok, head, H, K, NKB, BK)
        dT = tl.broadcast_to(tl.trans(d * decay_last[:, None])[None, :, :], (NKB, BV, 16))
        S_next += tl.permute(_bdot(dT, kk, PREC), (0, 2, 1))
    if STORE_O:
        o = _poison_from(scale * o, r, first_bad)
        tl.store(o_ptr + (tok[:, None] * H + head) * V + cols_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=valid_tok[:, None] & v_ok[None, :])
    return S_next


# ----------------------------------------------------------------------------------------------
# Forward kernel 2: the state pass over chunks, with the outputs. The forward writes the
# outputs and the final state only; the backward's recomputation (STORE_O false) writes
# instead the state entering every chunk and d = u - w S0, which its chunk-local kernel reads.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_fwd_kernel(
    q_ptr,        # (B*T, H, K)
    k_ptr,        # (B*T*n, H, K)
    v_ptr,        # (B*T*n, H, V)
    beta_ptr,     # (B*T*n, H)
    w_ptr,        # (B*T*n, H, K) work dtype
    tinv_ptr,     # (B*T*n, H, BL) work dtype
    qk_ptr,       # (B*T, H, BL) fp32: the causal part of Q K^T, read when STORE_O
    g_ptr,        # (B*T*n, H) fp64
    h0_ptr,       # (N, H, K, V) initial states, read when HAS_H0
    o_ptr,        # out (B*T, H, V) when STORE_O; else out (B*T*n, H, V) fp32: d, for the backward
    states_ptr,   # out (total chunks, H, K, V) fp32, when not STORE_O: the state entering every chunk
    final_ptr,    # out (N, H, K, V) fp32, written when STORE_O (the backward does not need it)
    cu_tok_ptr,   # (N + 1,) int64 token offsets
    cu_chunk_ptr,  # (N + 1,) int64 chunk offsets (index of a sequence's first chunk)
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    NKB: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_O: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr, INTERP: tl.constexpr, STAGES: tl.constexpr,
):
    head, bos, eos, chunk_base, n_chunks, seq_state = _state_program(cu_tok_ptr, cu_chunk_ptr, H, K, V)
    tok_rows = tl.arange(0, BC)
    cols_v = tl.program_id(0) * BV + tl.arange(0, BV)
    v_ok = cols_v < V
    s_off, smask = _state_slice(cols_v, v_ok, K, V, NKB, BK)
    if HAS_H0:
        S = tl.load(h0_ptr + seq_state + s_off, mask=smask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((NKB, BK, BV), tl.float32)

    # STAGES: how many chunks' tiles the compiler may have in flight (software pipelining of the
    # chunk loop); fp32 tiles take 1 (three stages of w, u and k need 189 KB of shared memory).
    for c in tl.range(0, n_chunks, num_stages=STAGES):
        sub0, n_sub, valid, valid_tok, sub, tok = _chunk_span(bos + c * CT, eos, CT, NFAC, BL, BC)
        G, G_L, G_r, decay_last, decay_read = _chunk_decays(g_ptr, sub, tok_rows, valid, valid_tok, sub0, n_sub,
                                                            head, H, NFAC, BL)
        if not STORE_O:
            tl.store(states_ptr + ((chunk_base + c) * H + head) * K * V + s_off, S.to(states_ptr.dtype.element_ty),
                     mask=smask)
        if not LOWP:
            S = _state_fwd_chunk32(S, q_ptr, k_ptr, v_ptr, beta_ptr, w_ptr, tinv_ptr, qk_ptr, g_ptr, o_ptr, sub0, n_sub,
                                   valid_tok, tok, G_L, G_r, cols_v, v_ok, head, H, K, V, scale,
                                   NFAC, BL, BC, BK, NKB, BV, STORE_O, PREC)
        else:
            v_off = (sub[:, None] * H + head) * V + cols_v[None, :]
            vmask = valid[:, None] & v_ok[None, :]
            # u = Tinv diag(beta) V for this program's V columns (the rows of the chunk-local WY
            # factor u, never stored), then d = u - w S0.
            # beta's addresses, and those of the store of d below, are computed from the chunk's first
            # sub-step sub0, not from ``sub`` / ``v_off``: the software pipeliner issues the tiles'
            # loads STAGES - 1 chunks ahead, and any value they share with this body's plain loads (beta,
            # too small for an asynchronous copy) and stores is carried across iterations in registers,
            # one copy per chunk in flight: the (BL,) int64 sub-steps for beta, the (BL, BV) int64
            # offsets for d. Triton 3.6 spilled them at sm_80 (ptxas: 104 B for bf16 with o, 64 B for
            # fp16 with o, 8 B for bf16 writing d; now 0).
            rows = tl.arange(0, BL)
            tinv = tl.load(tinv_ptr + (sub[:, None] * H + head) * BL + rows[None, :], mask=valid[:, None], other=0.0)
            beta = tl.load(beta_ptr + (sub0.to(tl.int64) * H + head) + rows * H, mask=valid, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + v_off, mask=vmask, other=0.0).to(tl.float32)
            rhs, first_bad_u = _split_nonfinite(vv * beta[:, None], rows, BL)
            u = _poison_from(_dot32(tinv, rhs, PREC), rows, first_bad_u)
            w = _kblocks(w_ptr, sub, valid, head, H, K, NKB, BK)
            d = u - tl.sum(_bdot(w, S, PREC), axis=0)
            if STORE_O:
                # o = scale (exp(G_r) Q S0 + P d). Non-finite rows of d (sub-steps at or after a
                # NaN/inf input) reach only the tokens whose last sub-step r is at or past them.
                q = _kblocks(q_ptr, tok, valid_tok, head, H, K, NKB, BK)
                qk = _load_scores(qk_ptr, tok, valid, valid_tok, head, H, NFAC, BL, BC)
                d_finite, first_bad = _split_nonfinite(d, rows, BL)
                scores = tl.where(decay_read > 0.0, decay_read * qk, 0.0)
                o = scale * (tl.sum(_bdot(q, S, PREC), axis=0) * tl.exp(G_r.to(tl.float32))[:, None]
                             + _dot32(scores, d_finite, PREC))
                o = _poison_from(o, tok_rows * NFAC + NFAC - 1, first_bad)
                tl.store(o_ptr + (tok[:, None] * H + head) * V + cols_v[None, :], o.to(o_ptr.dtype.element_ty),
                         mask=valid_tok[:, None] & v_ok[None, :])
            else:
                tl.store(o_ptr + (sub0.to(tl.int64) * H + head) * V + (rows.to(tl.int64) * H * V)[:, None]
                         + cols_v[None, :], d.to(o_ptr.dtype.element_ty), mask=vmask)
            # S1 = exp(G_L) S0 + (exp(G_L - G) K)^T d, computed as ((exp(G_L - G) d)^T K)^T: with d (a
            # dot result) as the second operand, Triton 3.6 fails to compile the tf32 product for sm_90.
            # The decays exp(G_L - G_m) scale the rows of d, a (BL, BV) tile, not those of the (NKB, BL,
            # BK) k tile: the same product, but the (BL,) decays are not broadcast into the 3-D tile's
            # layout, where Triton 3.6 held them replicated (bf16 with o: 3.6 KB -> 1.7 KB of spills at sm_90a).
            kk = _kblocks(k_ptr, sub, valid, head, H, K, NKB, BK)
            dT = tl.broadcast_to(tl.trans(d * decay_last[:, None])[None, :, :], (NKB, BV, BL))
            S = tl.exp(G_L.to(tl.float32)) * S + tl.permute(_bdot(dT, kk, PREC), (0, 2, 1))
    if STORE_O:
        if LOWP:
            tl.store(final_ptr + seq_state + s_off, S, mask=smask)
        else:
            # fp32: the final state's offsets are computed anew (pid_nh = seq * H + head, so seq_state =
            # pid_nh * K * V), not kept from the h0 load across the chunk loop, where ptxas spilled them
            # under Triton 3.6 (16 B at sm_90a). (With bf16 / fp16 this costs Triton 3.9 registers, up to
            # 234 -> 254, and spills nothing either way.)
            rows_k = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
            f_off = tl.program_id(1).to(tl.int64) * K * V + rows_k.to(tl.int64) * V + cols_v[None, None, :]
            tl.store(final_ptr + f_off, S, mask=(rows_k < K) & (cols_v < V)[None, None, :])


@triton.jit
def _kblocks_t(ptr, rows, rows_ok, head, H, K, NKB: tl.constexpr, BK: tl.constexpr):
    """``_kblocks`` transposed: the (rows, K) tile of a (..., H, K) tensor as (NKB, BK, len(rows))."""
    cols = tl.arange(0, NKB)[:, None, None] * BK + tl.arange(0, BK)[None, :, None]
    return tl.load(ptr + (rows[None, None, :] * H + head) * K + cols, mask=rows_ok[None, None, :] & (cols < K),
                   other=0.0)


@triton.jit
def _state_bwd_chunk(dS, q_ptr, k_ptr, w_ptr, qk_ptr, g_ptr, do_ptr, dd_ptr, sub0, n_sub, G_L, cols_v, v_ok, head, H,
                       K, V, scale, NFAC: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
                       BV: tl.constexpr, PREC: tl.constexpr):
    """One chunk of ``_state_bwd_kernel`` (every dtype); returns the gradient of the state entering it.

    dS: (NKB, BK, BV) fp32, the gradient of the state leaving the chunk (this program's V columns
    ``cols_v``); sub0: the chunk's first sub-step (int64), n_sub its valid sub-steps; G_L: fp64, G at
    the chunk's last sub-step. Writes the chunk's dd rows (fp32, (n_sub, BV) of ``dd_ptr``).

    dd = P^T dO + (exp(G_L - G) K) dS and dS0 = exp(G_L) dS + scale (exp(G_r) Q)^T dO - w^T dd, the
    adjoint of the chunk's state update (PREC: "tf32x3" for fp32 inputs, "tf32" for bf16 / fp16, whose
    tiles are loaded as such and widened in registers), 16 rows at a time as in ``_state_fwd_chunk32``,
    in three loops: (1) per piece of 16 sub-steps, scale P^T dO of its rows by 16 x 16 blocks (16 tokens
    at a time, only the tokens whose last sub-step is at or past the piece), written to dd; (2) per
    piece of 16 sub-steps, dd = that + (exp(G_L - G) K) dS (read back, completed, written) and its
    share - w^T dd of dS0; (3) per piece of 16 tokens, its share scale (exp(G_r) Q)^T dO of dS0. Every
    tile is read from memory piece by piece: dO once per (sub-step piece, token piece) block (re-reads,
    L1 / L2 hits) and the chunk's dd rows (4 KB a chunk per program at BV = 16) written twice and read
    once in between (8 KB more L1 / L2 traffic a chunk, beside its 96 KB of k, w and q at K = 128).

    Registers (ptxas, K = V = 128, 8 warps; worst of the four HAS_DFINAL x HAS_H0 specialisations,
    Triton 3.6 and 3.9, sm_80 and sm_90a). Before: 596 B of spills (3.6, sm_80) at 255 registers.
    (a) The piece loops were software-pipelined with the compile's default 3 stages (the next
    pieces' k, w, scores and masks in flight, 56 KB of shared memory); with ``num_stages=1``: no
    spills, 222-254 registers. (b) dd's P^T dO was one (16, BC) x (BC, BV) product with dO (BC, BV)
    loaded once per chunk: with 8 warps along a 16-row result every warp holds all of both
    operands, hi and lo parts (128 registers); by 16 x 16 blocks, skipping the blocks of tokens that
    end before the piece (6 of 16 at n = 1: fewer products): 197-213. (c) The left operands of w^T dd
    and q^T dO loaded transposed (``_kblocks_t``), not permuted (a layout conversion each): 189-201.
    (d) The chunk's rows indexed in int32 from 64-bit base pointers of the chunk (the indices were
    int64, and all the address arithmetic with them, its strides held across the loops): 174-185.
    (e) P^T dO in a loop of its own, before the one that holds dS's 3xTF32 hi / lo parts as the
    operand of K dS (loop-invariant, hoisted: 16 registers across that loop): 162-187 with maxnreg
    255, and with maxnreg 128 no spills except 48 B at sm_80 with Triton 3.6 (the last of those, the
    initial state's gradient stored after the chunk loop), where (d) spilled up to 88 B and (c) up to
    264 B. (f) That store made in the chunk loop (``_state_bwd_kernel``): none with maxnreg 128
    either (116-128 registers)."""
    # Chunk-local row indices are int32 against 64-bit base pointers of the chunk (one 64-bit
    # address a tile element, not 64-bit index arithmetic held across the loops). The int32 offsets
    # stay below 64 H max(K, V, BL), under 2**31 for H max(K, V) < 2**25.
    n_sub = n_sub.to(tl.int32)
    n_tok = n_sub // NFAC
    tok0 = sub0 // NFAC
    g_c = g_ptr + sub0 * H + head
    k_c = k_ptr + sub0 * H * K
    w_c = w_ptr + sub0 * H * K
    dd_c = dd_ptr + sub0 * H * V
    q_c = q_ptr + tok0 * H * K
    qk_c = qk_ptr + tok0 * H * BL
    do_c = do_ptr + tok0 * H * V
    # (Runtime bounds: the valid pieces only, loops, not unrolled, and not pipelined: num_stages=1.)
    for p0 in tl.range(0, n_sub, 16, num_stages=1):
        rp = p0 + tl.arange(0, 16)                       # the piece's sub-step rows within the chunk
        ok = rp < n_sub
        G_p = tl.load(g_c + rp * H, mask=ok, other=0.0)
        # P^T dO for the piece's rows, 16 tokens at a time: only tokens whose last sub-step is at or
        # past the piece's first row (token c >= p0 // NFAC) read it.
        pdo = tl.zeros((16, BV), tl.float32)
        for t0 in tl.range((p0 // NFAC) // 16 * 16, n_tok, 16, num_stages=1):
            tp = t0 + tl.arange(0, 16)
            tok_ok = tp < n_tok
            r_p = tp * NFAC + NFAC - 1
            G_rp = tl.load(g_c + r_p * H, mask=tok_ok, other=0.0)
            read = (rp[None, :] <= r_p[:, None]) & ok[None, :] & tok_ok[:, None]
            decay_read = tl.exp(tl.where(read, (G_rp[:, None] - G_p[None, :]).to(tl.float32), float("-inf")))
            P = decay_read * tl.load(qk_c + (tp[:, None] * H + head) * BL + rp[None, :], mask=read,
                                     other=0.0)                           # (16 tokens, 16 sub-steps)
            do_p = tl.load(do_c + (tp[:, None] * H + head) * V + cols_v[None, :],
                           mask=tok_ok[:, None] & v_ok[None, :], other=0.0)
            pdo += _dot32(tl.trans(P), do_p, PREC)
        tl.store(dd_c + (rp[:, None] * H + head) * V + cols_v[None, :], scale * pdo, mask=ok[:, None] & v_ok[None, :])
    # The rows written above are read back below by other threads (other layouts): a CTA barrier,
    # which also makes the global memory writes before it visible to the reads after it.
    tl.debug_barrier()
    dS_prev = tl.exp(G_L.to(tl.float32)) * dS
    for p0 in tl.range(0, n_sub, 16, num_stages=1):
        # dd = scale P^T dO (read back) + (exp(G_L - G) K) dS for the piece's rows; dS0 -= w^T dd.
        rp = p0 + tl.arange(0, 16)
        ok = rp < n_sub
        G_p = tl.load(g_c + rp * H, mask=ok, other=0.0)
        decay_last = tl.exp(tl.where(ok, (G_L - G_p).to(tl.float32), float("-inf")))
        kk = _kblocks(k_c, rp, ok, head, H, K, NKB, BK)
        dd_off = (rp[:, None] * H + head) * V + cols_v[None, :]
        dd_mask = ok[:, None] & v_ok[None, :]
        dd = (tl.load(dd_c + dd_off, mask=dd_mask, other=0.0)
              + tl.sum(_bdot(kk, dS, PREC), axis=0) * decay_last[:, None])
        tl.store(dd_c + dd_off, dd.to(dd_ptr.dtype.element_ty), mask=dd_mask)
        w = _kblocks_t(w_c, rp, ok, head, H, K, NKB, BK)
        dS_prev -= _bdot(w, tl.broadcast_to(dd[None, :, :], (NKB, 16, BV)), PREC)
    for t0 in tl.range(0, n_tok, 16, num_stages=1):    # dS0 += scale (exp(G_r) Q)^T dO
        tp = t0 + tl.arange(0, 16)                       # the piece's token rows within the chunk
        ok = tp < n_tok
        G_rp = tl.load(g_c + (tp * NFAC + NFAC - 1) * H, mask=ok, other=0.0)
        do_p = tl.load(do_c + (tp[:, None] * H + head) * V + cols_v[None, :], mask=ok[:, None] & v_ok[None, :],
                       other=0.0)
        dos = do_p.to(tl.float32) * (scale * tl.exp(G_rp.to(tl.float32)))[:, None]
        qs = _kblocks_t(q_c, tp, ok, head, H, K, NKB, BK)
        dS_prev += _bdot(qs, tl.broadcast_to(dos[None, :, :], (NKB, 16, BV)), PREC)
    return dS_prev


# ----------------------------------------------------------------------------------------------
# Backward kernel 1: the adjoint state pass, chunks in reverse, the gradient state dS held
# like the state in the forward pass; writes dS per chunk and dd.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_bwd_kernel(
    q_ptr, k_ptr, w_ptr,
    qk_ptr,       # (B*T, H, BL) fp32: the causal part of Q K^T (from _wy_fwd_kernel)
    g_ptr,
    do_ptr,       # (B*T, H, V) gradient of o
    dfinal_ptr,   # (N, H, K, V) gradient of the final state, read when HAS_DFINAL
    dstates_ptr,  # out (total chunks, H, K, V) fp32: gradient of the state leaving every chunk
    dh0_ptr,      # out (N, H, K, V) gradient of the initial state (its dtype), written when HAS_H0
    dd_ptr,       # out (B*T*n, H, V) fp32: dL/dd, for the chunk-local kernel
    cu_tok_ptr, cu_chunk_ptr,
    H, K, V, scale,
    NFAC: tl.constexpr, CT: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    NKB: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
    LOWP: tl.constexpr, INTERP: tl.constexpr,
):
    head, bos, eos, chunk_base, n_chunks, seq_state = _state_program(cu_tok_ptr, cu_chunk_ptr, H, K, V)
    cols_v = tl.program_id(0) * BV + tl.arange(0, BV)
    v_ok = cols_v < V
    s_off, smask = _state_slice(cols_v, v_ok, K, V, NKB, BK)
    # The gradient of the state leaving the last chunk is that of the final state.
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + seq_state + s_off, mask=smask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((NKB, BK, BV), tl.float32)

    # Every dtype takes the chunk in pieces of 16 rows (``_state_bwd_chunk``; PREC is "tf32" for bf16 /
    # fp16: the same products, each one TF32 product, with the 16-bit tiles loaded as such and widened
    # in registers), with one more step than chunks, in which the gradient of the initial state is
    # stored where the chunks' are (after the loop, the addresses of that store, derived from the
    # thread index before it, were the registers ptxas spilled at maxnreg 128: 48 B at sm_80 with
    # Triton 3.6, fp32).
    # bf16 / fp16 took the whole chunk at once (P^T dO one (BL, BC) x (BC, BV) product, K dS, w^T dd
    # and q^T dO over all BL rows, dO, the scores and the decays loaded once per chunk): 236-255
    # registers at maxnreg 255 and 60-70 KB of shared memory with STAGES = 2, and at maxnreg 128
    # 608-920 B of spills (ptxas, K = V = 128, n = 3, the four HAS_DFINAL x HAS_H0 specialisations:
    # Triton 3.9 608-744 B at sm_90a, 908-920 B at sm_80; 3.6 632-916 B / 720-832 B). By pieces: no
    # spills at maxnreg 128, 109-128 registers (Triton 3.6 and 3.9, sm_80 and sm_90a, n = 1, 2, 3,
    # bf16 and fp16), 134-154 at maxnreg 255; 8 KB of shared memory. The same distinct bytes a chunk
    # (dO and the scores re-read by 16 x 16 blocks, dd written twice and read once: L1 / L2 traffic)
    # and no more tensor-core work (the blocks of P^T dO above the diagonal are skipped). The chunk
    # loop is not software-pipelined: it holds loops, which Triton does not pipeline (the same PTX
    # with num_stages 1, 2 and 3, Triton 3.9 and 3.6 at sm_90a). LOWP and INTERP are not read here
    # (every product has a computed operand: fp32 operands, see ``_dot32``).
    for i in range(0, n_chunks + 1):
        c = n_chunks - 1 - i
        if c >= 0:
            tl.store(dstates_ptr + ((chunk_base + c) * H + head) * K * V + s_off,
                     dS.to(dstates_ptr.dtype.element_ty), mask=smask)
            sub0, n_sub, valid, valid_tok, sub, tok = _chunk_span(bos + c * CT, eos, CT, NFAC, BL, BC)
            G_L = tl.load(g_ptr + (sub0 + n_sub - 1) * H + head)
            dS = _state_bwd_chunk(dS, q_ptr, k_ptr, w_ptr, qk_ptr, g_ptr, do_ptr, dd_ptr, sub0, n_sub, G_L,
                                    cols_v, v_ok, head, H, K, V, scale, NFAC, BL, BK, NKB, BV, PREC)
        elif HAS_H0:
            tl.store(dh0_ptr + seq_state + s_off, dS.to(dh0_ptr.dtype.element_ty), mask=smask)


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
                           PREC: tl.constexpr, STAGES: tl.constexpr):
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
        s_off = cols_k[:, None] * V + cols_v[None, :]
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
                       BL: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
            head, H, V, scale, gamma_r, gamma_L, decay_last, dG, dG_r, dG_L, BL, BC, BK, BV, PREC, 1)
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
    states_ptr,   # (total chunks, H, K, V) fp32: state entering each chunk
    dstates_ptr,  # (total chunks, H, K, V) fp32: gradient of the state leaving each chunk
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
    BV: tl.constexpr, HAS_GATE: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
    INTERP: tl.constexpr,
):
    chunk = tl.program_id(0)
    pid_nh = tl.program_id(1)
    seq = pid_nh // H
    head = pid_nh % H
    bos = tl.load(cu_tok_ptr + seq)
    eos = tl.load(cu_tok_ptr + seq + 1)
    tok0 = bos + chunk * CT
    if tok0 >= eos:
        return
    chunk_idx = tl.load(cu_chunk_ptr + seq) + chunk
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
    states_ptr += (chunk_idx * H + head) * K * V
    dstates_ptr += (chunk_idx * H + head) * K * V
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
            head, H, K, V, scale, NFAC, BL, BC, BK, BV, HAS_GATE, PREC)
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
                PREC, 3)
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
    # given for the state passes and the chunk-local backward (launch option ``maxnreg``): left to
    # itself, ptxas caps some of them at 32 or 128 registers and spills far more (Triton 3.6, sm_80:
    # fp32 adjoint state pass 19.5 KB at 32 registers, 5.4 KB at 255; bf16 forward state pass 6.1 KB
    # at 128, 3.4 KB at 255; Triton 3.9, fp32 chunk-local backward 6.1 KB at 128, 3.2 KB at 255).
    # BWD_MAXNREG: the adjoint state pass's ceiling, 128 for K <= 128: it fits in 109-128 registers
    # without spilling (every dtype, n = 1, 2, 3, Triton 3.6 and 3.9, sm_80 and sm_90a; K = 256 spills
    # up to 112 B at 128), so two 8-warp programs share an SM. The state passes walk the chunks one
    # after another, one program per (sequence, head, 16 columns of V): at (B, T, H, K = V) =
    # (1, 8192, 32, 128) that is 256 programs, two waves on 132 SMs at one program per SM and one
    # wave at two.
    # STAGES: software-pipelining depth of the forward state pass's chunk loop (fp32: 1, two stages
    # of its fp32 tiles would not fit in shared memory; bf16 / fp16: 3, and with 2 or 3 no
    # specialisation spills, Triton 3.6 and 3.9, sm_80 and sm_90a; 3 holds 138-155 KB of shared
    # memory with o, 2 holds 77-94 KB: only timings can choose).
    # Measured at the launches' alignment (aot_specs' divisible_by_16), bench/results/householder-traffic.md.
    num_warps = 1 if interpret else 8
    prec = "tf32" if half else "tf32x3"
    bwd_maxnreg = 128 if BKF <= 128 else 255
    return config_override("householder", dict(CT=CT, BL=BL, BC=BC, BK=BK, BV=BV, BKF=BKF, BKS=BKS, BVS=BVS,
                                               num_warps=num_warps, MAXNREG=255, BWD_MAXNREG=bwd_maxnreg,
                                               STAGES=3 if half else 1, PREC=prec,
                                               LOWP=half, INTERP=interpret),
                           ("BK", "BV", "BKS", "BVS", "num_warps", "STAGES", "MAXNREG", "BWD_MAXNREG"))


def _launch_args(n: int, cfg: dict) -> tuple:
    """Keyword arguments of the chunk-parallel kernels and of the state kernels (with the register
    ceiling ``maxnreg``; ``_local_bwd_kernel`` is launched with it too, ``_wy_fwd_kernel`` without)."""
    shared = dict(NFAC=n, CT=cfg["CT"], BL=cfg["BL"], PREC=cfg["PREC"], LOWP=cfg["LOWP"], INTERP=cfg["INTERP"],
                  num_warps=cfg["num_warps"])
    return (dict(BK=cfg["BK"], BV=cfg["BV"], **shared),
            dict(BC=cfg["BC"], BK=cfg["BKS"], NKB=cfg["BKF"] // cfg["BKS"], BV=cfg["BVS"], maxnreg=cfg["MAXNREG"],
                 **shared))


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


def _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n, tinv=None):
    """Runs ``_wy_fwd_kernel``: the state-independent chunk factors, as a dict of tensors
    w (B, T * n, H, K) and Tinv (B, T * n, H, BL) in the work dtype, qk (B, T, H, BL) fp32 (the
    causal part of Q K^T) and G (B, T * n, H) fp64. With ``tinv`` (the forward's, in the backward)
    Tinv is read, not computed."""
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
    chunk_args, _ = _launch_args(n, cfg)
    if max_chunks > 0 and N * H > 0:
        _wy_fwd_kernel[(max_chunks, N * H)](
            q, k, beta, lg if lg is not None else beta, w, tinv, qk, G, cu_tok, H, K, V,
            HAS_GATE=lg is not None, TINV_GIVEN=given, BC=cfg["BC"], **chunk_args)
    return dict(w=w, tinv=tinv, qk=qk, G=G)


def tinv_shape(B: int, T: int, n: int, H: int) -> tuple:
    """Shape of the chunk inverse Tinv the forward hands to the backward: (B, T * n, H, BL), row s
    holding row s mod BL of its chunk's (I + A)^{-1}; stored in ``_work_dtype`` of the inputs."""
    return (B, T * n, H, max(16, _next_pow2(max(1, SUBSTEPS_PER_CHUNK // n) * n)))


def _state_pass(t, f, h0, cfg, N, cu_tok, cu_chunk, total_chunks, scale, H, K, V, n, store_o):
    """The state pass over the chunk factors ``f``. With store_o the outputs o and the final states are
    written; without (the backward's recomputation) the state entering every chunk and the corrected
    values d = u - w S0 of every sub-step instead. Returns (out, states, final)."""
    q, k, v, beta = t["q"], t["k"], t["v"], t["beta"]
    B, T = q.shape[:2]
    dev = q.device
    f32 = torch.float32
    if store_o:
        out = torch.empty((B, T, H, V), dtype=q.dtype, device=dev)
        final = torch.empty((N, H, K, V), dtype=f32, device=dev)
        states = None
    else:
        out = torch.empty((B, T * n, H, V), dtype=f32, device=dev)
        final = None
        states = torch.empty((max(total_chunks, 1), H, K, V), dtype=_state_dtype(q.dtype), device=dev)
    _, state_args = _launch_args(n, cfg)
    if N * H > 0:
        spare = final if store_o else states                                   # (placeholders: not read)
        h0c = h0.contiguous() if h0 is not None else spare
        _state_fwd_kernel[(triton.cdiv(V, cfg["BVS"]), N * H)](
            q, k, v, beta, f["w"], f["tinv"], f["qk"], f["G"], h0c, out, spare, spare, cu_tok, cu_chunk, H, K, V,
            float(scale), HAS_H0=h0 is not None, STORE_O=store_o, STAGES=cfg["STAGES"], **state_args)
    return out, states, final


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
        with return_saved also the chunk inverse Tinv ((B, T * n, H, BL), ``tinv_shape``, in the
        inputs' bf16 / fp16; None for fp32, see ``saves_tinv``) for ``householder_scan_backward``, which then need not
        recompute it (K K^T and the blocked inverse: 1.2 M of 42 M FLOPs per chunk and head at
        K = V = 128, for Tinv's 128 bytes per token and head kept between the passes).
    """
    B, T, H, K = q.shape
    n, V = k.shape[2], v.shape[-1]
    cfg, N, cu_tok, cu_chunk, max_chunks, total_chunks, t = _prepare(q, k, v, beta, log_gate, cu_seqlens)
    f = _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n)
    o, _, final = _state_pass(t, f, initial_state, cfg, N, cu_tok, cu_chunk, total_chunks, scale, H, K, V, n, True)
    if q.dtype == torch.float64:  # the contract's dtype; the kernels themselves accumulate in fp32
        final = final.double()
    if return_saved:
        return o, final, f["tinv"] if saves_tinv(q.dtype) else None
    return o, final


def saves_tinv(dtype: torch.dtype) -> bool:
    """Whether the forward hands Tinv to the backward for inputs of ``dtype``: for bf16 / fp16. fp32
    recomputes it (K K^T and the inverse: 1.21 M tensor FLOPs per chunk and head at K = 128, run as
    3xTF32 products) instead of keeping 256 B per token and head between the passes. (Chosen when the
    fp32 ``_wy_fwd_kernel`` reading Tinv spilled 11 KB per thread at sm_90a with exact "ieee" products;
    with 3xTF32 it spills nothing, ptxas with Triton 3.9 and 3.6 at sm_80 and sm_90a, 206-249
    registers, so saving it for fp32 too is a memory / FLOPs trade-off now.)"""
    return dtype in (torch.bfloat16, torch.float16)


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
    f = _chunk_factors(t, cfg, N, cu_tok, max_chunks, H, K, V, n, tinv=tinv)
    d, states, _ = _state_pass(t, f, initial_state, cfg, N, cu_tok, cu_chunk, total_chunks, scale, H, K, V, n,
                               False)
    dev = q.device
    grad_o = grad_o.contiguous()
    dstates = torch.empty_like(states)
    dd = torch.empty_like(d)
    # Every token of every sequence is written by exactly one chunk program: no zero-fills.
    dh0 = torch.empty_like(initial_state, memory_format=torch.contiguous_format) if initial_state is not None else None
    chunk_args, state_args = _launch_args(n, cfg)
    if N * H > 0:
        gf = grad_final.contiguous() if grad_final is not None else dstates      # (placeholders: not read)
        _state_bwd_kernel[(triton.cdiv(V, cfg["BVS"]), N * H)](
            t["q"], t["k"], f["w"], f["qk"], f["G"], grad_o, gf, dstates, dh0 if dh0 is not None else dstates, dd,
            cu_tok, cu_chunk, H, K, V, float(scale), HAS_DFINAL=grad_final is not None, HAS_H0=dh0 is not None,
            **dict(state_args, maxnreg=cfg["BWD_MAXNREG"]))
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
            HAS_GATE=log_gate is not None, BC=cfg["BC"], maxnreg=cfg["MAXNREG"], **chunk_args)
    return dq, dk, dv, dbeta, dlg, dh0


# Kernel specialisations compiled ahead of time in CI for sm_80 and sm_90a.
def _signatures(elem: str) -> dict:
    """Triton signatures of the four kernels for inputs stored as ``elem`` (fp32 / bf16 / fp16); w,
    Tinv, the chunk states handed to the chunk-local backward and the gradients are stored in that
    dtype too (Q K^T, d, dd, the final state in fp32)."""
    x = f"*{elem}"
    return {
        _wy_fwd_kernel: {"q_ptr": x, "k_ptr": x, "beta_ptr": x, "lg_ptr": x, "w_ptr": x, "tinv_ptr": x,
                         "qk_ptr": "*fp32", "g_ptr": "*fp64", "cu_tok_ptr": "*i64", "H": "i32", "K": "i32",
                         "V": "i32"},
        _state_fwd_kernel: {"q_ptr": x, "k_ptr": x, "v_ptr": x, "beta_ptr": x, "w_ptr": x, "tinv_ptr": x,
                            "qk_ptr": "*fp32", "g_ptr": "*fp64",
                            "h0_ptr": "*fp32", "o_ptr": x, "states_ptr": x, "final_ptr": "*fp32",
                            "cu_tok_ptr": "*i64", "cu_chunk_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32",
                            "scale": "fp32"},
        _state_bwd_kernel: {"q_ptr": x, "k_ptr": x, "w_ptr": x, "qk_ptr": "*fp32", "g_ptr": "*fp64", "do_ptr": x,
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
                 "_local_bwd_kernel": {"programs_per_sm": 1}}


def _under_static_budget(kernel, elem: str, constexprs: dict):
    """How CI holds this specialisation to STATIC_BUDGET: True (its kernel's entry), a dict of the
    fields that replace the entry's, or False (left out). Every specialisation is held, at sm_90a
    with Triton 3.9 and 3.6, compiled at the launches' alignment and register ceilings
    (``aot_specs``): no spills, one program per SM (at most 255 registers x 256 threads), and two for
    the adjoint state pass, launched with ``maxnreg`` 128 (``_config``'s BWD_MAXNREG).

    The last one left out, the fp32 chunk-local backward with the gate (Triton 3.6: 20 / 92 B of
    spills at sm_80 / sm_90a, stored before its first loop and loaded after its last), spills
    nothing since that kernel takes the chunk's sub-step count as int32 (see there).
    Registers per thread (ptxas -v, K = V = 128; bench/results/householder-traffic.md has the
    tables): the adjoint state pass 115-128, the forward state pass 197-255, the others 77-255. No
    specialisation spills at sm_80 either (not budgeted: the budget is sm_90a's).
    """
    if kernel is _state_bwd_kernel:
        return {"programs_per_sm": 2}
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


def _plain_specs():
    """The specialisations of ``aot_specs`` as (kernel, signature, constexprs, num_warps, storage dtype,
    the launch's compile options: its ``maxnreg`` where the launcher passes one)."""
    plans = ((torch.float32, "fp32", 1, True), (torch.bfloat16, "bf16", 3, True), (torch.float16, "fp16", 2, False))
    for torch_dtype, elem, n, with_backward in plans:
        cfg = _config(n, 128, 128, torch_dtype, interpret=False)
        chunk_args, state_args = _launch_args(n, cfg)
        nw = chunk_args.pop("num_warps")
        del state_args["num_warps"]                              # (launch options, not constexprs)
        capped = {"maxnreg": state_args.pop("maxnreg")}
        sigs = _signatures(elem)
        for gate in (False, True):
            for given in ((False, True) if with_backward and saves_tinv(torch_dtype) else (False,)):
                yield (_wy_fwd_kernel, sigs[_wy_fwd_kernel], dict(HAS_GATE=gate, TINV_GIVEN=given, BC=cfg["BC"],
                                                                 **chunk_args), nw, elem, {})
        for store_o in (False, True):  # without the outputs it writes d (fp32) through o_ptr
            sig = dict(sigs[_state_fwd_kernel], o_ptr=f"*{elem}" if store_o else "*fp32",
                       states_ptr="*fp32" if store_o else f"*{elem}")   # (with o: the final state, not written)
            yield (_state_fwd_kernel, sig, dict(HAS_H0=True, STORE_O=store_o, STAGES=cfg["STAGES"], **state_args), nw,
                   elem, capped)
        rec_sig = {"q_ptr": f"*{elem}", "k_ptr": f"*{elem}", "v_ptr": f"*{elem}", "beta_ptr": f"*{elem}",
                   "lg_ptr": f"*{elem}", "h0_ptr": "*fp32", "o_ptr": f"*{elem}", "final_ptr": "*fp32",
                   "cu_tok_ptr": "*i64", "H": "i32", "K": "i32", "V": "i32", "scale": "fp32"}
        yield (_recurrent_fwd_kernel, rec_sig, dict(NFAC=n, BKF=128, BV=32, HAS_GATE=True, HAS_H0=True), 4, elem, {})
        if not with_backward:
            continue
        for has_dfinal in (False, True):
            for has_h0 in (False, True):
                yield (_state_bwd_kernel, sigs[_state_bwd_kernel],
                       dict(HAS_DFINAL=has_dfinal, HAS_H0=has_h0, **state_args), nw, elem,
                       {"maxnreg": cfg["BWD_MAXNREG"]})
        for gate in (False, True):
            yield (_local_bwd_kernel, sigs[_local_bwd_kernel], dict(HAS_GATE=gate, BC=cfg["BC"], **chunk_args), nw, elem,
                   {"maxnreg": cfg["MAXNREG"]})
