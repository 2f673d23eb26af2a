"""What a benchmark case is: points, implementations, ops, targets, and the rules that refuse a point.

Every op module (``bench/diagonal.py``, ``bench/householder.py``, ``bench/block_diagonal.py``)
describes its work as data:

* a :class:`Point` is one shape (a dict of sizes such as ``B, T, D``) in a named sweep;
* an :class:`Impl` is one way to compute the op (a linrec backend or a baseline); it turns a
  point's input tensors into a callable and may refuse a point with a one-line reason
  (:func:`cap_steps`, :func:`needs_cuda`, :func:`both` build such rules);
* an :class:`OpSpec` holds an op's inputs, implementations, sweeps, work model (``bytes_moved`` /
  ``flops``, used for GB/s and TFLOP/s) and :class:`Target` goals.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwdbwd")
# complex64 only where an op takes complex inputs (the diagonal scan); the other ops' points never list it.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "complex64": torch.complex64}
# Every size a point may have, in the order of the CSV columns and shape labels.
DIM_COLUMNS = ("B", "T", "D", "H", "K", "V", "n", "G", "b")


class Skip(Exception):
    """Raised by an implementation that cannot run a point; the message is the one-line reason.

    ``failed`` is True when the implementation tried and raised (an error, out of memory), as
    opposed to declining up front; the runner stops retrying an implementation that keeps failing.
    """

    def __init__(self, reason: str, failed: bool = False):
        super().__init__(reason)
        self.failed = failed


@dataclass
class Point:
    """One shape of one sweep.

    Attributes:
        sweep: the sweep's name (one plot per sweep), e.g. ``"seqlen"``.
        x_name: the size that varies along the sweep (the plot's x axis), e.g. ``"T"``.
        dims: every size of the point, e.g. ``{"B": 8, "T": 4096, "D": 512}``.
        modes / dtypes: what to run at this point (names from ``MODES`` / ``DTYPES``).
    """

    sweep: str
    x_name: str
    dims: Dict[str, int]
    modes: Sequence[str]
    dtypes: Sequence[str]

    @property
    def x_value(self) -> int:
        return self.dims[self.x_name]


@dataclass
class Impl:
    """One implementation of an op.

    Attributes:
        name: the label in the CSV, table and plots (``"linrec.triton"``, ``"torch_loop"``, ...).
        kind: ``"linrec"`` for the library's own backends, ``"baseline"`` otherwise.
        build: ``build(inputs, point, mode) -> (fn, leaves)``. ``inputs`` is the op's dict of
            canonical tensors (linrec layout, no grad). ``fn(*leaves)`` computes the op's main
            output from the (possibly re-laid-out) ``leaves``; the runner makes the leaves require
            grad for the backward modes. Layout changes happen here, outside the timed region.
            Raises :class:`Skip` with a reason when the point is out of reach.
        refuse: ``refuse(point, device) -> reason or None``: a cheap check that keeps slow
            Python loops (the reference, per-step loops) to the sizes where they finish.
    """

    name: str
    kind: str
    build: Callable[[Dict[str, Any], Point, str], Tuple[Callable[..., Any], List[torch.Tensor]]]
    refuse: Optional[Callable[[Point, torch.device], Optional[str]]] = None


@dataclass
class OpSpec:
    """Everything the runner needs to know about one op."""

    name: str                                   # "diagonal" | "householder" | "block-diagonal"
    make_inputs: Callable[[Point, torch.dtype, torch.device], Dict[str, Any]]
    impls: Callable[[torch.device], Tuple[List[Impl], List[str]]]  # (impls, skip notes)
    bytes_moved: Callable[[Point, str, torch.dtype], float]
    flops: Callable[[Point, str], Optional[float]]
    sweeps: Callable[[str, torch.device], List[Point]]  # preset -> points
    targets: Callable[[], List["Target"]] = lambda: []


@dataclass
class Target:
    """A goal from the issues, checked on the measured rows and printed after the sweep.

    ``kind == "speedup"``: ratio = time(baseline) / time(impl) at the matching points, goal a
    minimum (the worst point is the smallest ratio).
    ``kind == "time_ratio"``: ratio = time(impl) / time(baseline), goal a maximum (e.g. "within
    1.3x of the elementwise floor"; the worst point is the largest ratio).
    ``kind == "bandwidth"``: ratio = impl's fraction of the measured copy bandwidth.
    ``where(row)`` selects the rows (shape, mode, dtype) the target speaks about.
    ``baseline_mode``: when set, the baseline's rows are taken in this mode at the same shape and
    dtype (e.g. a forward+backward against a forward-only bound); ``where`` must select them too.
    """

    label: str
    kind: str
    impl: Sequence[str]                         # first one present is used (e.g. cuda, then triton)
    goal: float
    where: Callable[[Dict[str, Any]], bool]
    baseline: Sequence[str] = ()
    baseline_mode: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Refusal rules and probes for the op modules
# --------------------------------------------------------------------------------------------


def cap_steps(steps: Callable[[Point], int], *, cpu: int, cuda: int, what: str = "Python loop"
              ) -> Callable[[Point, torch.device], Optional[str]]:
    """A ``refuse`` rule: skip points whose sequential work ``steps(point)`` exceeds a cap.

    Per-step loops cost one or more kernel launches (or interpreter steps) per step, so past
    the cap they would dominate the run time of the whole sweep without telling anything new.
    """
    def refuse(point: Point, device: torch.device) -> Optional[str]:
        cap = cuda if device.type == "cuda" else cpu
        n = steps(point)
        return f"{what}: more than {cap} sequential steps" if n > cap else None

    return refuse


def needs_cuda(what: str) -> Callable[[Point, torch.device], Optional[str]]:
    """A ``refuse`` rule for GPU-only implementations (Triton and CUDA kernels, peer libraries)."""
    def refuse(point: Point, device: torch.device) -> Optional[str]:
        return None if device.type == "cuda" else f"{what} needs a CUDA device"

    return refuse


def both(*rules: Optional[Callable[[Point, torch.device], Optional[str]]]
         ) -> Callable[[Point, torch.device], Optional[str]]:
    """Combines ``refuse`` rules: the first reason wins."""
    def refuse(point: Point, device: torch.device) -> Optional[str]:
        for rule in rules:
            reason = rule(point, device) if rule is not None else None
            if reason:
                return reason
        return None

    return refuse


def optional_import(module: str) -> Tuple[Any, Optional[str]]:
    """Imports an optional peer library; returns (module, None) or (None, one-line reason)."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # ImportError, or a peer that fails at import on this machine
        return None, f"{module} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"


def probe_backend(run: Callable[[], Any], device: torch.device, backend: str, what: str) -> Optional[str]:
    """Runs a linrec op once on tiny tensors with ``backend``; returns why it cannot run, or None.

    GPU backends on a CPU device are refused without trying (under ``TRITON_INTERPRET=1`` they
    would crawl through the interpreter). A ``ValueError``/``TypeError`` from the op (the
    library's "this backend cannot run here / is not implemented" answer) becomes the reason;
    any other error is left for the per-case run to report.
    """
    if backend in ("cuda", "triton") and device.type != "cuda":
        return f"{what} backend {backend!r} needs a CUDA device"
    try:
        run()
    except (ValueError, TypeError) as exc:
        return f"{what} backend {backend!r}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
    except Exception:  # noqa: BLE001 - reported per case instead
        return None
    return None


LINREC_BACKENDS = ("cuda", "triton", "cpp", "torch", "reference")


def linrec_backend_impls(op: str, function: str, device: torch.device, probe: Callable[[str], Any],
                         build: Callable[[str], Callable[..., Any]],
                         reference_refuse: Callable[[Point, torch.device], Optional[str]]
                         ) -> Tuple[List[Impl], List[str]]:
    """One :class:`Impl` ``linrec.<backend>`` per backend of a linrec op that runs on ``device``, and a
    one-line note (prefixed with ``op``) per backend that does not.

    ``probe(backend)`` runs ``linrec.<function>`` once on tiny tensors (see :func:`probe_backend`);
    ``build(backend)`` is the implementation's ``build``; ``reference_refuse`` keeps the reference
    backend, a Python loop, to the sizes where it finishes.
    """
    impls: List[Impl] = []
    notes: List[str] = []
    for backend in LINREC_BACKENDS:
        why = probe_backend(lambda: probe(backend), device, backend, f"linrec.{function}")
        if why:
            notes.append(f"{op}: {why}")
            continue
        refuse = reference_refuse if backend == "reference" else None
        impls.append(Impl(f"linrec.{backend}", "linrec", build(backend), refuse))
    return impls, notes
