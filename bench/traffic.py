"""Memory traffic of linrec's Triton launchers, counted on the CPU under the Triton interpreter.

``python -m bench.traffic`` runs each op's forward and backward custom op (``torch.ops.linrec.*``
with ``backend="triton"``) once under the interpreter, with the launch plan of the GPU named by
``LINREC_DEVICE_MODEL`` (default ``h100``: tiles, warps, segments or chunks and grids as that
GPU would run them), and counts:

* per kernel launch, the DISTINCT bytes it loads and the DISTINCT bytes it stores: the
  interpreter's masked load / store (and atomics) are hooked, the addresses of the live lanes
  collected, and ``unique addresses x element size`` summed per launch (a byte loaded by many
  programs of one launch, or many times by one program, counts once: the ideal of a cache that
  keeps everything one launch touches; a second launch reading it again counts it again);
* every PyTorch op run around the kernels (zero-fills, casts, ``cat``, reductions, copies), by a
  ``TorchDispatchMode``: the elements of its tensor inputs read and of its outputs written
  (views and bare allocations move nothing and are not counted);
* the programs launched (grid sizes).

The minimum is the family's: every tensor argument of the op read once and every output written
once (diagonal forward: read a, x, write h; backward: read a, h, dh, write da, dx, dh0;
block-diagonal with A of b x b per block and step; Householder: read q, k, v, beta (, gate),
write o and the final state; backward read them and do, write their gradients; selective (Mamba):
read x, delta, z, A, B, C, D, delta_bias, write y and the final state; backward read them and dy,
write their gradients; the checkpoints its forward saves for the backward are not in the minimum). ``ratio`` is
measured / minimum, so 1.00 is a single pass; ``minimum / measured`` bounds the fraction of copy
bandwidth the op can reach.

The interpreter is slow (its ``associative_scan`` calls the combine function once per element,
which the meter replaces by the same sequential fold run a row at a time), so the preset runs
shapes scaled down from the GPU targets such that the plan has the same structure (the same
passes and segment or chunk counts; see ``CASES``). Results go to
``bench/results/traffic.csv`` (with command, device model, versions and git SHA) and
``bench/results/traffic.md``.
"""

from __future__ import annotations

import os

# The interpreter must be chosen before any @triton.jit kernel is defined (linrec's kernels are
# defined when linrec.kernels.* is first imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import datetime as _dt  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


class _Distinct:
    """Distinct addresses touched, per element size, compacted as they accumulate."""

    _COMPACT_AT = 1 << 22

    def __init__(self):
        self._parts: Dict[int, List[np.ndarray]] = {}
        self._pending = 0

    def add(self, addrs: np.ndarray, elsize: int) -> None:
        if addrs.size == 0:
            return
        self._parts.setdefault(elsize, []).append(addrs.astype(np.uint64, copy=False).ravel())
        self._pending += addrs.size
        if self._pending >= self._COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        for size, parts in self._parts.items():
            if len(parts) > 1:
                self._parts[size] = [np.unique(np.concatenate(parts))]
            elif parts:
                self._parts[size] = [np.unique(parts[0])]
        self._pending = 0

    def by_size(self) -> Dict[int, np.ndarray]:
        """Element size -> sorted unique addresses."""
        self._compact()
        return {size: parts[0] for size, parts in self._parts.items() if parts}

    def nbytes(self) -> int:
        return sum(int(a.size) * size for size, a in self.by_size().items())


@dataclass
class Launch:
    """One kernel launch: distinct bytes loaded and stored, per kernel argument too."""

    kernel: str
    grid: Tuple[int, int, int] = (1, 1, 1)
    load_bytes: int = 0
    store_bytes: int = 0
    by_arg: Dict[str, List[int]] = field(default_factory=dict)  # name -> [loaded, stored]
    meta: Dict[str, Any] = field(default_factory=dict)  # keyword launch settings: tiles, flags, num_warps

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class TorchOp:
    """One PyTorch (aten) op run outside the kernels: bytes read and written."""

    name: str
    read: int
    written: int


