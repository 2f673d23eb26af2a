"""Measuring: timing a callable, the device's copy bandwidth, and one case into one CSV row.

:func:`run_case` builds the mode's closure (forward, backward, or forward+backward), times it
with ``triton.testing.do_bench`` on CUDA or ``torch.utils.benchmark`` on the CPU and returns one
CSV row. Nothing here asserts anything about speed: numbers are measured and written down.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .spec import DIM_COLUMNS, DTYPES, Impl, OpSpec, Point, Skip


def _quantiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    """Median, 20th and 80th percentile (linear interpolation) of a list of seconds."""
    xs = sorted(samples)

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def time_fn(fn: Callable[[], Any], device: torch.device, *, min_run_time: float = 0.2,
            min_samples: int = 7) -> Tuple[float, float, float]:
    """Times ``fn()``; returns (median, p20, p80) in milliseconds.

    CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed between runs, CUDA events),
    falling back to CUDA events when Triton is missing. CPU: ``torch.utils.benchmark.Timer``;
    ``blocked_autorange`` picks how many calls one sample averages over, then more samples are
    taken until there are ``min_samples``; the quantiles are over those per-sample averages.
    """
    if device.type == "cuda":
        rep_ms = max(25.0, 1000.0 * min_run_time)
        try:
            from triton.testing import do_bench
            med, p20, p80 = do_bench(fn, warmup=max(5.0, rep_ms / 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return float(med), float(p20), float(p80)
        except ImportError:
            return _time_cuda_events(fn, rep_ms)
    from torch.utils.benchmark import Timer

    # No separate warm-up call: the caller has run ``fn`` once already (build_mode_fn does).
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    samples = list(measurement.times)
    while len(samples) < min_samples:
        samples.extend(timer.timeit(measurement.number_per_run).times)
    med, p20, p80 = _quantiles(samples)
    return med * 1e3, p20 * 1e3, p80 * 1e3


def _time_cuda_events(fn: Callable[[], Any], rep_ms: float) -> Tuple[float, float, float]:
    """CUDA-event timing for machines without Triton: per-call times, then quantiles."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples: List[float] = []
    spent = 0.0
    while spent < rep_ms or len(samples) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        spent += samples[-1]
    med, p20, p80 = _quantiles(samples)
    return med, p20, p80


