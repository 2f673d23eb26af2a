"""Benchmark cases for the diagonal scan ``h_t = a_t * h_{t-1} + x_t``, (B, T, D).

Implementations:

* ``linrec.<backend>`` for every backend of ``linrec.diagonal_scan`` (cuda, triton, torch,
  reference); the reference is a Python loop and only runs at small sizes;
* ``torch_loop``: the plain per-step PyTorch loop a user would write (fp32 accumulation);
* ``torch.associative_scan``: PyTorch's higher-order associative scan over (a, x) pairs
  (``combine_mode="pointwise"`` on CUDA, ``"generic"`` elsewhere);
* ``accelerated_scan.warp`` / ``accelerated_scan.triton`` when installed (layout (B, D, T),
  T a power of two; the transpose is done outside the timed region);
* ``fla.chunk_hgrn`` when flash-linear-attention is installed (log gates g = log a, a > 0);
* ``elementwise_floor`` (cpu-target sweep, forward only): not a scan, one fused ``x + a * x``
  (``torch.addcmul``) into a fresh tensor of the inputs' dtype (complex for complex64). It
  moves the bytes every forward scan must move (read a, x; write h, including the page faults
  of a new output when the allocator maps fresh memory), so its time bounds what any scan can
  reach at that shape. Its output is PyTorch's: 4 KiB pages.
* ``elementwise_floor_thp`` (likewise): the same op into a fresh output on transparent huge pages
  (``MADV_HUGEPAGE`` on the buffer's 2 MiB-aligned interior before first touch), as the cpp
  backend maps a new large output (``OutputCache`` in csrc/cpu/common.h): the like-for-like floor
  of the cpp backend with its output cache off (``LINREC_CPP_CACHE_MB=0``); with
  ``LINREC_CPP_HUGEPAGES=0`` as well, the cpp backend uses 4 KiB pages and ``elementwise_floor``
  is its like-for-like floor.
* ``elementwise_floor_warm`` (likewise): the same op into one output allocated and touched once,
  when the point is built, and written again by every call (``out=``): no page faults at all,
  only the traffic. The like-for-like floor of the cpp backend with its output cache on (the
  default), whose large outputs reuse freed, already-mapped blocks in a loop of equal calls.

Bytes (the minimum that must move, each tensor once): forward reads a, x and writes h (3N
elements); backward reads a, h, dh and writes da, dx (5N); forward+backward is the sum (8N).

Dtypes: fp32, bf16, fp16 and complex64 (a and x complex, as in LRU / S4D); the cpu-target point
runs fp32, bf16 and complex64, each against its own elementwise floor (issue 20).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

import linrec

from .common import (Impl, OpSpec, Point, Skip, Target, both, cap_steps, linrec_backend_impls, needs_cuda,
                     optional_import)

def make_inputs(point: Point, dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """a, x: (B, T, D) of ``dtype``. Real: a in [0.5, 1) (positive, so log-gate baselines apply; a
    decaying, stable recurrence), x ~ N(0, 1). Complex (complex64): a = r e^{i theta} with r in
    [0.5, 1) and theta uniform in [0, 2 pi) (a stable rotation-decay, as in LRU), x ~ CN(0, 1)."""
    B, T, D = point.dims["B"], point.dims["T"], point.dims["D"]
    gen = torch.Generator(device=device).manual_seed(0)
    r = 0.5 + 0.5 * torch.rand((B, T, D), generator=gen, device=device)
    if dtype.is_complex:
        theta = 2 * torch.pi * torch.rand((B, T, D), generator=gen, device=device)
        a = torch.polar(r, theta).to(dtype)
        x = torch.randn((B, T, D), generator=gen, device=device, dtype=dtype)
    else:
        a = r.to(dtype)
        x = torch.randn((B, T, D), generator=gen, device=device).to(dtype)
    return {"a": a, "x": x}


def steps(point: Point) -> int:
    return point.dims["T"]


def bytes_moved(point: Point, mode: str, dtype: torch.dtype) -> float:
    n = point.dims["B"] * point.dims["T"] * point.dims["D"]
    es = torch.empty((), dtype=dtype).element_size()
    return {"fwd": 3, "bwd": 5, "fwdbwd": 8}[mode] * n * es


def flops(point: Point, mode: str) -> Optional[float]:
    return None  # two flops per element: bandwidth, not compute, is what matters


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def _linrec(backend: str):
    def build(inputs, point, mode):
        def fn(a, x):
            return linrec.diagonal_scan(a, x, backend=backend)
        return fn, [inputs["a"], inputs["x"]]
    return build


def torch_loop(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain per-step loop: fp32 state, one multiply-add per step, outputs stacked.

    The inputs are split with ``unbind`` once: indexing ``a[:, t]`` inside the loop would make
    autograd scatter every step's gradient into a full-size zero tensor, a backward that grows
    as T^2 (seconds at T = 1024) and would flatter every other implementation.
    """
    acc = torch.complex64 if x.is_complex() else torch.float32
    h = torch.zeros_like(x[:, 0], dtype=acc)
    outs = []
    for a_t, x_t in zip(a.unbind(1), x.unbind(1)):
        h = a_t.to(acc) * h + x_t.to(acc)
        outs.append(h)
    return torch.stack(outs, dim=1).to(x.dtype)