@dataclass
class Traffic:
    """Everything one measured call moved."""

    launches: List[Launch] = field(default_factory=list)
    torch_ops: List[TorchOp] = field(default_factory=list)

    @property
    def kernel_bytes(self) -> int:
        return sum(launch.load_bytes + launch.store_bytes for launch in self.launches)

    @property
    def torch_bytes(self) -> int:
        return sum(op.read + op.written for op in self.torch_ops)

    @property
    def total(self) -> int:
        return self.kernel_bytes + self.torch_bytes

    @property
    def programs(self) -> int:
        """The widest launch's programs (what fills, or does not fill, the GPU)."""
        return max((launch.programs for launch in self.launches), default=0)

    def describe(self, unit: int) -> str:
        """Per launch and per PyTorch op, in units of ``unit`` bytes: where the bytes go."""
        parts = []
        for launch in self.launches:
            args = " ".join(f"{name}:{ld / unit:.3g}/{st / unit:.3g}" for name, (ld, st) in launch.by_arg.items()
                            if ld or st)
            parts.append(f"{launch.kernel}[{'x'.join(map(str, launch.grid))}] ld/st {args}")
        ops: Dict[str, float] = {}
        for op in self.torch_ops:
            ops[op.name] = ops.get(op.name, 0.0) + (op.read + op.written) / unit
        parts += [f"{name} {value:.3g}" for name, value in ops.items() if value >= 0.0005]
        return "; ".join(parts)


# aten ops that allocate without writing anything, or only look at metadata.
_NO_TRAFFIC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_",
               "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type")
