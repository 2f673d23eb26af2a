"""``linrec.diagonal_scan``: argument checks, backend dispatch and the ``torch.library`` ops.

Two custom ops carry the work so that ``torch.compile`` traces through them:

* ``linrec::diagonal_scan`` (a, x, initial_state?, cu_seqlens?, reverse, backend) -> h
* ``linrec::diagonal_scan_backward`` (a, initial_state?, h, grad_h, cu_seqlens?, reverse, backend)
  -> (grad_a, grad_x, grad_initial_state)

``a`` reaches the ops in its own broadcastable shape; the backward sums dL/da
over the broadcast dimensions in the accumulation dtype before casting.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _cpp
from .._common import (COMPLEX_DTYPES, REAL_DTYPES, autocast_off, check_cu_seqlens, check_cu_seqlens_values,
                       check_same_device, check_shape, check_tensor, num_sequences, register_scan_autograd,
                       resolve_backend, settle_cpu_auto, sum_to_shape)
from .chunked import diagonal_scan_chunked, diagonal_scan_chunked_backward
from .reference import diagonal_scan_reference

# ----------------------------------------------------------------------------------------------
# Backends: name -> forward(a, x, initial_state, *, cu_seqlens, reverse) -> h, and
# name -> backward(a, h, grad_h, initial_state, *, cu_seqlens, reverse) -> (grad_a, grad_x,
# grad_initial_state) in the accumulation dtype, grad_a full-size or already in a's shape.
# The Triton and CUDA modules are imported on first use only.
# ----------------------------------------------------------------------------------------------
def _triton_forward(a, x, initial_state, *, cu_seqlens, reverse):
    from linrec.kernels.diagonal import diagonal_scan_forward
    return diagonal_scan_forward(a, x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


def _triton_backward(a, h, grad_h, initial_state, *, cu_seqlens, reverse):
    from linrec.kernels.diagonal import diagonal_scan_backward
    return diagonal_scan_backward(a, h, grad_h, initial_state, cu_seqlens=cu_seqlens, reverse=reverse,
                                  x_dtype=h.dtype)


def _cuda_forward(a, x, initial_state, *, cu_seqlens, reverse):
    from .._cuda import diagonal_scan_forward
    return diagonal_scan_forward(a, x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


def _cuda_backward(a, h, grad_h, initial_state, *, cu_seqlens, reverse):
    from .._cuda import diagonal_scan_backward
    return diagonal_scan_backward(a, h, grad_h, initial_state, cu_seqlens=cu_seqlens, reverse=reverse,
                                  x_dtype=h.dtype)


FORWARD = {"triton": _triton_forward, "cuda": _cuda_forward, "cpp": _cpp.diagonal_scan_forward,
           "torch": diagonal_scan_chunked, "reference": diagonal_scan_reference}
# The reference's gradients come from the chunked backward (the reference is the forward oracle;
# the tests check every backward against autograd through the float64 reference loop).
BACKWARD = {"triton": _triton_backward, "cuda": _cuda_backward, "cpp": _cpp.diagonal_scan_backward,
            "torch": diagonal_scan_chunked_backward, "reference": diagonal_scan_chunked_backward}
AVAILABLE_BACKENDS = tuple(FORWARD)


@torch.library.custom_op("linrec::diagonal_scan", mutates_args=())
@autocast_off
def _diagonal_scan_op(a: Tensor, x: Tensor, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                      reverse: bool, backend: str) -> Tensor:
    check_cu_seqlens_values(cu_seqlens, x.shape[1])
    backend = settle_cpu_auto(backend, x.dtype in _cpp.SUPPORTED_DTYPES)
    return FORWARD[backend](a, x, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)


@_diagonal_scan_op.register_fake
def _(a, x, initial_state, cu_seqlens, reverse, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("linrec::diagonal_scan_backward", mutates_args=())
@autocast_off
def _diagonal_scan_backward_op(a: Tensor, initial_state: Optional[Tensor], h: Tensor, grad_h: Tensor,
                               cu_seqlens: Optional[Tensor], reverse: bool, backend: str
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    backend = settle_cpu_auto(backend, h.dtype in _cpp.SUPPORTED_DTYPES)
    grad_a, grad_x, grad_h0 = BACKWARD[backend](a, h, grad_h, initial_state, cu_seqlens=cu_seqlens, reverse=reverse)
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return sum_to_shape(grad_a, a.shape).to(a.dtype), grad_x.to(h.dtype), grad_h0.to(h0_dtype)


@_diagonal_scan_backward_op.register_fake
def _(a, initial_state, h, grad_h, cu_seqlens, reverse, backend):
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return (torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(h),
            h.new_empty((num_sequences(h.shape[0], cu_seqlens), h.shape[2]), dtype=h0_dtype))


# Inputs (a, x, initial_state | cu_seqlens, reverse, backend); the backward needs a, initial_state and h.
register_scan_autograd(_diagonal_scan_op, torch.ops.linrec.diagonal_scan_backward, differentiable=3,
                       save_inputs=(0, 2), save_outputs=(0,))


def diagonal_scan(a: Tensor, x: Tensor, initial_state: Optional[Tensor] = None, *, reverse: bool = False,
                  cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Diagonal linear recurrence ``h_t = a_t * h_{t-1} + x_t`` over time (dim 1).

    Args:
        a: coefficients, (B, T, D) or broadcastable to it, e.g. (D,) for a time-invariant
            recurrence (LRU, S4D). Real for real x (any float dtype), complex for complex x.
            Values may be negative or zero (a reset).
        x: (B, T, D) float32 | bfloat16 | float16 | complex64 (float64 / complex128 for checks).
        initial_state: (N, D) or None for zeros, with N = B, or N packed sequences.
        reverse: compute ``h_t = a_t * h_{t+1} + x_t`` from t = T down to 1.
        cu_seqlens: (N + 1,) int32/int64 offsets of N sequences packed along T (B = 1), or None.
        backend: "auto" | "triton" | "cuda" | "torch" | "reference". "cuda" JIT-compiles csrc/ on
            first use (float32 / bfloat16 / float16 / complex64; see linrec._cuda).

    Returns:
        h: (B, T, D) in x's dtype, every state; the final state is h[:, -1] (h[:, 0] if reverse).
        Accumulation is fp32 (complex64) whatever the storage dtype.
    """
    check_tensor("x", x, ndim=3, dtypes=REAL_DTYPES + COMPLEX_DTYPES, shape_doc="(B, T, D)")
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"a must be a torch.Tensor broadcastable to x's shape {tuple(x.shape)}, got {type(a).__name__}")
    if x.is_complex():
        check_tensor("a", a, dtypes=COMPLEX_DTYPES)
    else:
        check_tensor("a", a, dtypes=REAL_DTYPES)
    if a.dim() > 3:
        raise ValueError(f"a must have at most 3 dimensions (B, T, D), got shape {tuple(a.shape)}")
    try:
        if torch.broadcast_shapes(a.shape, x.shape) != x.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"a must have shape (B, T, D) = {tuple(x.shape)} or broadcast to it, "
                         f"got {tuple(a.shape)}") from None
    check_same_device("x", x, a=a, initial_state=initial_state)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
    B, T, D = x.shape
    N = check_cu_seqlens(cu_seqlens, B, T, x.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=2, dtypes=REAL_DTYPES + COMPLEX_DTYPES, shape_doc="(N, D)")
        check_shape("initial_state", initial_state, (N, D), "(N, D)")
        if initial_state.is_complex() != x.is_complex():
            raise TypeError(f"initial_state must be {'complex' if x.is_complex() else 'real'} like x, "
                            f"got {initial_state.dtype}")
    backend = resolve_backend(backend, x.device, available=AVAILABLE_BACKENDS)
    if backend == "cpp" and x.dtype not in _cpp.SUPPORTED_DTYPES:
        raise ValueError(f"backend='cpp' supports float32, bfloat16, float16 and complex64, got "
                         f"{str(x.dtype).replace('torch.', '')}; backend='torch' would run")
    if backend == "cuda":
        from .._cuda import SUPPORTED_DTYPES, cuda_backend_unavailable_reason
        reason = cuda_backend_unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='cuda' is unavailable: {reason}; backend='triton' or 'torch' would run")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"backend='cuda' supports float32, bfloat16, float16 and complex64, got "
                             f"{str(x.dtype).replace('torch.', '')}; backend='triton' or 'torch' would run")
    return torch.ops.linrec.diagonal_scan(a, x, initial_state, cu_seqlens, reverse, backend)
