"""``linrec.householder_scan``: argument checks, backend dispatch and the ``torch.library`` ops.

Two custom ops carry the work so that ``torch.compile`` traces through them:

* ``linrec::householder_scan`` (q, k, v, beta, log_gate?, initial_state?, cu_seqlens?, scale?, backend)
  -> (o, final_state, saved)
* ``linrec::householder_scan_backward`` (q, k, v, beta, log_gate?, initial_state?, saved?, grad_o,
  grad_final_state?, cu_seqlens?, scale?, backend) -> (grad_q, grad_k, grad_v, grad_beta, grad_log_gate,
  grad_initial_state)

``saved`` is what a backend's forward keeps for its backward: for ``triton`` the chunk inverse
Tinv = (I + A)^{-1} of every chunk, (B, T * n, H, 64) in the inputs' bf16 / fp16 (fp32 for fp32
inputs), so that the backward skips K K^T and the blocked inverse; an empty tensor for the other
backends and the step-by-step decoding form. The backward recomputes it when given None or an
empty tensor.

The ops always see k as (B, T, n, H, K), v as (B, T, n, H, V) and beta as
(B, T, n, H); the public function adds the n = 1 axis for 4-D/3-D inputs and
drops it from the gradients again (autograd does that through ``unsqueeze``).
The final state is always computed (it costs nothing extra) and returned only
when asked for.

Backwards: ``triton`` runs the chunked backward kernels of ``linrec.kernels.householder``
(they recompute w and the chunk states from the forward's Tinv, then an adjoint state pass and
the chunk-local gradients); ``cpp`` (the compiled CPU backend, ``linrec._cpp``: one token and
one factor at a time, the backward replaying states from checkpoints; ``"auto"`` takes it on
the CPU for decoding, T <= 8, and for K <= 64) its own backward sweep; ``torch`` and
``reference`` differentiate their own forward,
recomputed inside the backward op, with ``torch.func.vjp`` (the reference's gradients are
thus autograd through the sequential loop, an independent oracle for the chunked forms).
Gradients of absent optional inputs come back as empty tensors that the autograd wiring
(``register_scan_autograd``, with ``saved`` a non-differentiable output) turns into None.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _cpp
from .._common import (HOUSEHOLDER_RECURRENT_MAX_T, REAL_DTYPES, accumulation_dtype, autocast_off, check_cu_seqlens,
                       check_cu_seqlens_values, check_same_device, check_shape, check_tensor, ignoring_saved,
                       num_sequences, register_scan_autograd, resolve_backend, settle_cpu_auto, unaliased,
                       without_saved)
from .chunked import householder_scan_chunked
from .recurrent import householder_scan_recurrent
from .reference import householder_scan_reference


# Log-gates below this are raised to it by the chunked backends (torch, triton). exp(-1e4)
# is exactly 0 even in float64, so the step is still a hard reset, but the cumulative
# log-gates stay finite: log_gate = -inf (what F.logsigmoid or log(0) give for a saturated
# gate) made G_i - G_m = -inf - (-inf) = NaN. The cumulative gates are float64, so the small
# gates after a raised reset keep their precision (|G| <= 64e4 per chunk: spacing 1e-10).
# The gradient is zero below the floor, as exp(log_gate) = 0 makes it in the reference.
LOG_GATE_FLOOR = -1e4


def _floor_log_gate(log_gate: Optional[Tensor]) -> Optional[Tensor]:
    return None if log_gate is None else log_gate.clamp(min=LOG_GATE_FLOOR)


# ----------------------------------------------------------------------------------------------
# Backends: name -> forward(q, k, v, beta, log_gate, initial_state, *, cu_seqlens, scale)
# -> (o, final_state, saved), and name -> backward(q, k, v, beta, log_gate, initial_state, grad_o,
# grad_final, *, cu_seqlens, scale, saved) -> the six gradients (None for absent inputs); ``saved``
# is what the forward keeps for the backward (_common's convention: ``without_saved`` /
# ``ignoring_saved`` for the backends that keep nothing), here the Triton chunk inverse. Forward
# passes of at most HOUSEHOLDER_RECURRENT_MAX_T tokens step through the recurrence (decoding:
# no chunk padding). The torch and reference backwards differentiate their own forward
# (recomputed) with torch.func.vjp: the reference's gradients are thus autograd through the
# sequential loop, an independent oracle for the chunked forms.
# ----------------------------------------------------------------------------------------------
def _torch_forward(q, k, v, beta, log_gate, initial_state, *, cu_seqlens, scale):
    form = householder_scan_recurrent if q.shape[1] <= HOUSEHOLDER_RECURRENT_MAX_T else householder_scan_chunked
    return form(q, k, v, beta, _floor_log_gate(log_gate), initial_state, cu_seqlens=cu_seqlens, scale=scale)


def _triton_forward(q, k, v, beta, log_gate, initial_state, *, cu_seqlens, scale):
    """The Triton forward: (o, final, saved), ``saved`` the chunk inverse Tinv
    (``linrec.kernels.householder.tinv_shape``) for the backward, or None (step-by-step decoding)."""
    from linrec.kernels.householder import householder_scan_forward, householder_scan_recurrent_forward
    if q.shape[1] <= HOUSEHOLDER_RECURRENT_MAX_T:
        o, final = householder_scan_recurrent_forward(q, k, v, beta, _floor_log_gate(log_gate), initial_state,
                                                      cu_seqlens=cu_seqlens, scale=scale)
        return o, final, None
    return householder_scan_forward(q, k, v, beta, _floor_log_gate(log_gate), initial_state, cu_seqlens=cu_seqlens,
                                    scale=scale, return_saved=True)


def _triton_backward(q, k, v, beta, log_gate, initial_state, grad_o, grad_final, *, cu_seqlens, scale, saved=None):
    from linrec.kernels.householder import householder_scan_backward
    grads = list(householder_scan_backward(q, k, v, beta, _floor_log_gate(log_gate), initial_state, grad_o,
                                           grad_final, cu_seqlens=cu_seqlens, scale=scale, tinv=saved))
    if log_gate is not None:  # the floor's derivative: zero below it
        grads[4] = torch.where(log_gate < LOG_GATE_FLOOR, 0.0, grads[4])
    return grads


def _vjp_backward(forward):
    """The backward of a forward form, by torch.func.vjp through its recomputation."""
    def backward(q, k, v, beta, log_gate, initial_state, grad_o, grad_final, *, cu_seqlens, scale):
        inputs = (q, k, v, beta, log_gate, initial_state)
        present = [i for i, t in enumerate(inputs) if t is not None]

        def run(*tensors):
            args = list(inputs)
            for i, t in zip(present, tensors):
                args[i] = t
            return forward(*args, cu_seqlens=cu_seqlens, scale=scale)

        (_, final), vjp = torch.func.vjp(run, *(inputs[i] for i in present))
        grads = [None] * len(inputs)
        for i, g in zip(present, vjp((grad_o, torch.zeros_like(final) if grad_final is None else grad_final))):
            grads[i] = g
        return grads

    return ignoring_saved(backward)


# The cpp kernels take the log-gates as they are (exp(-inf) = 0 is exact step by step); the chunked
# forms floor them (LOG_GATE_FLOOR).
FORWARD = {"triton": _triton_forward, "cpp": without_saved(_cpp.householder_scan_forward),
           "torch": without_saved(_torch_forward), "reference": without_saved(householder_scan_reference)}
BACKWARD = {"triton": _triton_backward, "cpp": ignoring_saved(_cpp.householder_scan_backward),
            "torch": _vjp_backward(_torch_forward), "reference": _vjp_backward(householder_scan_reference)}
AVAILABLE_BACKENDS = tuple(FORWARD)


def _resolve_scale(scale: Optional[float], q: Tensor) -> float:
    """The read-out scale; None means K ** -0.5. Resolved inside the op bodies, where K is a
    plain int even when ``torch.compile(dynamic=True)`` traces the caller with a symbolic K."""
    return q.shape[-1] ** -0.5 if scale is None else scale


@torch.library.custom_op("linrec::householder_scan", mutates_args=())
@autocast_off
def _householder_scan_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Optional[Tensor],
                         initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: Optional[float],
                         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(o, final_state, saved): ``saved`` is what the backend keeps for its backward (the Triton
    chunk inverse, ``_saved_like``), an empty tensor for the others; not differentiable."""
    check_cu_seqlens_values(cu_seqlens, q.shape[1])
    backend = settle_cpu_auto(backend, _cpp.householder_supports(q, k, v, beta, log_gate, initial_state, cu_seqlens))
    kwargs = dict(cu_seqlens=cu_seqlens, scale=_resolve_scale(scale, q))
    o, final, saved = FORWARD[backend](q, k, v, beta, log_gate, initial_state, **kwargs)
    # With T = 0 (or empty packed sequences) a backend may hand back the initial state itself;
    # custom-op outputs must not alias inputs.
    if initial_state is not None and final.untyped_storage().data_ptr() == \
            initial_state.untyped_storage().data_ptr():
        final = final.clone()
    return o.contiguous(), final.contiguous(), q.new_empty((0,)) if saved is None else saved