def _build_loop(inputs, point, mode):
    return torch_loop, [inputs["a"], inputs["x"]]


def _addcmul_floor(inputs, mode, output=None):
    """The elementwise floors' closure: ``x + a * x`` in one ``torch.addcmul``, into a fresh PyTorch
    tensor (``output`` None) or into ``output(x)`` (``out=``). Forward only: autograd of addcmul is
    several ops, no bound on a backward."""
    if mode != "fwd":
        raise Skip("elementwise_floor bounds the forward only")

    def fn(a, x):
        return torch.addcmul(x, a, x) if output is None else torch.addcmul(x, a, x, out=output(x))
    return fn, [inputs["a"], inputs["x"]]


def _build_elementwise_floor(inputs, point, mode):
    return _addcmul_floor(inputs, mode)


def _build_elementwise_floor_warm(inputs, point, mode):
    out = torch.zeros_like(inputs["x"], memory_format=torch.contiguous_format)  # mapped and touched now
    return _addcmul_floor(inputs, mode, lambda x: out)


_MADV_HUGEPAGE = 14          # <linux/mman.h>
_HUGE_PAGE = 2 << 20         # 2 MiB: the x86-64 transparent huge page
_HUGEPAGE_MIN_BYTES = 8 << 20  # kLargeOutputBytes in csrc/cpu/common.h


