"""Shared machinery of the benchmark: cases, timing, bandwidth, environment, CSV, table and plots.

Every op module (``bench/diagonal.py``, ``bench/householder.py``, ``bench/block_diagonal.py``)
describes its work as data:

* a :class:`Point` is one shape (a dict of sizes such as ``B, T, D``) in a named sweep;
* an :class:`Impl` is one way to compute the op (a linrec backend or a baseline); it turns a
  point's input tensors into a callable and may refuse a point with a one-line reason;
* ``bytes_moved`` / ``flops`` give the work model used for GB/s and TFLOP/s.

:func:`run_case` builds the mode's closure (forward, backward, or forward+backward), times it
with ``triton.testing.do_bench`` on CUDA or ``torch.utils.benchmark`` on the CPU and returns one
CSV row. Nothing here asserts anything about speed: numbers are measured and written down.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """Raised by an implementation that cannot run a point; the message is the one-line reason.

    ``failed`` is True when the implementation tried and raised (an error, out of memory), as
    opposed to declining up front; the runner stops retrying an implementation that keeps failing.
    """

    def __init__(self, reason: str, failed: bool = False):
        super().__init__(reason)
        self.failed = failed


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


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

    ``kind == "speedup"``: ratio = time(baseline) / time(impl) at the matching points.
    ``kind == "bandwidth"``: ratio = impl's fraction of the measured copy bandwidth.
    ``where(row)`` selects the rows (shape, mode, dtype) the target speaks about.
    """

    label: str
    kind: str
    impl: Sequence[str]                         # first one present is used (e.g. cuda, then triton)
    goal: float
    where: Callable[[Dict[str, Any]], bool]
    baseline: Sequence[str] = ()


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cuda_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    """Device name, driver, versions, git SHA and UTC time, written into every CSV row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _cuda_driver()
        cuda = torch.version.cuda or ""
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        driver, cuda = "", ""
    return {
        "device": name,
        "driver": driver,
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": _git_sha(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel_config": _kernel_config_overrides(),
    }


def _kernel_config_overrides() -> str:
    """The LINREC_*_CONFIG launch-setting overrides of this run (empty: the launchers' defaults)."""
    try:
        from linrec.kernels import config_overrides_in_use
    except ImportError:  # a linrec without its kernels package: nothing to configure
        return ""
    return config_overrides_in_use()


def device_slug(device: torch.device) -> str:
    """A file-name-safe device label, e.g. ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}"[:60]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


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


def run_case(op: OpSpec, impl: Impl, point: Point, mode: str, dtype_name: str, device: torch.device,
             inputs: Dict[str, Any], copy_gbps: float, min_run_time: float, min_samples: int = 7
             ) -> Dict[str, Any]:
    """Times one (impl, point, mode, dtype) and returns its CSV row (without environment columns).

    Raises :class:`Skip` when the implementation refuses the point or fails on it (the failure
    becomes the skip reason, so one broken baseline never stops the sweep).
    """
    dtype = DTYPES[dtype_name]
    reason = impl.refuse(point, device) if impl.refuse is not None else None
    if reason:
        raise Skip(reason)
    try:
        fn, leaves = impl.build(inputs, point, mode)
        timed, out_bytes = build_mode_fn(fn, leaves, mode)
        med, p20, p80 = time_fn(timed, device, min_run_time=min_run_time, min_samples=min_samples)
        peak = peak_extra_memory_mb(timed, device)
    except Skip:
        raise
    except torch.OutOfMemoryError:
        raise Skip("out of memory", failed=True) from None
    except Exception as exc:  # a baseline that fails on a shape is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Skip(f"{type(exc).__name__}: {msg[:160]}", failed=True) from None
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
        "bytes_model": nbytes, "copy_gbps": copy_gbps,
    })
    return row


# --------------------------------------------------------------------------------------------
# CSV, table, plots
# --------------------------------------------------------------------------------------------

DIM_COLUMNS = ("B", "T", "D", "H", "K", "V", "n", "G", "b")
ENV_COLUMNS = ("device", "driver", "cuda", "torch", "triton", "git_sha", "utc_time", "kernel_config")
CSV_COLUMNS = (("op", "sweep", "impl", "kind", "mode", "dtype", "x_name", "x_value") + DIM_COLUMNS
               + ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "tflops", "peak_extra_mb",
                  "output_mb", "bytes_model", "copy_gbps") + ENV_COLUMNS)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_csv(path: str, rows: List[Dict[str, Any]], env: Dict[str, str]) -> None:
    """Writes the rows, each with the environment columns, to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in {**row, **env}.items() if k in CSV_COLUMNS})


