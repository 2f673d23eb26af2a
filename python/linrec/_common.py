"""Checks and backend selection shared by the three scan families.

Every public op validates its arguments here before any kernel runs, so that a
bad call fails with a ``ValueError``/``TypeError`` that names the argument, the
shape or dtype it got, and what it needs (docs/design.md §9, Bad input).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch", "reference")

REAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def triton_interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = (),
                 shape_doc: str = "") -> torch.Tensor:
    """Checks that ``t`` is a tensor of the given rank and one of the allowed dtypes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape_doc and ' of shape ' + shape_doc}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {shape_doc}, got shape {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share one device")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], doc: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {doc} = {tuple(expected)}, got {tuple(t.shape)}")


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch: int, seqlen: int, device: torch.device) -> int:
    """Validates packed-sequence boundaries and returns the number of sequences N.

    ``cu_seqlens`` is a 1-D integer tensor ``[0, l_1, l_1 + l_2, ..., T]`` of N + 1
    offsets into the time axis of a batch with B = 1. Without it, N = B. The offsets'
    values are checked by ``check_cu_seqlens_values`` inside the custom ops.
    """
    if cu_seqlens is None:
        return batch
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32/int64 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {str(cu_seqlens.dtype).replace('torch.', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B = 1, got B = {batch}")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens_values(cu_seqlens: Optional[torch.Tensor], seqlen: int) -> None:
    """Checks the offsets themselves: ``0 = o_0 <= o_1 <= ... <= o_N = T``.

    Called inside the custom ops' bodies, which run eagerly even in a ``torch.compile``d
    graph: so compiled calls are checked like eager ones, and no backend ever leaves part
    of its output unwritten (uninitialised memory) because of bad offsets. Costs one
    device-to-host copy of the N + 1 offsets.
    """
    if cu_seqlens is None:
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at the sequence length T = {seqlen}, got {offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")


def autocast_off(op_body: Callable) -> Callable:
    """Runs a custom op's body with autocast disabled on its tensors' device.

    Without this, ``torch.autocast`` reaches inside the op (the dispatcher falls through
    to the body with autocast still on) and its matmuls silently run in bf16, or ``out=``
    calls fail on a dtype mismatch. The ops accumulate in fp32 whatever the storage
    dtype, so under autocast fp32 inputs are computed in fp32 and bf16 ones in bf16
    storage with fp32 accumulation, exactly as without it.
    """
    @functools.wraps(op_body)
    def body(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device.type, enabled=False):
            return op_body(*args, **kwargs)

    # torch.library infers the op's schema from the annotations; resolve them in the
    # body's own module (they are strings under ``from __future__ import annotations``).
    body.__signature__ = inspect.signature(op_body, eval_str=True)
    return body


def resolve_backend(backend: str, device: torch.device, *, available: Sequence[str]) -> str:
    """Turns the user's ``backend`` into one that can run on ``device``.

    ``available`` lists the backends the family implements. ``"auto"`` takes the
    fastest correct one: Triton on CUDA tensors; on the CPU the compiled ``cpp`` backend
    where the family has one, else the chunked PyTorch form. Whether ``cpp`` can run (a C++
    compiler, a build) is only known by trying, so for those families ``"auto"`` stays
    ``"auto"`` here and the op body settles it (``settle_cpu_auto``): that runs eagerly even
    under ``torch.compile``, which cannot trace a compiler probe.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in available and triton_importable():
            return "triton"
        return "auto" if device.type == "cpu" and "cpp" in available else "torch"
    if backend not in available:
        runnable = [b for b in available if b in ("torch", "reference", "cpp") or device.type == "cuda"]
        raise ValueError(f"backend={backend!r} is not implemented for this op; available here: {runnable}")
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package, which is not installed; "
                             "use backend='torch' (or pip install triton)")
        if device.type != "cuda" and not triton_interpreter_on():
            raise ValueError(f"backend='triton' cannot run on {device.type} tensors: Triton kernels need a CUDA "
                             "device (or TRITON_INTERPRET=1 for the slow CPU interpreter); use backend='torch' "
                             "or 'reference' on the CPU")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got {device.type} tensors; "
                         "backend='triton' or 'torch' would run")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got {device.type} tensors; "
                         "use backend='torch' or 'reference' on the CPU")
    return backend


_cpu_fallback_noted = False


def settle_cpu_auto(backend: str, cpp_supports: bool) -> str:
    """Inside an op body: ``"auto"`` on the CPU becomes ``"cpp"`` where the compiled CPU backend
    supports the call (dtype, block size) and builds, else ``"torch"``; any other backend is
    returned as it is. The first call in a process may build the extension (a one-line
    message, then cached). Without a C++ compiler, or when the build fails, the torch backend
    runs and one line on stderr says why (once per process; not when LINREC_DISABLE_CPP is set).
    """
    global _cpu_fallback_noted
    if backend != "auto":
        return backend
    if not cpp_supports:
        return "torch"
    from . import _cpp

    reason = _cpp.cpp_backend_unavailable_reason()
    if reason is None:
        try:
            _cpp.load_extension()
            return "cpp"
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0]
    if not _cpu_fallback_noted and not reason.startswith("LINREC_DISABLE_CPP"):
        _cpu_fallback_noted = True
        print(f"linrec: the compiled CPU backend is unavailable ({reason}); backend='auto' runs the torch "
              "backend", file=sys.stderr)
    return "torch"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 (complex64) accumulation for every storage dtype, fp64 kept for the oracle."""
    if dtype in (torch.float64, torch.complex128):
        return dtype
    if dtype.is_complex:
        return torch.complex64
    return torch.float32


def register_scan_autograd(scan_op, backward_op, *, differentiable: int, save_inputs: Sequence[int],
                           save_outputs: Sequence[int] = (), non_differentiable_outputs: Sequence[int] = ()) -> None:
    """Wires the autograd of a scan custom op to its backward custom op; every family uses it.

    ``scan_op``'s arguments are first the ``differentiable`` tensors that get gradients (the
    optional ones may be None), then the rest (``cu_seqlens``, flags, the backend name),
    which the backward receives unchanged. The backward op is called as::

        backward_op(*inputs[save_inputs], *outputs[save_outputs], *grad_outputs, *rest)

    and returns one gradient per differentiable argument (anything, e.g. an empty tensor,
    where that argument is None: autograd gets None there). The backward is a custom op
    of its own, so that ``torch.compile`` sees it as one opaque call. Outputs listed in
    ``non_differentiable_outputs`` (what a backend keeps for its backward, e.g. the Householder
    chunk inverse) are marked so, and their gradients are left out of ``grad_outputs``.
    """
    dropped = frozenset(non_differentiable_outputs)

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if dropped:
            ctx.mark_non_differentiable(*[outputs[i] for i in sorted(dropped)])
        rest = inputs[differentiable:]
        saved = [inputs[i] for i in save_inputs] + [outputs[i] for i in save_outputs]
        ctx.present = [t is not None for t in inputs[:differentiable]]
        ctx.num_saved = len(saved)
        # Tensors among the rest (cu_seqlens) go through save_for_backward like the others.
        ctx.rest_is_tensor = [isinstance(r, torch.Tensor) for r in rest]
        ctx.rest_values = [None if is_tensor else r for r, is_tensor in zip(rest, ctx.rest_is_tensor)]
        ctx.save_for_backward(*saved, *[r for r in rest if isinstance(r, torch.Tensor)])

    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        saved, rest_tensors = tensors[:ctx.num_saved], iter(tensors[ctx.num_saved:])
        rest = [next(rest_tensors) if is_tensor else value
                for is_tensor, value in zip(ctx.rest_is_tensor, ctx.rest_values)]
        grad_outputs = [g for i, g in enumerate(grad_outputs) if i not in dropped]
        grads = backward_op(*saved, *grad_outputs, *rest)
        return tuple(g if present else None for g, present in zip(grads, ctx.present)) + (None,) * len(rest)

    scan_op.register_autograd(backward, setup_context=setup_context)


# Backend tables and what a forward keeps for its backward. A family's backends are entries of two
# tables, FORWARD[name] and BACKWARD[name], with one signature per table whatever the backend. Where
# some backend's backward reuses something its forward computed (the Triton Householder chunk
# inverse, the Triton selective scan's state checkpoints), every FORWARD entry returns the op's
# outputs followed by ``saved`` (a tensor, or None when that backend keeps nothing), and every
# BACKWARD entry takes ``saved=`` (None: recompute whatever it needs). The op returns ``saved`` as a
# non-differentiable output (an empty tensor for None) and hands it to the backward op
# (``register_scan_autograd``'s ``save_outputs``). Backends that keep nothing are wrapped:


def without_saved(forward: Callable) -> Callable:
    """A forward that keeps nothing for its backward, in the tables' convention: it returns its own
    outputs (a tuple) followed by ``saved = None``."""
    def run(*args, **kwargs):
        return (*forward(*args, **kwargs), None)
    run.__name__ = getattr(forward, "__name__", "forward")
    return run


def ignoring_saved(backward: Callable) -> Callable:
    """A backward that recomputes what it needs, in the tables' convention: it takes ``saved=``
    (what a forward kept, or None) and ignores it."""
    def run(*args, saved: Optional[torch.Tensor] = None, **kwargs):
        return backward(*args, **kwargs)
    run.__name__ = getattr(backward, "__name__", "backward")
    return run


def unaliased(outputs: Sequence[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """A custom op's outputs, each cloned where it would alias one of the inputs or an earlier output
    (``torch.library`` forbids both; a backend may hand an incoming tensor straight back, e.g. with
    T = 0 dL/dh0 = dL/dfinal). Empty tensors own no memory and are never cloned."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel() > 0}
    result = []
    for t in outputs:
        if t.numel() > 0 and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        if t.numel() > 0:
            taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


def num_sequences(batch: int, cu_seqlens: Optional[torch.Tensor]) -> int:
    """N: the number of sequences, B without ``cu_seqlens``, else its length - 1."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def sum_to_shape(grad: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sums a full-size gradient over the dimensions along which an argument of ``shape``
    was broadcast (leading dimensions it lacks, and its size-1 dimensions); a gradient
    already of that shape is returned as it is."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


# ----------------------------------------------------------------------------------------------
# Constants shared by a family's torch forms and its Triton kernels (defined once, here).
# ----------------------------------------------------------------------------------------------

# Householder: sub-steps (tokens x factors) per chunk of the chunked WY form, and the longest
# forward pass (in tokens per sequence) that steps through the recurrence instead (decoding).
HOUSEHOLDER_SUBSTEPS_PER_CHUNK = 64
HOUSEHOLDER_RECURRENT_MAX_T = 8