def _libc_madvise():
    """libc's ``madvise`` through ctypes, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def empty_hugepages(like: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(like)`` (CPU, contiguous) with the buffer's 2 MiB-aligned interior
    advised ``MADV_HUGEPAGE`` before anything touches it: how the cpp backend maps a new output of
    8 MiB or more (csrc/cpu/common.h, ``OutputCache``; it maps 2 MiB-aligned blocks, so its ends
    are huge pages too). With transparent huge pages in ``madvise`` mode the first write then
    faults 2 MiB pages instead of 4 KiB ones; elsewhere it is a no-op hint."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    madvise = _libc_madvise()
    if madvise is not None and nbytes >= _HUGEPAGE_MIN_BYTES:
        p = out.data_ptr()
        start = (p + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (p + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return out


def _build_elementwise_floor_thp(inputs, point, mode):
    if mode == "fwd" and (inputs["x"].device.type != "cpu" or _libc_madvise() is None):
        raise Skip("elementwise_floor_thp: huge-page advice needs Linux and CPU tensors")
    return _addcmul_floor(inputs, mode, empty_hugepages)


def _cpu_target_only(point: Point, device: torch.device) -> Optional[str]:
    return None if point.sweep == "cpu-target" else "elementwise_floor only runs in the cpu-target sweep"


def _combine(left, right):
    """(a1, x1) then (a2, x2) = (a2 a1, a2 x1 + x2): composing two affine steps."""
    a1, x1 = left
    a2, x2 = right
    return a2 * a1, a2 * x1 + x2


def _build_associative_scan(inputs, point, mode):
    try:
        from torch._higher_order_ops.associative_scan import associative_scan
    except ImportError as exc:
        raise Skip(f"torch._higher_order_ops.associative_scan not available ({exc})") from None
    combine_mode = "pointwise" if inputs["x"].is_cuda else "generic"

    def fn(a, x):
        return associative_scan(_combine, (a, x), dim=1, combine_mode=combine_mode)[1]
    return fn, [inputs["a"], inputs["x"]]


#: Environment switch for peer kernels known to access memory out of bounds at some points.
UNSAFE_PEER_POINTS = "LINREC_BENCH_UNSAFE_PEER_POINTS"


def _build_accelerated_scan(module_name: str):
    def build(inputs, point, mode):
        mod, why = optional_import(module_name)
        if mod is None:
            raise Skip(why)
        if inputs["x"].is_complex():
            raise Skip(f"{module_name} takes real inputs only")
        T = point.dims["T"]
        if T & (T - 1) or T < 32:
            raise Skip(f"{module_name} needs T a power of two >= 32, got {T}")
        if (module_name == "accelerated_scan.warp" and inputs["x"].dtype == torch.bfloat16 and T >= 4096
                and os.environ.get(UNSAFE_PEER_POINTS) != "1"):
            # warp.cuh's AlignedTuple<bf16, 4> is 16-byte aligned around 8 bytes of data: for
            # T >= 4096 the kernel reads and writes twice the span, out of bounds, which can take
            # the whole process down. gpu.sh runs these points last, in their own process.
            raise Skip(f"{module_name} bf16 at T >= 4096 accesses memory out of bounds; "
                       f"set {UNSAFE_PEER_POINTS}=1 to run it (bench/gpu.sh does, in a process of its own)")
        # Layout (B, D, T), contiguous: converted once, outside the timed region.
        gates = inputs["a"].transpose(1, 2).contiguous()
        tokens = inputs["x"].transpose(1, 2).contiguous()
        return mod.scan, [gates, tokens]
    return build


def _build_fla_hgrn(inputs, point, mode):
    mod, why = optional_import("fla.ops.hgrn")
    if mod is None:
        raise Skip(why)
    if inputs["x"].is_complex():
        raise Skip("fla.chunk_hgrn takes real gates only")
    g = torch.log(inputs["a"].float()).to(inputs["a"].dtype)  # h_t = exp(g_t) h_{t-1} + x_t

    def fn(x, g):
        return mod.chunk_hgrn(x, g)[0]
    return fn, [inputs["x"], g]


def _seqlen_sweep_only(point: Point, device: torch.device) -> Optional[str]:
    """associative_scan compiles itself per shape on CUDA (seconds each): keep it to one sweep."""
    if device.type == "cuda" and point.sweep != "seqlen":
        return "associative_scan (compiled per shape) only runs in the seqlen sweep on CUDA"
    return None


def impls(device: torch.device) -> Tuple[List[Impl], List[str]]:
    """Every implementation to try on ``device``, and one-line notes for those left out."""
    out, notes = linrec_backend_impls(
        "diagonal", "diagonal_scan", device,
        probe=lambda backend: linrec.diagonal_scan(torch.ones(1, 2, 1, device=device),
                                                   torch.ones(1, 2, 1, device=device), backend=backend),
        build=_linrec, reference_refuse=cap_steps(lambda p: p.dims["B"] * p.dims["T"], cpu=8192, cuda=8192,
                                                  what="reference (a Python loop over B x T)"))
    out.append(Impl("torch_loop", "baseline", _build_loop, cap_steps(steps, cpu=4096, cuda=8192)))
    out.append(Impl("elementwise_floor", "baseline", _build_elementwise_floor, _cpu_target_only))
    out.append(Impl("elementwise_floor_thp", "baseline", _build_elementwise_floor_thp, _cpu_target_only))
    out.append(Impl("elementwise_floor_warm", "baseline", _build_elementwise_floor_warm, _cpu_target_only))
    out.append(Impl("torch.associative_scan", "baseline", _build_associative_scan,
                    both(cap_steps(steps, cpu=1024, cuda=1 << 20, what="generic associative_scan"),
                         _seqlen_sweep_only)))
    for name in ("accelerated_scan.warp", "accelerated_scan.triton"):
        if optional_import(name)[0] is None:
            notes.append(f"diagonal: baseline {name} skipped: not installed")
        else:
            out.append(Impl(name, "baseline", _build_accelerated_scan(name), needs_cuda(name)))
    if optional_import("fla.ops.hgrn")[0] is None:
        notes.append("diagonal: baseline fla.chunk_hgrn skipped: flash-linear-attention not installed")
    else:
        out.append(Impl("fla.chunk_hgrn", "baseline", _build_fla_hgrn, needs_cuda("fla.chunk_hgrn")))
    return out, notes


# ---------------------------------------------------------------------------------------------
# Sweeps and targets
# ---------------------------------------------------------------------------------------------


#: The dtypes of issue 20's CPU targets, each against its own elementwise floor.
CPU_TARGET_DTYPES = ("fp32", "bf16", "complex64")


def sweeps(preset: str, device: torch.device) -> List[Point]:
    """The points of a preset: ``tiny`` (tests), ``quick`` (seconds on a CPU), ``full`` (GPU),
    ``cpu-target`` (the B=8, T=4096, D=512 CPU comparison of the diagonal issue, fp32, bf16 and
    complex64),
    ``gpu-target`` (only the points the GPU goals of ``targets()`` are judged on: minutes, for a
    short GPU lease; the other ops' presets of these names mean the same)."""
    pts: List[Point] = []
    if preset == "tiny":
        for T in (32, 64):
            pts.append(Point("seqlen", "T", {"B": 2, "T": T, "D": 16}, ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "quick":
        for T in (128, 512, 2048):
            modes = ("fwd", "fwdbwd") if T <= 512 else ("fwd",)
            pts.append(Point("seqlen", "T", {"B": 2, "T": T, "D": 64}, modes, ("fp32",)))
    elif preset == "cpu-target":
        pts.append(Point("cpu-target", "T", {"B": 8, "T": 4096, "D": 512}, ("fwd", "bwd", "fwdbwd"),
                         CPU_TARGET_DTYPES))
    elif preset == "full":
        for e in range(9, 17):  # T = 512 .. 65536 at B=8, D=1024: up to 2^29 elements
            pts.append(Point("seqlen", "T", {"B": 8, "T": 2 ** e, "D": 1024}, ("fwd", "bwd", "fwdbwd"),
                             ("fp32", "bf16")))
        for e in range(6, 14):  # D = 64 .. 8192 at B=8, T=4096
            pts.append(Point("width", "D", {"B": 8, "T": 4096, "D": 2 ** e}, ("fwd", "bwd"), ("fp32",)))
        for B in (1, 4, 16, 64):
            pts.append(Point("batch", "B", {"B": B, "T": 4096, "D": 1024}, ("fwd", "bwd"), ("fp32",)))
        pts.append(Point("cpu-target", "T", {"B": 8, "T": 4096, "D": 512}, ("fwd", "bwd", "fwdbwd"), ("fp32",)))
    elif preset == "gpu-target":  # the fewest points that measure every GPU goal of targets() (one lease)
        for e in (13, 15):  # 2^26 and 2^28 elements at B=8, D=1024 (not "seqlen": no associative_scan)
            pts.append(Point("target", "T", {"B": 8, "T": 2 ** e, "D": 1024}, ("fwd", "bwd", "fwdbwd"),
                             ("fp32", "bf16")))
    else:
        raise ValueError(f"unknown preset {preset!r}")
    return pts


def _elements(r: Dict[str, Any]) -> float:
    return float(r["B"]) * float(r["T"]) * float(r["D"])


def targets() -> List[Target]:
    """The diagonal issue's goals (GPU ones are only measured on a GPU)."""
    gpu = ("linrec.cuda", "linrec.triton")
    big = lambda r, mode: r["op"] == "diagonal" and r["mode"] == mode and r["dtype"] == "fp32" \
        and _elements(r) >= 2 ** 26  # noqa: E731
    large = lambda r, mode: r["op"] == "diagonal" and r["mode"] == mode and _elements(r) >= 2 ** 24  # noqa: E731
    cpu_target = lambda r, mode: r["op"] == "diagonal" and r["sweep"] == "cpu-target" and r["mode"] == mode \
        and r["dtype"] == "fp32"  # noqa: E731
    return [
        Target("diagonal fwd, >= 2^26 elements, fp32: fraction of copy bandwidth", "bandwidth", gpu, 0.85,
               lambda r: big(r, "fwd")),
        Target("diagonal bwd, >= 2^26 elements, fp32: fraction of copy bandwidth", "bandwidth", gpu, 0.75,
               lambda r: big(r, "bwd")),
        Target("diagonal fwd vs accelerated-scan (>= 2^24 elements)", "speedup", gpu, 1.2,
               lambda r: large(r, "fwd"), ("accelerated_scan.warp", "accelerated_scan.triton")),
        Target("diagonal fwd+bwd vs accelerated-scan (>= 2^24 elements)", "speedup", gpu, 1.2,
               lambda r: large(r, "fwdbwd"), ("accelerated_scan.warp", "accelerated_scan.triton")),
        Target("diagonal fwd vs fla chunk_hgrn (>= 2^24 elements)", "speedup", gpu, 5.0,
               lambda r: large(r, "fwd"), ("fla.chunk_hgrn",)),
        Target("diagonal fwd+bwd vs fla chunk_hgrn (>= 2^24 elements)", "speedup", gpu, 5.0,
               lambda r: large(r, "fwdbwd"), ("fla.chunk_hgrn",)),
        Target("diagonal fwd, B=8 T=4096 D=512 fp32: torch backend vs per-step loop", "speedup",
               ("linrec.torch",), 5.0, lambda r: cpu_target(r, "fwd"), ("torch_loop",)),
        Target("diagonal fwd+bwd, B=8 T=4096 D=512 fp32: torch backend vs per-step loop", "speedup",
               ("linrec.torch",), 5.0, lambda r: cpu_target(r, "fwdbwd"), ("torch_loop",)),
    ] + cpu_floor_targets() + [
        # Not a goal of ours but the bound on the cpp ones: no scan can beat one elementwise op.
        Target("bound: one elementwise op (no scan) vs per-step loop, B=8 T=4096 D=512 fp32 fwd", "speedup",
               ("elementwise_floor",), 5.0, lambda r: cpu_target(r, "fwd"), ("torch_loop",)),
    ]


#: Issue 20: the cpp forward within 1.3x of the elementwise floor's time; forward + backward
#: within 1.3 x 8/3 of it (8 units of N move, a, x, h then a, h, dh, dx, da, against the floor's 3).
CPU_FLOOR_GOALS = {"fwd": 1.3, "fwdbwd": 1.3 * 8 / 3}


def cpu_floor_targets(hugepages: Optional[str] = None, output_cache: Optional[str] = None) -> List[Target]:
    """Issue 20's CPU targets at the cpu-target point, one per (dtype, mode, floor).

    The cpp backend's time over an elementwise floor's forward time (same dtype): at most 1.3 for
    the forward, 1.3 x 8/3 for forward + backward. Two floors: the like-for-like one, whose output
    memory is handled as the cpp backend's is in this process (``hugepages`` / ``output_cache``:
    "on" / "off", by default read from the environment as the C++ side reads it):

    * output cache on (the default): ``elementwise_floor_warm``, an output mapped once and
      rewritten (the cpp backend's large outputs reuse freed blocks: neither pays page faults);
    * cache off, huge pages on: ``elementwise_floor_thp`` (both fault fresh 2 MiB pages);
    * both off: ``elementwise_floor`` (both fault fresh 4 KiB pages);

    and PyTorch's own ``elementwise_floor`` (a fresh tensor on 4 KiB pages: the issue's literal
    floor, which the cpp backend's cheaper or absent page faults flatter) where it is not already
    the like-for-like one.
    """
    from .common import cpp_hugepages, cpp_output_cache
    pages = hugepages or cpp_hugepages()
    cache = output_cache or cpp_output_cache()
    if cache == "on":
        floors = [("elementwise_floor_warm", "like for like: both write memory mapped already")]
    elif pages == "on":
        floors = [("elementwise_floor_thp", "like for like: both on fresh huge pages")]
    else:
        floors = [("elementwise_floor", "like for like: both on fresh 4 KiB pages")]
    if floors[0][0] != "elementwise_floor":
        floors.append(("elementwise_floor", "PyTorch's fresh 4 KiB-page floor"))
    out = []
    for dtype in CPU_TARGET_DTYPES:
        for mode, goal in CPU_FLOOR_GOALS.items():
            for floor, how in floors:
                def where(r, dtype=dtype, mode=mode):
                    if r["op"] != "diagonal" or r["sweep"] != "cpu-target" or r["dtype"] != dtype:
                        return False
                    return r["mode"] == ("fwd" if r["impl"].startswith("elementwise_floor") else mode)
                what = "fwd" if mode == "fwd" else "fwd+bwd"
                out.append(Target(f"diagonal {what} B=8 T=4096 D=512 {dtype}: cpp <= {goal:.3g}x the floor's fwd "
                                  f"({how})", "time_ratio", ("linrec.cpp",), goal, where, (floor,),
                                  baseline_mode="fwd"))
    return out


OP = OpSpec(name="diagonal", make_inputs=make_inputs, impls=impls, bytes_moved=bytes_moved, flops=flops,
            sweeps=sweeps, targets=targets)