def read_csv(path: str) -> List[Dict[str, Any]]:
    """Reads a results CSV back, numbers as floats where they parse."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: Dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v) if k not in ENV_COLUMNS and k not in ("op", "sweep", "impl") else v
                except (TypeError, ValueError):
                    parsed[k] = v
            rows.append(parsed)
    return rows


def shape_label(row: Dict[str, Any]) -> str:
    """``B=8 T=4096 D=512`` from a row's size columns."""
    parts = []
    for k in DIM_COLUMNS:
        v = row.get(k, "")
        if v not in ("", None):
            parts.append(f"{k}={int(float(v))}")
    return " ".join(parts)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A fixed-width text table of the measured rows, grouped as they were run."""
    header = ("op", "sweep", "shape", "mode", "dtype", "impl", "median ms", "p20", "p80", "GB/s",
              "%copy", "TFLOP/s", "peak MiB")
    lines = []
    for r in rows:
        lines.append((
            r["op"], r["sweep"], shape_label(r), r["mode"], r["dtype"], r["impl"],
            f"{r['median_ms']:.4g}", f"{r['p20_ms']:.4g}", f"{r['p80_ms']:.4g}", f"{r['gbps']:.3g}",
            f"{100 * r['frac_copy']:.1f}" if r["frac_copy"] != "" else "",
            f"{r['tflops']:.3g}" if r["tflops"] != "" else "",
            f"{r['peak_extra_mb']:.1f}" if isinstance(r["peak_extra_mb"], float) else "n/a",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)
    return "\n".join(out)


def plot_sweeps(rows: List[Dict[str, Any]], out_prefix: str, env: Dict[str, str]) -> List[str]:
    """One PNG per (op, sweep): a panel per (mode, dtype), median time vs the swept size,
    one line per implementation (log-log). Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["sweep"]), []).append(r)
    for (op, sweep), grp in groups.items():
        panels = sorted({(r["mode"], r["dtype"]) for r in grp}, key=lambda p: (MODES.index(p[0]), p[1]))
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (mode, dtype) in zip(axes.flat, panels):
            sel = [r for r in grp if r["mode"] == mode and r["dtype"] == dtype]
            for impl in sorted({r["impl"] for r in sel}):
                pts = sorted((r["x_value"], r["median_ms"], r["p20_ms"], r["p80_ms"]) for r in sel
                             if r["impl"] == impl)
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=impl)
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sel[0]["x_name"] if sel else "")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{mode} {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fixed = {k: v for k, v in grp[0].items() if k in DIM_COLUMNS and v != "" and k != grp[0]["x_name"]}
        fixed_txt = " ".join(f"{k}={v}" for k, v in fixed.items())
        fig.suptitle(f"{op} / {sweep} ({fixed_txt})\n{env['device']} | torch {env['torch']} | "
                     f"triton {env['triton']} | {env['git_sha']}", fontsize=9)
        fig.tight_layout()
        path = f"{out_prefix}-{op}-{sweep}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def evaluate_targets(targets: List[Target], rows: List[Dict[str, Any]]) -> List[str]:
    """One line per target: the measured ratio (or fraction of copy bandwidth) against its goal.

    A speedup is taken at every matching point where both implementations ran, and the
    smallest (worst) one is reported with the point it came from.
    """
    lines = []
    for t in targets:
        sel = [r for r in rows if t.where(r)]
        impl = next((name for name in t.impl if any(r["impl"] == name for r in sel)), None)
        if impl is None:
            lines.append(f"[--] {t.label}: not measured ({'/'.join(t.impl)} did not run here)")
            continue
        key = lambda r: (r["sweep"], shape_label(r), r["mode"], r["dtype"])  # noqa: E731
        mine = {key(r): r for r in sel if r["impl"] == impl}
        if t.kind == "bandwidth":
            worst = min(mine.values(), key=lambda r: r["frac_copy"])
            ok = worst["frac_copy"] >= t.goal
            lines.append(f"[{'ok' if ok else 'no'}] {t.label}: {impl} reaches {100 * worst['frac_copy']:.1f}% "
                         f"of copy bandwidth (worst point {shape_label(worst)} {worst['mode']} {worst['dtype']}; "
                         f"goal >= {100 * t.goal:.0f}%)")
            continue
        base = next((name for name in t.baseline if any(r["impl"] == name for r in sel)), None)
        if base is None:
            lines.append(f"[--] {t.label}: baseline {'/'.join(t.baseline)} not measured here")
            continue
        theirs = {key(r): r for r in sel if r["impl"] == base}
        ratios = [(theirs[k]["median_ms"] / mine[k]["median_ms"], mine[k]) for k in mine if k in theirs]
        if not ratios:
            lines.append(f"[--] {t.label}: {impl} and {base} never ran at the same point")
            continue
        worst_ratio, r = min(ratios, key=lambda p: p[0])
        ok = worst_ratio >= t.goal
        lines.append(f"[{'ok' if ok else 'no'}] {t.label}: {impl} is {worst_ratio:.2f}x {base} "
                     f"(worst of {len(ratios)} point(s): {shape_label(r)} {r['mode']} {r['dtype']}; "
                     f"goal >= {t.goal:g}x)")
    return lines


# --------------------------------------------------------------------------------------------
# Helpers for the op modules
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
    import importlib
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