# Ops whose tensor inputs give only a shape or dtype, or that overwrite their first argument unread.
_WRITE_ONLY = ("zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zero_", "fill_")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _TorchOpCounter(TorchDispatchMode):
    """Counts the bytes of every aten op outside kernel launches; enters linrec's custom ops."""

    def __init__(self, meter: "Meter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "linrec":  # the op's own body: count what it runs, not the call
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        if self.meter.in_launch == 0:
            self.meter._count_torch_op(func, args, kwargs, out)
        return out


class Meter:
    """Hooks the interpreter and PyTorch's dispatcher while active (a context manager).

    ``with Meter() as m: fn()`` then ``m.traffic`` holds the launches and PyTorch ops of ``fn``.
    ``fast_scan`` replaces the interpreter's element-by-element ``associative_scan`` by the same
    sequential fold applied a row at a time (identical results, tens of times faster).
    """

    def __init__(self, fast_scan: bool = True):
        self.fast_scan = fast_scan
        self.traffic = Traffic()
        self.in_launch = 0
        self._current: Optional[Tuple[Launch, _Distinct, _Distinct, List[Tuple[str, int, int]]]] = None
        self._stack = contextlib.ExitStack()

    # -- kernels ------------------------------------------------------------------------------
    def _record(self, which: int, ptrs, mask) -> None:
        if self._current is None:
            return
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data).astype(bool), addrs.shape)
            addrs = addrs[m]
        elsize = ptrs.get_element_ty().primitive_bitwidth // 8
        self._current[which].add(np.asarray(addrs, dtype=np.uint64), max(elsize, 1))

    def _begin_launch(self, fn, arg_names, args, kwargs) -> None:
        # The address span of each tensor argument, to split the bytes by argument. Tensors passed
        # for several pointers (a launcher's dummies for unused ones) share one label.
        spans: Dict[Tuple[int, int], List[str]] = {}
        for name, arg in list(zip(arg_names, args)) + list(kwargs.items()):
            t = getattr(arg, "base", arg)
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            lo = t.data_ptr()
            extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
            spans.setdefault((lo, lo + extent * t.element_size()), []).append(name)
        def label(names):
            main = next((n for n in names if n.startswith("out")), names[0])
            return main if len(names) == 1 else f"{main}(+{len(names) - 1})"

        labelled = [(label(names), lo, hi) for (lo, hi), names in spans.items()]
        meta = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
        launch = Launch(kernel=getattr(fn, "__name__", str(fn)), meta=meta)
        self._current = (launch, _Distinct(), _Distinct(), labelled)

    def _end_launch(self) -> None:
        launch, loads, stores, spans = self._current
        self._current = None
        launch.load_bytes = loads.nbytes()
        launch.store_bytes = stores.nbytes()
        for which, distinct in ((0, loads), (1, stores)):
            for size, addrs in distinct.by_size().items():
                claimed = np.zeros(addrs.size, dtype=bool)
                for name, lo, hi in spans:
                    inside = (addrs >= lo) & (addrs < hi) & ~claimed
                    n = int(inside.sum())
                    claimed |= inside
                    if n:
                        launch.by_arg.setdefault(name, [0, 0])[which] += n * size
                rest = int((~claimed).sum())
                if rest:
                    launch.by_arg.setdefault("?", [0, 0])[which] += rest * size
        self.traffic.launches.append(launch)

    def _install_interpreter_hooks(self) -> None:
        from triton.runtime import interpreter as interp

        meter = self
        builder_cls = interp.InterpreterBuilder
        orig = {name: getattr(builder_cls, name) for name in
                ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas", "set_grid_dim")}

        def masked_load(builder, ptrs, mask, *rest, **kw):
            meter._record(1, ptrs, mask)
            return orig["create_masked_load"](builder, ptrs, mask, *rest, **kw)

        def masked_store(builder, ptrs, value, mask, *rest, **kw):
            meter._record(2, ptrs, mask)
            return orig["create_masked_store"](builder, ptrs, value, mask, *rest, **kw)

        def atomic_rmw(builder, op, ptr, val, mask, *rest, **kw):
            meter._record(1, ptr, mask)
            meter._record(2, ptr, mask)
            return orig["create_atomic_rmw"](builder, op, ptr, val, mask, *rest, **kw)

        def atomic_cas(builder, ptr, cmp, val, *rest, **kw):
            meter._record(1, ptr, None)
            meter._record(2, ptr, None)
            return orig["create_atomic_cas"](builder, ptr, cmp, val, *rest, **kw)

        def set_grid_dim(builder, *dims):
            if meter._current is not None:
                meter._current[0].grid = tuple(int(d) for d in dims)
            return orig["set_grid_dim"](builder, *dims)

        executor = interp.GridExecutor
        orig_call = executor.__call__

        def call(ex, *args_dev, **kwargs):
            meter.in_launch += 1
            meter._begin_launch(ex.fn, ex.arg_names, args_dev, kwargs)
            try:
                return orig_call(ex, *args_dev, **kwargs)
            finally:
                meter._end_launch()
                meter.in_launch -= 1

        patches = [(builder_cls, "create_masked_load", masked_load), (builder_cls, "create_masked_store", masked_store),
                   (builder_cls, "create_atomic_rmw", atomic_rmw), (builder_cls, "create_atomic_cas", atomic_cas),
                   (builder_cls, "set_grid_dim", set_grid_dim), (executor, "__call__", call)]
        if self.fast_scan:
            self._stack.enter_context(rowwise_interpreter_scan())
        for owner, name, new in patches:
            old = owner.__dict__[name]
            setattr(owner, name, new)
            self._stack.callback(setattr, owner, name, old)

    # -- PyTorch ops ----------------------------------------------------------------------------
    def _count_torch_op(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        if name in _NO_TRAFFIC:
            return
        schema = func._schema
        returns = schema.returns
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        outs = _tensors(out)
        if outs and not mutates:
            # A view (view, _unsafe_view, alias, ...) or an op that returned its input (to, contiguous):
            # nothing moves when every output shares an input's storage.
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            if all(t.untyped_storage().data_ptr() in inputs for t in outs):
                return
        mutated = set()
        read = 0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            tensors = _tensors(value)
            if not tensors:
                continue
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            if is_write:
                mutated.update(id(t) for t in tensors)
                # copy_ and the fills overwrite their destination unread; other in-place ops read it.
                if name in ("copy_",) + _WRITE_ONLY or arg.kwarg_only or arg.name == "out":
                    continue
            elif name in _WRITE_ONLY:
                continue
            read += sum(_tensor_bytes(t) for t in tensors)
        written = sum(_tensor_bytes(t) for t in _tensors(out))
        if not returns or written == 0:
            written = sum(_tensor_bytes(t) for t in _tensors((args, kwargs)) if id(t) in mutated)
        self.traffic.torch_ops.append(TorchOp(name, read, written))

    # -- context ----------------------------------------------------------------------------------
    def __enter__(self) -> "Meter":
        self._install_interpreter_hooks()
        self._stack.enter_context(_TorchOpCounter(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _rowwise_generic_scan(self, input):
    """The interpreter's sequential scan, one row along the scan axis at a time.

    Same fold, same order and same dtype per element as Triton's element-by-element
    ``ScanOps.generic_scan`` (the combine functions are elementwise), vectorised over the other axes.
    """
    datas = [arg.handle.data for arg in input]
    axis = self.axis
    outs = [np.empty_like(d) for d in datas]
    acc = None
    for i in range(datas[0].shape[axis]):
        cur = tuple(self.to_tensor(np.take(d, i, axis=axis), input[j].dtype) for j, d in enumerate(datas))
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*acc, *cur)
            acc = tuple(ret) if isinstance(ret, tuple) else (ret,)
            acc = tuple(a if hasattr(a, "handle") else self.to_tensor(np.full(cur[0].handle.data.shape, a), input[j].dtype)
                        for j, a in enumerate(acc))
        index = [slice(None)] * datas[0].ndim
        index[axis] = i
        for j, out in enumerate(outs):
            out[tuple(index)] = acc[j].handle.data
    return [self.to_tensor(out, input[j].dtype) for j, out in enumerate(outs)]


@contextlib.contextmanager
def rowwise_interpreter_scan():
    """While active, the interpreter's ``tl.associative_scan`` folds a row at a time (same results)."""
    from triton.runtime import interpreter as interp

    old = interp.ScanOps.__dict__["generic_scan"]
    interp.ScanOps.generic_scan = _rowwise_generic_scan
    try:
        yield
    finally:
        interp.ScanOps.generic_scan = old


def measure(fn: Callable[[], Any], fast_scan: bool = True) -> Tuple[Traffic, Any]:
    """Runs ``fn()`` once under the meter; returns its traffic and its result."""
    with Meter(fast_scan=fast_scan) as meter:
        result = fn()
    return meter.traffic, result


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "complex64": torch.complex64}


@dataclass
class Case:
    """One measured call: an op, a mode, a dtype and a shape, and the GPU target it stands for."""

    op: str
    mode: str
    dtype: str
    dims: Dict[str, int]
    target: str = ""      # the GPU target shape this scaled-down case stands for
    variant: str = ""     # e.g. "a (D,)" for a broadcast coefficient

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())


def _diagonal_call(case: Case):
    d = case.dims
    B, T, D = d["B"], d["T"], d["D"]
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    real = torch.float32 if dtype == torch.complex64 else dtype
    a_shape = (D,) if case.variant == "a (D,)" else (B, T, D)
    if dtype == torch.complex64:
        r = 0.5 + 0.5 * torch.rand(a_shape, generator=g)
        th = torch.rand(a_shape, generator=g)
        a = torch.polar(r, th)
        x = torch.randn(B, T, D, generator=g, dtype=torch.complex64)
    else:
        a = (0.5 + 0.5 * torch.rand(a_shape, generator=g)).to(real)
        x = torch.randn(B, T, D, generator=g).to(real)
    if case.mode == "fwd":
        return (a, x), lambda: torch.ops.linrec.diagonal_scan(a, x, None, None, False, "triton")
    h = torch.ops.linrec.diagonal_scan(a, x, None, None, False, "torch")
    dh = torch.randn(h.shape, generator=g, dtype=h.dtype) if h.is_complex() else torch.randn(h.shape, generator=g).to(h.dtype)
    return (a, h, dh), lambda: torch.ops.linrec.diagonal_scan_backward(a, None, h, dh, None, False, "triton")


def _block_diagonal_call(case: Case):
    d = case.dims
    B, T, G, b = d["B"], d["T"], d["G"], d["b"]
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(B, T, G, b, b, generator=g) * (0.5 / b ** 0.5)).to(dtype)
    x = torch.randn(B, T, G, b, generator=g).to(dtype)
    if case.mode == "fwd":
        return (A, x), lambda: torch.ops.linrec.block_diagonal_scan(A, x, None, None, False, "triton")
    h = torch.ops.linrec.block_diagonal_scan(A, x, None, None, False, "torch")
    dh = torch.randn(h.shape, generator=g).to(dtype)
    return (A, h, dh), lambda: torch.ops.linrec.block_diagonal_scan_backward(A, None, h, dh, None, False, "triton")