def measure_copy_bandwidth(device: torch.device, *, nbytes: Optional[int] = None,
                           min_run_time: float = 0.2) -> float:
    """The device's copy bandwidth in GB/s: ``dst.copy_(src)`` of a large tensor, read + write.

    The tensor is 1 GiB on CUDA (far beyond L2) and 64 MiB on the CPU (beyond the caches of
    most machines), fp32. Bytes counted: 2 x the tensor size, the same way every op's bytes
    are counted (each tensor read or written once).
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of dst's pages
    med_ms, _, _ = time_fn(lambda: dst.copy_(src), device, min_run_time=min_run_time)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (med_ms * 1e-3) / 1e9


def _first_tensor(out: Any) -> torch.Tensor:
    """The main output: the tensor itself, or the first tensor of a tuple (o of (o, state))."""
    if isinstance(out, torch.Tensor):
        return out
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"implementation returned no tensor: {type(out).__name__}")


def _nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build_mode_fn(fn: Callable[..., Any], leaves: List[torch.Tensor], mode: str
                  ) -> Tuple[Callable[[], Any], int]:
    """Wraps an implementation into the timed closure of ``mode``.

    * ``fwd``: the op under ``torch.no_grad()``;
    * ``bwd``: the op runs once with autograd, then only ``torch.autograd.grad`` of its output
      (with a fixed random output gradient, ``retain_graph=True``) is timed;
    * ``fwdbwd``: the op and its gradient, both timed.

    Returns the closure and the bytes of what it returns (output, or the input gradients).
    """
    if mode == "fwd":
        leaves = [t.detach() for t in leaves]

        def run_fwd():
            with torch.no_grad():
                return fn(*leaves)

        out = _first_tensor(run_fwd())
        return run_fwd, _nbytes([out])
    grad_leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in leaves]
    wrt = [t for t in grad_leaves if t.requires_grad]
    out = _first_tensor(fn(*grad_leaves))
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        def run_bwd():
            return torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

        grads = run_bwd()
        return run_bwd, _nbytes(list(grads))

    def run_fwdbwd():
        o = _first_tensor(fn(*grad_leaves))
        return torch.autograd.grad(o, wrt, grad_out)

    grads = run_fwdbwd()
    return run_fwdbwd, _nbytes(list(grads)) + _nbytes([out])


def peak_extra_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates beyond what was live before it, in MiB (CUDA only).

    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
    allocated before the call. On the CPU PyTorch keeps no such counter, so this is None
    (written "n/a"); the CSV's ``output_mb`` column is the honest CPU substitute.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2**20


def prepare_case(impl: Impl, point: Point, mode: str, device: torch.device, inputs: Dict[str, Any]
                 ) -> Tuple[Callable[[], Any], int]:
    """Builds one implementation's timed closure for a point and mode (one warm-up call included).

    Returns the closure and the bytes of what it returns. Raises :class:`Skip` when the
    implementation refuses the point or fails on it (the failure becomes the skip reason, so one
    broken baseline never stops the sweep).
    """
    reason = impl.refuse(point, device) if impl.refuse is not None else None
    if reason:
        raise Skip(reason)
    try:
        fn, leaves = impl.build(inputs, point, mode)
        return build_mode_fn(fn, leaves, mode)
    except Skip:
        raise
    except Exception as exc:  # a baseline that fails on a shape is reported, not fatal
        raise _failure(exc) from None


def _failure(exc: BaseException) -> Skip:
    """The Skip that reports a failed build or timed call: out of memory, or the error's first line."""
    if isinstance(exc, torch.OutOfMemoryError):
        return Skip("out of memory", failed=True)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Skip(f"{type(exc).__name__}: {msg[:160]}", failed=True)


def make_row(op: OpSpec, impl: Impl, point: Point, mode: str, dtype_name: str, times: Tuple[float, float, float],
             out_bytes: int, copy_gbps: float, peak: Optional[float], timing: str,
             cpu_ms: Optional[float] = None) -> Dict[str, Any]:
    """One CSV row (without environment columns) from measured (median, p20, p80) milliseconds;
    ``cpu_ms``: the median process CPU time per call where the timing measured it (interleaved)."""
    med, p20, p80 = times
    dtype = DTYPES[dtype_name]
    nbytes = op.bytes_moved(point, mode, dtype)
    flops = op.flops(point, mode)
    gbps = nbytes / (med * 1e-3) / 1e9
    row: Dict[str, Any] = {
        "op": op.name, "sweep": point.sweep, "impl": impl.name, "kind": impl.kind, "mode": mode,
        "dtype": dtype_name, "x_name": point.x_name, "x_value": point.x_value,
    }
    row.update({k: point.dims.get(k, "") for k in DIM_COLUMNS})
    row.update({
        "median_ms": med, "p20_ms": p20, "p80_ms": p80,
        "gbps": gbps, "frac_copy": gbps / copy_gbps if copy_gbps > 0 else "",
        "tflops": (flops / (med * 1e-3) / 1e12) if flops else "",
        "peak_extra_mb": peak if peak is not None else "n/a",
        "output_mb": out_bytes / 2**20,
        "bytes_model": nbytes, "copy_gbps": copy_gbps, "timing": timing,
        "cpu_ms": cpu_ms if cpu_ms is not None else "",
    })
    return row


