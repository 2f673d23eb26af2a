"""``linrec.diagonal_scan``: argument checks, backend dispatch and the ``torch.library`` ops.

Two custom ops carry the work so that ``torch.compile`` traces through them:

* ``linrec::diagonal_scan`` (a, x, initial_state?, cu_seqlens?, reverse, backend) -> h
* ``linrec::diagonal_scan_backward`` (a, h, grad_h, initial_state?, cu_seqlens?, reverse, backend)
  -> (grad_a, grad_x, grad_initial_state)

``a`` reaches the ops in its own broadcastable shape; the backward sums dL/da
over the broadcast dimensions in the accumulation dtype before casting.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._common import (COMPLEX_DTYPES, REAL_DTYPES, autocast_off, check_cu_seqlens, check_cu_seqlens_values,
                       check_same_device, check_shape, check_tensor, register_scan_autograd, resolve_backend)
from .chunked import diagonal_scan_chunked, diagonal_scan_chunked_backward
from .reference import diagonal_scan_reference

AVAILABLE_BACKENDS = ("triton", "cuda", "torch", "reference")


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sums a (B, T, D) gradient over the dimensions that ``shape`` broadcast along."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


@torch.library.custom_op("linrec::diagonal_scan", mutates_args=())
@autocast_off
def _diagonal_scan_op(a: Tensor, x: Tensor, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                      reverse: bool, backend: str) -> Tensor:
    check_cu_seqlens_values(cu_seqlens, x.shape[1])
    if backend == "triton":
        from linrec.kernels.diagonal import diagonal_scan_forward
        return diagonal_scan_forward(a, x, initial_state, cu_seqlens, reverse)
    if backend == "cuda":
        from .._cuda import diagonal_scan_forward as cuda_forward
        return cuda_forward(a, x, initial_state, cu_seqlens, reverse)
    if backend == "torch":
        return diagonal_scan_chunked(a, x, initial_state, cu_seqlens, reverse)
    return diagonal_scan_reference(a, x, initial_state, cu_seqlens, reverse)


@_diagonal_scan_op.register_fake
def _(a, x, initial_state, cu_seqlens, reverse, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("linrec::diagonal_scan_backward", mutates_args=())
@autocast_off
def _diagonal_scan_backward_op(a: Tensor, h: Tensor, grad_h: Tensor, initial_state: Optional[Tensor],
                               cu_seqlens: Optional[Tensor], reverse: bool, backend: str
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from linrec.kernels.diagonal import diagonal_scan_backward
        grad_a, grad_x, grad_h0 = diagonal_scan_backward(a, h, grad_h, initial_state, cu_seqlens, reverse, h.dtype)
    elif backend == "cuda":
        from .._cuda import diagonal_scan_backward as cuda_backward
        grad_a, grad_x, grad_h0 = cuda_backward(a, h, grad_h, initial_state, cu_seqlens, reverse, h.dtype)
    else:  # the reference and the chunked form share the chunked backward
        grad_a, grad_x, grad_h0 = diagonal_scan_chunked_backward(a, h, grad_h, initial_state, cu_seqlens, reverse)
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return _sum_to(grad_a, a.shape).to(a.dtype), grad_x.to(h.dtype), grad_h0.to(h0_dtype)


@_diagonal_scan_backward_op.register_fake
def _(a, h, grad_h, initial_state, cu_seqlens, reverse, backend):
    N = h.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0_dtype = initial_state.dtype if initial_state is not None else h.dtype
    return (torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(h),
            h.new_empty((N, h.shape[2]), dtype=h0_dtype))


register_scan_autograd(_diagonal_scan_op, torch.ops.linrec.diagonal_scan_backward)


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
    if backend == "cuda":
        from .._cuda import SUPPORTED_DTYPES, cuda_backend_unavailable_reason
        reason = cuda_backend_unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='cuda' is unavailable: {reason}; backend='triton' or 'torch' would run")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"backend='cuda' supports float32, bfloat16, float16 and complex64, got "
                             f"{str(x.dtype).replace('torch.', '')}; backend='triton' or 'torch' would run")
    return torch.ops.linrec.diagonal_scan(a, x, initial_state, cu_seqlens, reverse, backend)
