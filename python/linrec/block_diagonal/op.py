"""``linrec.block_diagonal_scan``: argument checks, backend dispatch and the ``torch.library`` ops.

Two custom ops carry the work so that ``torch.compile`` traces through them:

* ``linrec::block_diagonal_scan`` (A, x, initial_state?, cu_seqlens?, reverse, backend) -> h
* ``linrec::block_diagonal_scan_backward`` (A, initial_state?, h, grad_h, cu_seqlens?, reverse, backend)
  -> (grad_A, grad_x, grad_initial_state)

``A`` reaches the ops in its own broadcastable shape; the backward sums dL/dA
over the broadcast dimensions in the accumulation dtype before casting.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _cpp
from .._common import (REAL_DTYPES, accumulation_dtype, autocast_off, check_cu_seqlens, check_cu_seqlens_values,
                       check_same_device, check_shape, check_tensor, num_sequences, register_scan_autograd,
                       resolve_backend, settle_cpu_auto, sum_to_shape)
from .chunked import block_diagonal_scan_chunked, block_diagonal_scan_chunked_backward, grad_A_from, shift_in_time
from .reference import block_diagonal_scan_reference

# ----------------------------------------------------------------------------------------------
# Backends: name -> forward(A, x, initial_state, *, cu_seqlens, reverse) -> h, and
# name -> backward(A, h, grad_h, initial_state, *, cu_seqlens, reverse) -> (grad_A, grad_x,
# grad_initial_state) in the accumulation dtype. grad_A is full-size (B, T, G, b, b), already in
# A's shape, or None: then the op forms it from grad_x and the states by one einsum that sums
# over A's broadcast dimensions (a time-invariant A never gets a full-size gradient).
# ----------------------------------------------------------------------------------------------
def _triton_forward(A, x, initial_state, *, cu_seqlens, reverse):
    from linrec.kernels.block_diagonal import block_diagonal_scan_forward
    return block_diagonal_scan_forward(A, x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


def _triton_backward(A, h, grad_h, initial_state, *, cu_seqlens, reverse):
    from linrec.kernels.block_diagonal import block_diagonal_scan_backward
    return block_diagonal_scan_backward(A, h, grad_h, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


FORWARD = {"triton": _triton_forward, "cpp": _cpp.block_diagonal_scan_forward, "torch": block_diagonal_scan_chunked,
           "reference": block_diagonal_scan_reference}
# The reference's gradients come from the chunked backward (checked against autograd through the loop).
BACKWARD = {"triton": _triton_backward, "cpp": _cpp.block_diagonal_scan_backward, "torch": block_diagonal_scan_chunked_backward,
            "reference": block_diagonal_scan_chunked_backward}
AVAILABLE_BACKENDS = tuple(FORWARD)
MAX_BLOCK = 64


def _cpp_supports(x: Tensor) -> bool:
    """Whether the compiled CPU backend takes x (B, T, G, b): its dtypes and b <= 16."""
    return x.dtype in _cpp.BLOCK_DIAGONAL_DTYPES and x.shape[-1] <= _cpp.MAX_BLOCK


def broadcast_grad_A(A_shape: torch.Size, h: Tensor, grad_x: Tensor, initial_state: Optional[Tensor], *,
                     cu_seqlens: Optional[Tensor], reverse: bool) -> Tensor:
    """dL/dA_t = g_t h_{t-1}^T summed over A's broadcast dimensions, in the accumulation dtype.

    Args:
        A_shape: A's own (broadcastable) shape; h: (B, T, G, b) forward states;
        grad_x: (B, T, G, b) g = dL/dx; initial_state: (N, G, b) or None (zeros).
    """
    acc = accumulation_dtype(h.dtype)
    B, _, G, b = h.shape
    h0 = (initial_state.to(acc) if initial_state is not None
          else h.new_zeros((num_sequences(B, cu_seqlens), G, b), dtype=acc))
    h_prev = shift_in_time(h.to(acc), cu_seqlens, -1 if reverse else 1, h0)
    return grad_A_from(grad_x.to(acc), h_prev, A_shape)


@torch.library.custom_op("linrec::block_diagonal_scan", mutates_args=())
@autocast_off
def _block_diagonal_scan_op(A: Tensor, x: Tensor, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                            reverse: bool, backend: str) -> Tensor:
    check_cu_seqlens_values(cu_seqlens, x.shape[1])
    backend = settle_cpu_auto(backend, _cpp_supports(x))
    return FORWARD[backend](A, x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


@_block_diagonal_scan_op.register_fake
def _(A, x, initial_state, cu_seqlens, reverse, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("linrec::block_diagonal_scan_backward", mutates_args=())
@autocast_off
def _block_diagonal_scan_backward_op(A: Tensor, initial_state: Optional[Tensor], h: Tensor, grad_h: Tensor,
                                     cu_seqlens: Optional[Tensor], reverse: bool, backend: str
                                     ) -> Tuple[Tensor, Tensor, Tensor]:
    backend = settle_cpu_auto(backend, _cpp_supports(h))
    grad_A, grad_x, grad_h0 = BACKWARD[backend](A, h, grad_h, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)
    if grad_A is None:
        grad_A = broadcast_grad_A(A.shape, h, grad_x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return (sum_to_shape(grad_A, A.shape).to(A.dtype).contiguous(), grad_x.to(h.dtype).contiguous(),
            grad_h0.to(h0_dtype).contiguous())


@_block_diagonal_scan_backward_op.register_fake
def _(A, initial_state, h, grad_h, cu_seqlens, reverse, backend):
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return (torch.empty_like(A, memory_format=torch.contiguous_format),
            torch.empty_like(h, memory_format=torch.contiguous_format),
            h.new_empty((num_sequences(h.shape[0], cu_seqlens), h.shape[2], h.shape[3]), dtype=h0_dtype))


# Inputs (A, x, initial_state | cu_seqlens, reverse, backend); the backward needs A, initial_state and h.
register_scan_autograd(_block_diagonal_scan_op, torch.ops.linrec.block_diagonal_scan_backward, differentiable=3,
                       save_inputs=(0, 2), save_outputs=(0,))


def block_diagonal_scan(A: Tensor, x: Tensor, initial_state: Optional[Tensor] = None, *, reverse: bool = False,
                        cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Block-diagonal linear recurrence ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]`` over time (dim 1).

    Args:
        A: transitions, (B, T, G, b, b) or broadcastable to it, e.g. (G, b, b) for a
            time-invariant recurrence. Real, any float dtype; the last two dimensions
            are exactly (b, b) (no broadcasting inside a block). Singular blocks are fine.
        x: (B, T, G, b) float32 | bfloat16 | float16 (float64 for checks), block size 1 <= b <= 64.
        initial_state: (N, G, b) or None for zeros, with N = B, or N packed sequences.
        reverse: compute ``h_t = A_t @ h_{t+1} + x_t`` from t = T down to 1.
        cu_seqlens: (N + 1,) int32/int64 offsets of N sequences packed along T (B = 1), or None.
        backend: "auto" | "triton" | "torch" | "reference".

    Returns:
        h: (B, T, G, b) in x's dtype, every state; the final state is h[:, -1] (h[:, 0] if reverse).
        Accumulation is fp32 whatever the storage dtype (fp64 for fp64 inputs).
    """
    check_tensor("x", x, ndim=4, dtypes=REAL_DTYPES, shape_doc="(B, T, G, b)")
    B, T, G, b = x.shape
    if not 1 <= b <= MAX_BLOCK:
        raise ValueError(f"x's block size b (last dimension) must be in 1..{MAX_BLOCK}, got shape {tuple(x.shape)}")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor of shape (B, T, G, b, b) = {(B, T, G, b, b)} or broadcastable "
                        f"to it, got {type(A).__name__}")
    check_tensor("A", A, dtypes=REAL_DTYPES)
    if A.dim() < 2 or A.dim() > 5:
        raise ValueError(f"A must have 2 to 5 dimensions, (B, T, G, b, b) = {(B, T, G, b, b)} or broadcastable "
                         f"to it, got shape {tuple(A.shape)}")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A's blocks must be square (..., b, b), got shape {tuple(A.shape)}")
    if A.shape[-1] != b:
        raise ValueError(f"A's block size must match x's: A must have shape (..., b, b) = (..., {b}, {b}) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(A.shape)}")
    try:
        if torch.broadcast_shapes(A.shape[:-2], x.shape[:3]) != x.shape[:3]:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"A must have shape (B, T, G, b, b) = {(B, T, G, b, b)} or broadcast to it, "
                         f"got {tuple(A.shape)}") from None
    check_same_device("x", x, A=A, initial_state=initial_state)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    N = check_cu_seqlens(cu_seqlens, B, T, x.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=3, dtypes=REAL_DTYPES, shape_doc="(N, G, b)")
        check_shape("initial_state", initial_state, (N, G, b), "(N, G, b)")
    backend = resolve_backend(backend, x.device, available=AVAILABLE_BACKENDS)
    if backend == "cpp" and not _cpp_supports(x):
        raise ValueError(f"backend='cpp' supports float32, bfloat16 and float16 with blocks b <= {_cpp.MAX_BLOCK}, "
                         f"got {str(x.dtype).replace('torch.', '')} with b = {b}; backend='torch' would run")
    return torch.ops.linrec.block_diagonal_scan(A, x, initial_state, cu_seqlens, reverse, backend)