def run_case(op: OpSpec, impl: Impl, point: Point, mode: str, dtype_name: str, device: torch.device,
             inputs: Dict[str, Any], copy_gbps: float, min_run_time: float, min_samples: int = 7
             ) -> Dict[str, Any]:
    """Times one (impl, point, mode, dtype) on its own (:func:`time_fn`) and returns its CSV row
    (without environment columns).

    Raises :class:`Skip` when the implementation refuses the point or fails on it.
    """
    timed, out_bytes = prepare_case(impl, point, mode, device, inputs)
    try:
        times = time_fn(timed, device, min_run_time=min_run_time, min_samples=min_samples)
        peak = peak_extra_memory_mb(timed, device)
    except Exception as exc:  # noqa: BLE001 - reported as a skip, like a failing build
        raise _failure(exc) from None
    return make_row(op, impl, point, mode, dtype_name, times, out_bytes, copy_gbps, peak, "separate")


# --------------------------------------------------------------------------------------------
# Interleaved timing: every implementation of a point once per round, rounds repeated
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_block(fn: Callable[[], Any], calls: int, device: torch.device) -> Tuple[float, float]:
    """Seconds per call of ``calls`` back-to-back calls of ``fn``: wall-clock, and the process's
    CPU time (user + system, all threads; :func:`time.process_time`).

    What the calls return is kept until the clock has stopped and freed after it: the time is
    the call's own (allocation, first touch of a fresh output and the work), not the release of
    the previous call's output, whose cost depends on the allocator (munmap of 4 KiB pages on
    the CPU) rather than on the implementation. Every implementation is timed the same way.
    """
    keep = []
    _sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    for _ in range(calls):
        keep.append(fn())
    _sync(device)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    del keep
    return elapsed / calls, cpu / calls


def time_interleaved(fns: Dict[str, Callable[[], Any]], device: torch.device, *, rounds: int = 7,
                     min_block_time: float = 0.01, warmup_rounds: int = 1, cpu_times: Optional[Dict[str, float]] = None
                     ) -> Tuple[Dict[str, Tuple[float, float, float]], List[List[str]]]:
    """Times several implementations of one point in interleaved rounds.

    After ``warmup_rounds`` untimed rounds (each function was also called once when it was
    built), each of ``rounds`` rounds calls every function in turn, its timed block being
    ``k`` back-to-back calls, with ``k`` chosen once from the warm-up so that a block lasts at
    least ``min_block_time`` (``k = 1`` for calls longer than that). The order rotates by one
    function per round (round r starts with the r-th), so no implementation always runs right
    after the same neighbour or always first. A machine whose load drifts during the run moves
    every implementation's samples alike, which the per-round comparison of separate timing
    (all samples of one implementation, then all of the next) cannot offer.

    Args:
        fns: name -> zero-argument callable (the timed closure of :func:`build_mode_fn`).
        device: where they run (CUDA calls are synchronised around each block).
        rounds: timed rounds; each implementation gets one sample per round.
        cpu_times: when given, filled with name -> median process CPU time per call (ms, user +
            system, every thread of the process). At one thread, a wall time well above it says
            the call waited (for the CPU, or for memory) rather than worked.

    Returns:
        ``times``: name -> (median, p20, p80) over the rounds, in milliseconds per call;
        ``order``: the names in the order they ran, one list per timed round.
    """
    names = list(fns)
    calls = {}
    for _ in range(max(1, warmup_rounds)):
        for name in names:
            calls[name] = _timed_block(fns[name], 1, device)[0]
    calls = {name: max(1, math.ceil(min_block_time / max(t, 1e-9))) for name, t in calls.items()}
    samples: Dict[str, List[float]] = {name: [] for name in names}
    cpu_samples: Dict[str, List[float]] = {name: [] for name in names}
    order: List[List[str]] = []
    for r in range(rounds):
        this_round = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in this_round:
            wall, cpu = _timed_block(fns[name], calls[name], device)
            samples[name].append(wall)
            cpu_samples[name].append(cpu)
        order.append(this_round)
    if cpu_times is not None:
        cpu_times.update({name: _quantiles(xs)[0] * 1e3 for name, xs in cpu_samples.items()})
    times = {}
    for name, xs in samples.items():
        med, p20, p80 = _quantiles(xs)
        times[name] = (med * 1e3, p20 * 1e3, p80 * 1e3)
    return times, order
