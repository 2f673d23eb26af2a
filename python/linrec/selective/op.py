"""``linrec.selective_scan``: argument checks, backend tables and the ``torch.library`` ops.

Two custom ops carry the work so that ``torch.compile`` traces through them:

* ``linrec::selective_scan`` (x, delta, A, B, C, D?, z?, delta_bias?, initial_state?, cu_seqlens?,
  delta_softplus, reverse, negative_eigenvalues, backend) -> (y, final_state, checkpoints), the last
  the state entering every 256 steps of every sequence for the Triton backward (1/256 of the
  expanded state), an empty tensor from the other backends
* ``linrec::selective_scan_backward`` (x, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
  checkpoints?, grad_y, grad_final?, cu_seqlens?, delta_softplus, reverse, negative_eigenvalues,
  backend) -> one gradient per tensor input (x, delta, A, B, C, D, z, delta_bias, initial_state); absent optional inputs get
  empty tensors, which the autograd wrapper turns into None.

The ops always see B and C as (B, T, G, N); the public function adds the G = 1 axis to 3-D ones
(autograd drops it from the gradients again through ``unsqueeze``). The final state is always
computed (it costs one (N_seq, D, N) store) and returned only when asked for. The backward
recomputes the states (nothing of size (B, T, D, N) is saved): the forward saves its inputs and
the checkpoints.

Backends are table entries, ``FORWARD[name]`` and ``BACKWARD[name]``: the Triton kernels of
``linrec.kernels.selective``, the chunked torch form, and the sequential reference (whose backward
is the chunked form's explicit backward; the tests' gradient oracle is autograd through the
reference function itself).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._common import (REAL_DTYPES, accumulation_dtype, autocast_off, check_cu_seqlens, check_cu_seqlens_values,
                       check_same_device, check_shape, check_tensor, ignoring_saved, num_sequences,
                       register_scan_autograd, resolve_backend, unaliased, without_saved)
from .chunked import selective_scan_chunked, selective_scan_chunked_backward
from .reference import selective_scan_reference

# The largest state size N the Triton kernels take (a (BLOCK_D, N) tile per program in registers).
MAX_TRITON_STATE = 256


def _triton_forward(*args):
    from linrec.kernels.selective import selective_scan_forward
    return selective_scan_forward(*args, save_checkpoints=True)


def _triton_backward(*args, saved=None):
    from linrec.kernels.selective import selective_scan_backward
    return selective_scan_backward(*args, checkpoints=saved)


# The tables follow _common's convention for what a forward keeps (``without_saved``): here the
# Triton forward's checkpoints, the state entering every 256 steps; the other backends keep none.
# name -> f(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, cu_seqlens,
#           negative_eigenvalues) -> (y, final_state, checkpoints for the backward or None)
FORWARD: Dict[str, Callable] = {
    "reference": without_saved(selective_scan_reference),
    "torch": without_saved(selective_scan_chunked),
    "triton": _triton_forward,
}
# name -> f(same arguments, grad_y, grad_final, saved=checkpoints or None) -> [grad per tensor input, None
# for absent ones]
BACKWARD: Dict[str, Callable] = {
    "reference": ignoring_saved(selective_scan_chunked_backward),
    "torch": ignoring_saved(selective_scan_chunked_backward),
    "triton": _triton_backward,
}


def _checkpoint_shape(x: Tensor, A: Tensor, cu_seqlens: Optional[Tensor], backend: str) -> Tuple[int, ...]:
    """Shape of the forward's checkpoints output: (rows, D, N) for Triton (see
    ``linrec.kernels.selective.checkpoint_rows``), (0,) for the other backends (they save none)."""
    if backend != "triton":
        return (0,)
    from linrec.kernels.selective import checkpoint_rows
    N_seq = num_sequences(x.shape[0], cu_seqlens)
    return (checkpoint_rows(x.shape[0], x.shape[1], N_seq, cu_seqlens is not None), x.shape[2], A.shape[1])
AVAILABLE_BACKENDS = tuple(FORWARD)


@torch.library.custom_op("linrec::selective_scan", mutates_args=())
@autocast_off
def _selective_scan_op(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                       cu_seqlens: Optional[Tensor], delta_softplus: bool, reverse: bool,
                       negative_eigenvalues: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    check_cu_seqlens_values(cu_seqlens, x.shape[1])
    y, final, checkpoints = FORWARD[backend](x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                             reverse, cu_seqlens, negative_eigenvalues)
    acc = accumulation_dtype(x.dtype)
    if checkpoints is None:
        checkpoints = x.new_empty((0,), dtype=acc)
    y, final, checkpoints = unaliased([y.contiguous(), final.to(acc).contiguous(), checkpoints],
                                       (x, delta, A, B, C, D, z, delta_bias, initial_state))
    return y, final, checkpoints


@_selective_scan_op.register_fake
def _(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, reverse,
      negative_eigenvalues, backend):
    N_seq = num_sequences(x.shape[0], cu_seqlens)
    acc = accumulation_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((N_seq, x.shape[2], A.shape[1]), dtype=acc),
            x.new_empty(_checkpoint_shape(x, A, cu_seqlens, backend), dtype=acc))


@torch.library.custom_op("linrec::selective_scan_backward", mutates_args=())
@autocast_off
def _selective_scan_backward_op(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                                z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                                checkpoints: Optional[Tensor], grad_y: Optional[Tensor], grad_final: Optional[Tensor],
                                cu_seqlens: Optional[Tensor],
                                delta_softplus: bool, reverse: bool, negative_eigenvalues: bool, backend: str
                                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = (x, delta, A, B, C, D, z, delta_bias, initial_state)
    if grad_y is None:  # only the final state is used
        grad_y = torch.zeros_like(x)
    if checkpoints is not None and checkpoints.numel() == 0:
        checkpoints = None
    grads = BACKWARD[backend](x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse,
                              cu_seqlens, negative_eigenvalues, grad_y, grad_final, saved=checkpoints)
    out = [x.new_empty((0,)) if t is None else g.to(t.dtype).contiguous() for g, t in zip(grads, inputs)]
    return tuple(unaliased(out, inputs + (grad_y, grad_final)))


@_selective_scan_backward_op.register_fake
def _(x, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, grad_y, grad_final, cu_seqlens,
      delta_softplus, reverse, negative_eigenvalues, backend):
    return tuple(x.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, delta, A, B, C, D, z, delta_bias, initial_state))


# The backward recomputes the states from the inputs and the checkpoints (the Triton forward's state
# entering every 256 steps; an empty tensor from the other backends, not differentiable): it saves
# those, nothing else.
register_scan_autograd(_selective_scan_op, torch.ops.linrec.selective_scan_backward, differentiable=9,
                       save_inputs=range(9), save_outputs=(2,), non_differentiable_outputs=(2,))


def _check_bc(name: str, t, Bsz: int, T: int, D: int, N: int) -> Tensor:
    """B or C: (B, T, N) or (B, T, G, N) with G dividing D; returned 4-D."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, N) or (B, T, G, N), got {type(t).__name__}")
    check_tensor(name, t, dtypes=REAL_DTYPES)
    if t.dim() == 3:
        check_shape(name, t, (Bsz, T, N), "(B, T, N)")
        return t.unsqueeze(2)
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, T, N) = {(Bsz, T, N)} or (B, T, G, N) with G dividing "
                         f"D = {D}, got shape {tuple(t.shape)}")
    G = t.shape[2]
    if G < 1 or D % G:
        raise ValueError(f"{name} has G = {G} groups (shape {tuple(t.shape)}), but G must divide D = {D}")
    check_shape(name, t, (Bsz, T, G, N), "(B, T, G, N)")
    return t


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, *, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False, reverse: bool = False,
                   cu_seqlens: Optional[Tensor] = None, negative_eigenvalues: bool = False, backend: str = "auto"
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """Selective scan (Mamba's S6), mamba-ssm's ``selective_scan_fn`` in linrec's (B, T, ...) layout.

    Per channel d and state n, over time t (dim 1)::

        dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
        abar_t[d, n] = exp(dt_t[d] A[d, n])       (negative_eigenvalues: 2 abar - 1, in (-1, 1] for A <= 0)
        h_t[d, n] = abar_t[d, n] h_{t-1}[d, n] + dt_t[d] B_t[g(d), n] x_t[d]
        y_t[d] = sum_n C_t[g(d), n] h_t[d, n] + D[d] x_t[d];   y <- y * silu(z_t) when z is given

    with channel d reading group ``g(d) = d // (D / G)`` of B and C.

    Args:
        x: (B, T, D) float32 | bfloat16 | float16 (float64 for checks).
        delta: (B, T, D), any float dtype.
        A: (D, N), any float dtype; meant to be <= 0 (Mamba: A = -exp(A_log)). Positive entries are
            accepted and give growing states (abar > 1), computed like any other.
        B, C: (B, T, N), or grouped (B, T, G, N) with G dividing D; any float dtype.
        D: (D,) skip connection, or None. z: (B, T, D) gate, or None.
        delta_bias: (D,) or None. delta_softplus: apply softplus to delta + delta_bias.
        initial_state: (N_seq, D, N) or None (zeros); N_seq = B, or the number of packed sequences.
        output_final_state: also return the state after the last step of every sequence.
        reverse: run from t = T down to 1 (``h_t = abar_t h_{t+1} + ...``).
        cu_seqlens: (N_seq + 1,) int32/int64 offsets of sequences packed along T (B = 1), or None.
        negative_eigenvalues: abar -> 2 abar - 1 (Grazzi et al.: eigenvalues in [-1, 1] for state tracking).
        backend: "auto" | "triton" | "torch" | "reference". "triton" takes N <= 256.

    Returns:
        y: (B, T, D) in x's dtype;
        final_state: (N_seq, D, N) float32 (float64 for float64 x), or None unless output_final_state.
        Accumulation is fp32 whatever the storage dtypes. Differentiable in every tensor argument
        (x, delta, A, B, C, D, z, delta_bias, initial_state), and through final_state.
    """
    check_tensor("x", x, ndim=3, dtypes=REAL_DTYPES, shape_doc="(B, T, D)")
    Bsz, T, Dch = x.shape
    check_tensor("delta", delta, ndim=3, dtypes=REAL_DTYPES, shape_doc="(B, T, D)")
    check_shape("delta", delta, (Bsz, T, Dch), "(B, T, D)")
    check_tensor("A", A, ndim=2, dtypes=REAL_DTYPES, shape_doc="(D, N)")
    if A.shape[0] != Dch:
        raise ValueError(f"A must have shape (D, N) with D = {Dch} (x's last dimension), got {tuple(A.shape)}")
    N = A.shape[1]
    B = _check_bc("B", B, Bsz, T, Dch, N)
    C = _check_bc("C", C, Bsz, T, Dch, N)
    if B.shape[2] != C.shape[2]:
        raise ValueError(f"B and C must have the same number of groups G, got B {tuple(B.shape)} (G = {B.shape[2]}) "
                         f"and C {tuple(C.shape)} (G = {C.shape[2]}); give both as (B, T, N) or (B, T, G, N)")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=REAL_DTYPES, shape_doc="(D,)")
            check_shape(name, t, (Dch,), "(D,)")
    if z is not None:
        check_tensor("z", z, ndim=3, dtypes=REAL_DTYPES, shape_doc="(B, T, D)")
        check_shape("z", z, (Bsz, T, Dch), "(B, T, D)")
    check_same_device("x", x, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state)
    for name, flag in (("delta_softplus", delta_softplus), ("output_final_state", output_final_state),
                       ("reverse", reverse), ("negative_eigenvalues", negative_eigenvalues)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    N_seq = check_cu_seqlens(cu_seqlens, Bsz, T, x.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=3, dtypes=REAL_DTYPES, shape_doc="(N_seq, D, N)")
        check_shape("initial_state", initial_state, (N_seq, Dch, N), "(N_seq, D, N)")
    backend = resolve_backend(backend, x.device, available=AVAILABLE_BACKENDS)
    if backend == "triton" and N > MAX_TRITON_STATE:
        raise ValueError(f"backend='triton' takes a state size N <= {MAX_TRITON_STATE} (A's shape (D, N)), "
                         f"got N = {N}; backend='torch' would run")
    y, final, _ = torch.ops.linrec.selective_scan(x, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                                                  delta_softplus, reverse, negative_eigenvalues, backend)
    return y, (final if output_final_state else None)