def _saved_like(q: Tensor, n: int, backend: str) -> Tensor:
    """The empty tensor shaped like what ``backend``'s forward saves for q (B, T, H, K) and n factors:
    the Triton chunked form's Tinv (``tinv_shape``, in ``_work_dtype``), nothing (shape (0,)) for the
    step-by-step form (T <= HOUSEHOLDER_RECURRENT_MAX_T) and the other backends."""
    B, T, H, _ = q.shape
    if backend != "triton" or T <= HOUSEHOLDER_RECURRENT_MAX_T:
        return q.new_empty((0,))
    from linrec.kernels.householder import _work_dtype, tinv_shape
    return q.new_empty(tinv_shape(B, T, n, H), dtype=_work_dtype(q.dtype))


@_householder_scan_op.register_fake
def _(q, k, v, beta, log_gate, initial_state, cu_seqlens, scale, backend):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_sequences(B, cu_seqlens)
    return (q.new_empty((B, T, H, V)), q.new_empty((N, H, K, V), dtype=accumulation_dtype(q.dtype)),
            _saved_like(q, k.shape[2], backend))


@torch.library.custom_op("linrec::householder_scan_backward", mutates_args=())
@autocast_off
def _householder_scan_backward_op(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Optional[Tensor],
                                  initial_state: Optional[Tensor], saved: Optional[Tensor], grad_o: Tensor,
                                  grad_final: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: Optional[float],
                                  backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The six gradients; ``saved``: the forward op's third output (recomputed when None or empty)."""
    backend = settle_cpu_auto(backend, _cpp.householder_supports(q, k, v, beta, log_gate, initial_state, grad_o,
                                                                 grad_final, cu_seqlens))
    inputs = (q, k, v, beta, log_gate, initial_state)
    grads = BACKWARD[backend](*inputs, grad_o, grad_final, cu_seqlens=cu_seqlens, scale=_resolve_scale(scale, q),
                              saved=None if saved is None or saved.numel() == 0 else saved)
    out = [q.new_empty((0,)) if t is None else torch.zeros_like(t) if g is None else g.to(t.dtype).contiguous()
           for g, t in zip(grads, inputs)]
    # A gradient may be an incoming one handed straight back (T = 0: dL/dh0 = dL/dfinal).
    return tuple(unaliased(out, (*inputs, grad_o, grad_final, saved)))


@_householder_scan_backward_op.register_fake
def _(q, k, v, beta, log_gate, initial_state, saved, grad_o, grad_final, cu_seqlens, scale, backend):
    return tuple(q.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (q, k, v, beta, log_gate, initial_state))


# Autograd: the six inputs and the forward's third output (what the backend saved, e.g. the Triton
# chunk inverse; not differentiable) go to the backward op with the gradients of o and final_state.
register_scan_autograd(_householder_scan_op, torch.ops.linrec.householder_scan_backward, differentiable=6,
                       save_inputs=range(6), save_outputs=(2,), non_differentiable_outputs=(2,))


def householder_scan(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Optional[Tensor] = None,
                     initial_state: Optional[Tensor] = None, *, scale: Optional[float] = None,
                     output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                     backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """Householder-product linear recurrence (DeltaNet, Gated DeltaNet, DeltaProduct, Gated DeltaProduct).

    Per head, the state S is a (K, V) matrix. Per token t, with n factors::

        S <- exp(log_gate_t) * S
        for j in 1..n:  S <- S - beta_tj k_tj (k_tj^T S) + beta_tj k_tj v_tj^T
        o_t = scale * S^T q_t

    i.e. the transition is alpha_t prod_j (I - beta_tj k_tj k_tj^T). With unit-norm keys
    and beta in [0, 2] its eigenvalues lie in [-1, 1] (beta > 1: negative eigenvalues).

    Args:
        q: (B, T, H, K) float32 | bfloat16 | float16 (float64 for checks).
        k: (B, T, n, H, K), or (B, T, H, K) meaning n = 1; q's dtype. Keys need not be normalised.
        v: (B, T, n, H, V), or (B, T, H, V) when n = 1; q's dtype.
        beta: (B, T, n, H), or (B, T, H) when n = 1; any float dtype; meant to lie in [0, 2].
        log_gate: (B, T, H) or None (alpha = 1); any float dtype.
        initial_state: (N, H, K, V) or None (zeros); N = B, or the number of packed sequences.
        scale: read-out scale, default K ** -0.5.
        output_final_state: also return the state after the last token of every sequence.
        cu_seqlens: (N + 1,) int32/int64 offsets of N sequences packed along T (B = 1), or None.
        backend: "auto" | "triton" | "cpp" | "torch" | "reference" ("auto": Triton on CUDA; on the CPU
            the compiled cpp kernels for decoding (T <= 8) and K <= 64 where they build, else torch).

    Returns:
        o: (B, T, H, V) in q's dtype;
        final_state: (N, H, K, V) float32 (float64 for float64 q), or None unless output_final_state.
        Differentiable in q, k, v, beta, log_gate and initial_state (and through final_state).
    """
    check_tensor("q", q, ndim=4, dtypes=REAL_DTYPES, shape_doc="(B, T, H, K)")
    B, T, H, K = q.shape
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a torch.Tensor of shape (B, T, n, H, K) or (B, T, H, K), got {type(k).__name__}")
    if k.dim() == 4:
        check_shape("k", k, (B, T, H, K), "(B, T, H, K) (n = 1)")
        k = k.unsqueeze(2)
    elif k.dim() == 5:
        check_shape("k", k, (B, T, k.shape[2], H, K), "(B, T, n, H, K)")
    else:
        raise ValueError(f"k must have shape (B, T, n, H, K) or (B, T, H, K) = {(B, T, H, K)}, "
                         f"got shape {tuple(k.shape)}")
    check_tensor("k", k, dtypes=(q.dtype,))
    n = k.shape[2]
    if n < 1:
        raise ValueError(f"k must have n >= 1 factors per token, got shape {tuple(k.shape)}")
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor of shape (B, T, n, H, V), got {type(v).__name__}")
    if v.dim() == 4:
        if n != 1:
            raise ValueError(f"v is 4-D (B, T, H, V) which means n = 1, but k has n = {n} factors per token: "
                             f"v must have shape (B, T, n, H, V) = {(B, T, n, H) + (v.shape[-1],)}, "
                             f"got {tuple(v.shape)}")
        check_shape("v", v, (B, T, H, v.shape[-1]), "(B, T, H, V)")
        v = v.unsqueeze(2)
    elif v.dim() == 5:
        if v.shape[2] != n:
            raise ValueError(f"v has n = {v.shape[2]} factors per token but k has n = {n}: v must have shape "
                             f"(B, T, n, H, V) = {(B, T, n, H, v.shape[-1])}, got {tuple(v.shape)}")
        check_shape("v", v, (B, T, n, H, v.shape[-1]), "(B, T, n, H, V)")
    else:
        raise ValueError(f"v must have shape (B, T, n, H, V) or (B, T, H, V), got shape {tuple(v.shape)}")
    check_tensor("v", v, dtypes=(q.dtype,))
    V = v.shape[-1]
    if K == 0 or V == 0:
        raise ValueError(f"head dimensions must be positive, got K = {K} (q, k) and V = {V} (v)")
    if not isinstance(beta, Tensor):
        raise TypeError(f"beta must be a torch.Tensor of shape (B, T, n, H), got {type(beta).__name__}")
    check_tensor("beta", beta, dtypes=REAL_DTYPES)
    if beta.dim() == 3:
        if n != 1:
            raise ValueError(f"beta is 3-D (B, T, H) which means n = 1, but k has n = {n} factors per token: "
                             f"beta must have shape (B, T, n, H) = {(B, T, n, H)}, got {tuple(beta.shape)}")
        check_shape("beta", beta, (B, T, H), "(B, T, H)")
        beta = beta.unsqueeze(2)
    elif beta.dim() == 4:
        if beta.shape[2] != n:
            raise ValueError(f"beta has n = {beta.shape[2]} factors per token but k has n = {n}: beta must have "
                             f"shape (B, T, n, H) = {(B, T, n, H)}, got {tuple(beta.shape)}")
        check_shape("beta", beta, (B, T, n, H), "(B, T, n, H)")
    else:
        raise ValueError(f"beta must have shape (B, T, n, H) or (B, T, H), got shape {tuple(beta.shape)}")
    if log_gate is not None:
        check_tensor("log_gate", log_gate, ndim=3, dtypes=REAL_DTYPES, shape_doc="(B, T, H)")
        check_shape("log_gate", log_gate, (B, T, H), "(B, T, H)")
    check_same_device("q", q, k=k, v=v, beta=beta, log_gate=log_gate, initial_state=initial_state)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=REAL_DTYPES, shape_doc="(N, H, K, V)")
        check_shape("initial_state", initial_state, (N, H, K, V), "(N, H, K, V)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(float(scale))):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    backend = resolve_backend(backend, q.device, available=AVAILABLE_BACKENDS)
    if backend == "cpp" and q.dtype not in _cpp.HOUSEHOLDER_DTYPES:
        raise ValueError(f"backend='cpp' supports float32, bfloat16 and float16, got "
                         f"{str(q.dtype).replace('torch.', '')}; backend='torch' would run")
    o, final, _ = torch.ops.linrec.householder_scan(q, k, v, beta, log_gate, initial_state, cu_seqlens,
                                                    None if scale is None else float(scale), backend)
    return o, (final if output_final_state else None)