def _householder_call(case: Case):
    d = case.dims
    B, T, H, K, V, n = d["B"], d["T"], d["H"], d["K"], d["V"], d["n"]
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, n, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, n, H, V, generator=g).to(dtype)
    beta = torch.rand(B, T, n, H, generator=g).to(dtype)
    gate = (-torch.rand(B, T, H, generator=g)).to(dtype) if case.variant == "gated" else None
    scale = K ** -0.5
    if case.mode == "fwd":
        inputs = tuple(t for t in (q, k, v, beta, gate) if t is not None)
        # The minimum counts o and the final state, not what the forward saves for the backward
        # (the chunk inverse Tinv for bf16 / fp16 inputs): its stores are extra bytes.
        return inputs, lambda: torch.ops.linrec.householder_scan(q, k, v, beta, gate, None, None, scale,
                                                                 "triton")[:2]
    do = torch.randn(B, T, H, V, generator=g).to(dtype)
    inputs = tuple(t for t in (q, k, v, beta, gate, do) if t is not None)
    # The forward's saved Tinv, made outside the measured call; the backward reads it (extra bytes).
    saved = torch.ops.linrec.householder_scan(q, k, v, beta, gate, None, None, scale, "triton")[2]
    return inputs, lambda: torch.ops.linrec.householder_scan_backward(q, k, v, beta, gate, None, saved, do, None,
                                                                      None, scale, "triton")


