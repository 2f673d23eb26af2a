"""Benchmark cases for the block-diagonal scan ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``.

Shapes: x (B, T, G, b), A (B, T, G, b, b); G blocks of size b x b.

Implementations:

* ``linrec.<backend>`` for every backend of ``linrec.block_diagonal_scan``;
* ``torch_loop``: the per-step batched matrix-vector loop (fp32 state);
* ``torch_logscan``: a log-depth (Hillis-Steele) scan in PyTorch over pairs (A, x): log2(T)
  rounds, each composing every step with the one ``offset`` before it by batched matmuls;
  O(T b^3 log T) work but only log2(T) launches of large kernels.

Work model. Bytes: forward reads A and x and writes h, ``B T G (b^2 + 2 b)`` elements; the
backward reads A, h, dh and writes dA, dx, ``B T G (2 b^2 + 3 b)``; forward+backward is the
sum. FLOPs: the sequential recurrence's ``2 b^2`` per block and step (a matrix-vector
product), 2x for the backward (A^T g and the outer product g h^T).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

import linrec

from .common import Impl, OpSpec, Point, Target, cap_steps, linrec_backend_impls

def make_inputs(point: Point, dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """A_t = 0.9 * (a random orthogonal-ish matrix): ``N(0, 1/b)`` entries scaled so the
    recurrence neither blows up nor dies out over long T; x ~ N(0, 1)."""
    B, T, G, b = (point.dims[k] for k in ("B", "T", "G", "b"))
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn((B, T, G, b, b), generator=gen, device=device) * (0.9 / (2 * b) ** 0.5)
    x = torch.randn((B, T, G, b), generator=gen, device=device)
    return {"A": A.to(dtype), "x": x.to(dtype)}


def steps(point: Point) -> int:
    return point.dims["T"]


def bytes_moved(point: Point, mode: str, dtype: torch.dtype) -> float:
    B, T, G, b = (point.dims[k] for k in ("B", "T", "G", "b"))
    es = torch.empty((), dtype=dtype).element_size()
    fwd = B * T * G * (b * b + 2 * b) * es
    bwd = B * T * G * (2 * b * b + 3 * b) * es
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def flops(point: Point, mode: str) -> Optional[float]:
    B, T, G, b = (point.dims[k] for k in ("B", "T", "G", "b"))
    f = 2 * B * T * G * b * b
    return {"fwd": f, "bwd": 2 * f, "fwdbwd": 3 * f}[mode]


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


def _linrec(backend: str):
    def build(inputs, point, mode):
        def fn(A, x):
            return linrec.block_diagonal_scan(A, x, backend=backend)
        return fn, [inputs["A"], inputs["x"]]
    return build


def torch_loop(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-step loop: ``h = A_t @ h + x_t`` as one batched matmul per step, fp32 state."""
    h = torch.zeros_like(x[:, 0], dtype=torch.float32)
    outs = []
    for A_t, x_t in zip(A.unbind(1), x.unbind(1)):  # unbind once: linear-time autograd (see diagonal.py)
        h = torch.matmul(A_t.float(), h.unsqueeze(-1)).squeeze(-1) + x_t.float()
        outs.append(h)
    return torch.stack(outs, dim=1).to(x.dtype)