def _selective_call(case: Case):
    """Mamba's selective scan as a layer calls it: softplus(delta + delta_bias), D and z present, no
    initial state; B and C of shape (B, T, G, N) (G = 1: Mamba's ungrouped (B, T, N)).
    Forward minimum: read x, delta, z, B, C (and the small A, D, delta_bias), write y and the final
    state (N_seq, D, N) fp32 the op always returns (the checkpoints it saves for the backward are
    extra). Backward: read the forward's inputs and dy, write dx, ddelta, dA, dB, dC, dD, dz,
    ddelta_bias once each."""
    d = case.dims
    Bsz, T, D, N, G = d["B"], d["T"], d["D"], d["N"], d.get("G", 1)
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(Bsz, T, D, generator=g).to(dtype)
    delta = (torch.rand(Bsz, T, D, generator=g) * 2.0 - 4.0).to(dtype)
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(D, N).contiguous()
    bc_shape = (Bsz, T, G, N)   # the op's 4-D layout (the public function adds the G = 1 axis)
    Bm = torch.randn(bc_shape, generator=g).to(dtype)
    Cm = torch.randn(bc_shape, generator=g).to(dtype)
    skip = torch.randn(D, generator=g)
    z = torch.randn(Bsz, T, D, generator=g).to(dtype)
    bias = torch.rand(D, generator=g) - 1.0
    fwd_inputs = (x, delta, A, Bm, Cm, skip, z, bias)
    if case.mode == "fwd":   # the minimum counts y and the final state, not the checkpoints
        return fwd_inputs, lambda: torch.ops.linrec.selective_scan(x, delta, A, Bm, Cm, skip, z, bias, None, None,
                                                                   True, False, False, "triton")[:2]
    dy = torch.randn(Bsz, T, D, generator=g).to(dtype)
    # The forward's checkpoints (the state entering every 256 steps), saved for the backward: made
    # here, outside the measured call; the backward reads them (extra bytes: not in the minimum).
    _, _, checkpoints = torch.ops.linrec.selective_scan(x, delta, A, Bm, Cm, skip, z, bias, None, None,
                                                        True, False, False, "triton")
    return fwd_inputs + (dy,), lambda: torch.ops.linrec.selective_scan_backward(
        x, delta, A, Bm, Cm, skip, z, bias, None, checkpoints, dy, None, None, True, False, False, "triton")


CALLS = {"diagonal": _diagonal_call, "block_diagonal": _block_diagonal_call, "householder": _householder_call,
         "selective": _selective_call}


def _parse_dims(text: str) -> Dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split() if "=" in item)}


def plan_summary(op: str, dtype: str, dims: Dict[str, int]) -> str:
    """The launch plan the model GPU gets at ``dims`` (computed by the launchers' planning functions,
    nothing run): programs per pass and the time split, e.g. at a GPU target's full shape."""
    from linrec.kernels import device_model
    model = device_model()
    if op == "diagonal":
        import linrec.kernels.diagonal as dg
        B, T, D = dims["B"], dims["T"], dims["D"]
        cfg = dg._config(DTYPES[dtype], model is None, D)
        auto = dg._auto_num_chunks
        S = auto(B, D, T, None, cfg, model)
        if S > 1:  # one program per (chunk, sequence, channel block), joined by look-back in one launch
            programs = B * -(-D // cfg.get("CHUNK_D", cfg["BLOCK_D"]))
            return f"{programs * S} programs ({programs} x {S} time chunks), one pass"
        programs = B * -(-D // cfg["BLOCK_D"])
        return f"{programs} programs, one pass"
    if op == "block_diagonal":
        import linrec.kernels.block_diagonal as bd
        return bd.plan_description(dims["B"], dims["T"], dims["G"], dims["b"], model)
    if op == "selective":
        import linrec.kernels.selective as sel
        return sel.plan_description(dims["B"], dims["T"], dims["D"], dims["N"], dims.get("G", 1), model)
    return ""


def _unit_of(case: Case) -> int:
    """Bytes of one "unit": the op's main tensor (x, or o for Householder)."""
    d = case.dims
    size = {"fp32": 4, "bf16": 2, "complex64": 8}[case.dtype]
    if case.op == "diagonal":
        return d["B"] * d["T"] * d["D"] * size
    if case.op == "block_diagonal":
        return d["B"] * d["T"] * d["G"] * d["b"] * size
    if case.op == "selective":
        return d["B"] * d["T"] * d["D"] * size
    return d["B"] * d["T"] * d["H"] * d["V"] * size


def run_case(case: Case, fast_scan: bool = True) -> Dict[str, Any]:
    """Measures one case; returns its CSV row."""
    import linrec  # noqa: F401  (registers torch.ops.linrec.*)

    inputs, call = CALLS[case.op](case)
    start = time.perf_counter()
    traffic, result = measure(call, fast_scan=fast_scan)
    seconds = time.perf_counter() - start
    minimum = sum(_tensor_bytes(t) for t in inputs) + sum(_tensor_bytes(t) for t in _tensors(result))
    unit = _unit_of(case)
    return {
        "op": case.op, "mode": case.mode, "dtype": case.dtype, "variant": case.variant, "shape": case.shape,
        "target": case.target, "plan": plan_summary(case.op, case.dtype, case.dims),
        "target_plan": plan_summary(case.op, case.dtype, _parse_dims(case.target)) if case.target else "",
        "min_bytes": minimum, "measured_bytes": traffic.total,
        "kernel_bytes": traffic.kernel_bytes, "torch_bytes": traffic.torch_bytes,
        "ratio": traffic.total / minimum if minimum else float("nan"),
        "min_units": minimum / unit, "measured_units": traffic.total / unit,
        "launches": len(traffic.launches), "torch_ops": len(traffic.torch_ops), "programs": traffic.programs,
        "grids": " ".join("x".join(map(str, launch.grid)) for launch in traffic.launches),
        "interpreter_s": round(seconds, 1), "detail": traffic.describe(unit),
    }


def _cases(preset: str) -> List[Case]:
    """The measured cases.

    ``targets``: stand-ins for the GPU targets of issue 13, run with the model GPU's plan at shapes
    the interpreter finishes (about 30 us per element and pass): the same kernels, passes and kind
    of split as at the target (segments for the diagonal, 64-step chunks for block-diagonal), fewer
    programs and segments. The ``target_plan`` column gives the plan at the full target shape:
    * diagonal (B=8, D=1024, T=8192) -> B=2, D=256, T=512 (segmented, 2 segments; target 5 / 9);
    * diagonal (B=1, D=64, T=65536) -> B=1, D=64, T=4096 (16 segments; target 256 / 512);
    * broadcast a (D,), backward, fp32, at both;
    * block-diagonal (B=8, T=4096, width 256, b = 1 .. 16) -> B=2, T=256 (4 chunks of 64 steps);
    * Householder (bf16, K = V = 128, n = 1) at B=1, T=256, H=1;
    * selective (B=8, T=2048, D=2048, N=16) -> B=1, T=300, D=256 and 512 (see ``_selective_cases``).
    ``quick``: tiny shapes, for a smoke run.
    """
    out: List[Case] = []
    if preset == "quick":
        for mode in ("fwd", "bwd"):
            out.append(Case("diagonal", mode, "fp32", dict(B=1, T=512, D=32), "B=1 T=65536 D=64"))
            out.append(Case("selective", mode, "bf16", dict(B=1, T=256, D=64, N=16, G=1), "B=8 T=2048 D=2048 N=16"))
            out.append(Case("block_diagonal", mode, "fp32", dict(B=1, T=256, G=4, b=4), "B=8 T=4096 G=64 b=4"))
        return out
    for mode in ("fwd", "bwd"):
        for dtype in ("fp32", "bf16", "complex64"):
            out.append(Case("diagonal", mode, dtype, dict(B=2, T=512, D=256), "B=8 T=8192 D=1024"))
            out.append(Case("diagonal", mode, dtype, dict(B=1, T=4096, D=64), "B=1 T=65536 D=64"))
    out.append(Case("diagonal", "bwd", "fp32", dict(B=2, T=512, D=256), "B=8 T=8192 D=1024", "a (D,)"))
    out.append(Case("diagonal", "bwd", "fp32", dict(B=1, T=4096, D=64), "B=1 T=65536 D=64", "a (D,)"))
    for mode in ("fwd", "bwd"):
        for b in (1, 2, 4, 8, 16):
            out.append(Case("block_diagonal", mode, "fp32", dict(B=2, T=256, G=256 // b, b=b),
                            f"B=8 T=4096 G={256 // b} b={b}"))
    for mode in ("fwd", "bwd"):
        out.append(Case("householder", mode, "bf16", dict(B=1, T=256, H=1, K=128, V=128, n=1), "B=8 T=2048 H=16 K=128"))
    out += _selective_cases()
    return out


def _selective_cases() -> List[Case]:
    """Mamba's selective scan scaled down from B=8, T=2048, D=2048 (Mamba 1.4B's d_inner is 4096), N=16:
    bf16 and fp32, ungrouped and grouped (G = 4) B and C, forward and backward. T = 300: two of the
    backward's 256-step segments, the second partial (the interpreter takes about 10 minutes for a
    backward at D = 256 on a shared machine); D = 256 and 512 show the share of dB and dC falling as
    D / N grows."""
    out = []
    target = "B=8 T=2048 D=2048 N=16 G={}"
    for mode in ("fwd", "bwd"):
        out.append(Case("selective", mode, "bf16", dict(B=1, T=300, D=512, N=16, G=1), target.format(1)))
        out.append(Case("selective", mode, "bf16", dict(B=1, T=300, D=256, N=16, G=1), target.format(1)))
        out.append(Case("selective", mode, "bf16", dict(B=1, T=300, D=256, N=16, G=4), target.format(4)))
        out.append(Case("selective", mode, "fp32", dict(B=1, T=300, D=256, N=16, G=1), target.format(1)))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = ("op", "mode", "dtype", "variant", "shape", "target", "plan", "target_plan", "min_bytes", "measured_bytes", "kernel_bytes",
           "torch_bytes", "ratio", "min_units", "measured_units", "launches", "torch_ops", "programs", "grids",
           "interpreter_s", "detail")


def environment(model_name: str) -> Dict[str, str]:
    """Command, device model, versions and git SHA, for the CSV's header lines."""
    try:
        from bench.common import environment as bench_environment
        env = dict(bench_environment(torch.device("cpu")))
    except Exception:  # the bench package being reorganised: fall back to git and the versions
        import triton
        try:
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = "unknown"
        env = {"device": "cpu", "torch": torch.__version__, "triton": triton.__version__, "git_sha": sha or "unknown",
               "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    from linrec.kernels import device_model
    model = device_model()
    env["device_model"] = f"{model_name} ({model.name}, {model.sm_count} SMs, {model.smem_per_block} B smem/block)"
    env["host"] = env.pop("device", "cpu")
    env["command"] = "python -m bench.traffic " + " ".join(sys.argv[1:])
    return {k: v for k, v in env.items() if v != ""}


def write_csv(path: str, rows: List[Dict[str, Any]], env: Dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        for key, value in env.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in COLUMNS})


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    header = ("op", "mode", "dtype", "shape", "plan", "target", "target plan", "min units", "measured units",
              "ratio", "ceiling", "launches", "torch ops")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        op = r["op"] + (f" {r['variant']}" if r["variant"] else "")
        lines.append("| " + " | ".join(str(v) for v in (
            op, r["mode"], r["dtype"], r["shape"], r["plan"], r["target"], r["target_plan"], f"{r['min_units']:.3f}",
            f"{r['measured_units']:.3f}", f"{r['ratio']:.2f}", f"{100 / r['ratio']:.0f}%", r["launches"],
            r["torch_ops"])) + " |")
    return "\n".join(lines)


def write_markdown(path: str, rows: List[Dict[str, Any]], env: Dict[str, str]) -> None:
    text = [
        "# Memory traffic of the Triton launchers, counted under the interpreter",
        "",
        "Written by `python -m bench.traffic` (see its docstring for how it counts). Each row is one call of the",
        "op's forward or backward custom op with `backend=\"triton\"`, planned as on the model GPU. *min units*:",
        "the bytes that must move (every input read once, every output written once) in units of the main",
        "tensor (x; o for Householder); *measured*: distinct bytes loaded plus stored per kernel launch, summed",
        "over launches, plus the bytes read and written by the PyTorch ops around the kernels; *ratio* =",
        "measured / min; *ceiling* = min / measured, the most of copy bandwidth the op can reach;",
        "*plan*: programs of the widest launch and the time split (segments, chunks) the model GPU's",
        "launcher chose for the measured shape; *target plan*: what it chooses at the GPU target's full",
        "shape (computed, not run: the interpreter costs about 30 us per element and pass). The measured",
        "shapes keep the target's kernels and passes with fewer programs and segments; the per-segment",
        "and per-chunk terms are a little larger there than at the target. The CSV's `detail` column splits",
        "the bytes by launch and kernel argument (loaded/stored, in units).",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        format_table(rows),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(text))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-model", default=None,
                        help="GPU whose launch plan to run (default: $LINREC_DEVICE_MODEL, else h100)")
    parser.add_argument("--preset", choices=("targets", "quick"), default="targets")
    parser.add_argument("--op", action="append", choices=sorted(CALLS), help="only these ops (repeatable)")
    parser.add_argument("--mode", action="append", choices=("fwd", "bwd"), help="only these modes")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes")
    parser.add_argument("--shape", action="append", help="only cases whose shape contains this text (repeatable)")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/traffic[-quick].csv)")
    parser.add_argument("--md", default=None, help="markdown table path (default next to the CSV, .md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("bench.traffic counts under the Triton interpreter: TRITON_INTERPRET=1 is needed", file=sys.stderr)
        return 2
    model_name = args.device_model or os.environ.get("LINREC_DEVICE_MODEL") or "h100"
    os.environ["LINREC_DEVICE_MODEL"] = model_name
    import linrec  # noqa: F401  (registers torch.ops.linrec.*)

    cases = [c for c in _cases(args.preset)
             if (not args.op or c.op in args.op) and (not args.mode or c.mode in args.mode)
             and (not args.dtype or c.dtype in args.dtype) and (not args.shape or any(s in c.shape for s in args.shape))]
    suffix = "" if args.preset == "targets" else f"-{args.preset}"
    out = args.out or os.path.join(RESULTS, f"traffic{suffix}.csv")
    md = args.md or os.path.splitext(out)[0] + ".md"
    env = environment(model_name)
    rows = []
    for case in cases:
        row = run_case(case)
        rows.append(row)
        print(f"{case.op:15s} {case.mode} {case.dtype:9s} {case.variant:7s} {case.shape:28s} "
              f"min {row['min_units']:.3f} measured {row['measured_units']:.3f} units  ratio {row['ratio']:.2f}  "
              f"launches {row['launches']} torch ops {row['torch_ops']} programs {row['programs']}  "
              f"({row['interpreter_s']} s)", flush=True)
        write_csv(out, rows, env)
    write_markdown(md, rows, env)
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