def torch_logscan(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-depth inclusive scan over time of the affine maps ``h -> A_t h + x_t`` (fp32).

    After the round with offset d, element t holds the composition of steps t-2d+1 .. t
    (clipped at 0): ``(A_t, x_t) <- (A_t A_{t-d}, A_t x_{t-d} + x_t)`` for t >= d. Since the
    initial state is zero, the x part of the final composition is h_t. Built with ``cat``
    (no in-place writes) so autograd differentiates it.
    """
    P, h = A.float(), x.float()
    T = x.shape[1]
    d = 1
    while d < T:
        later_P, earlier_P = P[:, d:], P[:, :-d]
        h = torch.cat([h[:, :d], torch.matmul(later_P, h[:, :-d].unsqueeze(-1)).squeeze(-1) + h[:, d:]], dim=1)
        if 2 * d < T:  # the matrices are only needed by later rounds
            P = torch.cat([P[:, :d], torch.matmul(later_P, earlier_P)], dim=1)
        d *= 2
    return h.to(x.dtype)


def _build(fn):
    def build(inputs, point, mode):
        return fn, [inputs["A"], inputs["x"]]
    return build


def impls(device: torch.device) -> Tuple[List[Impl], List[str]]:
    """Every implementation to try on ``device``, and one-line notes for those left out."""
    out, notes = linrec_backend_impls(
        "block-diagonal", "block_diagonal_scan", device,
        probe=lambda backend: linrec.block_diagonal_scan(0.5 * torch.eye(2, device=device).expand(1, 2, 1, 2, 2),
                                                         torch.ones(1, 2, 1, 2, device=device), backend=backend),
        build=_linrec, reference_refuse=cap_steps(lambda p: p.dims["B"] * p.dims["T"], cpu=4096, cuda=4096,
                                                  what="reference (a Python loop over B x T)"))
    out.append(Impl("torch_loop", "baseline", _build(torch_loop), cap_steps(steps, cpu=4096, cuda=8192)))
    out.append(Impl("torch_logscan", "baseline", _build(torch_logscan)))
    return out, notes


# ---------------------------------------------------------------------------------------------
# Sweeps and targets
# ---------------------------------------------------------------------------------------------


def _dims(B, T, G, b):
    return {"B": B, "T": T, "G": G, "b": b}


def sweeps(preset: str, device: torch.device) -> List[Point]:
    """The points of a preset (see ``bench/diagonal.py``)."""
    pts: List[Point] = []
    if preset == "tiny":
        for T in (16, 32):
            pts.append(Point("seqlen", "T", _dims(1, T, 2, 2), ("fwd", "fwdbwd"), ("fp32",)))
        pts.append(Point("blocksize", "b", _dims(1, 16, 1, 4), ("fwd",), ("fp32",)))
    elif preset == "quick":
        for T in (128, 512):
            pts.append(Point("seqlen", "T", _dims(2, T, 16, 4), ("fwd", "fwdbwd"), ("fp32",)))
        for b in (2, 4, 8):
            pts.append(Point("blocksize", "b", _dims(2, 128, 64 // b, b), ("fwd",), ("fp32",)))
    elif preset == "cpu-target":
        pts.append(Point("cpu-target", "T", _dims(8, 4096, 64, 4), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "full":
        for e in range(9, 16):  # T = 512 .. 32768 at B=8, 64 blocks of 4 (width 256)
            pts.append(Point("seqlen", "T", _dims(8, 2 ** e, 64, 4), ("fwd", "bwd", "fwdbwd"), ("fp32", "bf16")))
        for b in (1, 2, 4, 8, 16, 32, 64):  # width G * b = 256
            pts.append(Point("blocksize", "b", _dims(8, 4096, 256 // b, b), ("fwd", "bwd", "fwdbwd"), ("fp32",)))
        for B in (1, 4, 16, 32):
            pts.append(Point("batch", "B", _dims(B, 4096, 64, 4), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "gpu-target":  # the blocksize points of the goals: b <= 4, and b = 4 at T = 4096
        for b in (1, 2, 4):
            pts.append(Point("blocksize", "b", _dims(8, 4096, 256 // b, b), ("fwd", "bwd", "fwdbwd"), ("fp32",)))
    else:
        raise ValueError(f"unknown preset {preset!r}")
    return pts


def targets() -> List[Target]:
    """>= 10x the per-step loop at b = 4, T = 4096; >= 50% of copy bandwidth for b <= 4."""
    gpu = ("linrec.cuda", "linrec.triton")

    def at_b4_t4096(mode):
        return lambda r: (r["op"] == "block-diagonal" and r["mode"] == mode and int(r["b"]) == 4
                          and int(r["T"]) == 4096)

    def small_blocks(mode):
        return lambda r: (r["op"] == "block-diagonal" and r["mode"] == mode and r["dtype"] == "fp32"
                          and r["sweep"] == "blocksize" and int(r["b"]) <= 4)

    return [
        Target("block-diagonal fwd, b=4 T=4096 vs per-step loop", "speedup", gpu, 10.0, at_b4_t4096("fwd"),
               ("torch_loop",)),
        Target("block-diagonal fwd+bwd, b=4 T=4096 vs per-step loop", "speedup", gpu, 10.0,
               at_b4_t4096("fwdbwd"), ("torch_loop",)),
        Target("block-diagonal fwd, b<=4 (T=4096, width 256, B=8): fraction of copy bandwidth", "bandwidth",
               gpu, 0.5, small_blocks("fwd")),
        Target("block-diagonal bwd, b<=4 (T=4096, width 256, B=8): fraction of copy bandwidth", "bandwidth",
               gpu, 0.5, small_blocks("bwd")),
        Target("block-diagonal fwd, b=4 T=4096: torch backend vs per-step loop", "speedup", ("linrec.torch",),
               1.0, lambda r: at_b4_t4096("fwd")(r) and r["sweep"] == "cpu-target", ("torch_loop",)),
        Target("block-diagonal fwd, b=4 B=8 T=4096 G=64 fp32: cpp backend vs torch backend", "speedup",
               ("linrec.cpp",), 5.0, lambda r: at_b4_t4096("fwd")(r) and r["sweep"] == "cpu-target",
               ("linrec.torch",)),
        Target("block-diagonal fwd+bwd, b=4 B=8 T=4096 G=64 fp32: cpp backend vs torch backend", "speedup",
               ("linrec.cpp",), 5.0, lambda r: at_b4_t4096("fwdbwd")(r) and r["sweep"] == "cpu-target",
               ("linrec.torch",)),
    ]


OP = OpSpec(name="block-diagonal", make_inputs=make_inputs, impls=impls, bytes_moved=bytes_moved, flops=flops,
            sweeps=sweeps, targets=targets)
