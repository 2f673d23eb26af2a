"""Benchmark cases for the selective scan (Mamba): a diagonal recurrence with an N-fold state.

Shapes: x, delta (B, T, D); A (D, N); B, C (B, T, N); D (D,). Per channel d and state n::

    dt = softplus(delta)
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]

Implementations:

* ``linrec.<backend>`` for every backend of ``linrec.selective_scan``;
* ``expanded_diagonal``: what one can do without a selective-scan kernel: materialise the
  expanded coefficients and inputs, (B, T, D * N) each, run ``linrec.diagonal_scan`` on them
  (its fastest backend here) and contract the states with C. N times the memory and traffic;
* ``torch_loop``: the per-step loop with a (B, D, N) fp32 state.

Work model. Bytes: the minimum a fused kernel must move, the expanded state never in memory:
the forward reads x, delta, B, C and writes y, ``B T (2 D + 2 N)`` elements (A and D are
(D, N) and (D,), negligible); the backward reads those and dy and writes dx, ddelta, dB, dC,
``B T (5 D + 4 N)``. FLOPs: about 7 per (step, channel, state) forward (exp, two multiplies for
the update, the read-out multiply-add), twice that backward.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import linrec

from .common import Impl, OpSpec, Point, cap_steps, linrec_backend_impls


def make_inputs(point: Point, dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """Mamba's ranges: A = -[1..N] per channel, delta around softplus^-1(0.01..0.1), x, B, C ~ N(0, 1)."""
    B, T, D, N = (point.dims[k] for k in ("B", "T", "D", "N"))
    gen = torch.Generator(device=device).manual_seed(0)
    A = -torch.arange(1, N + 1, dtype=torch.float32, device=device).expand(D, N).contiguous()
    delta = torch.rand((B, T, D), generator=gen, device=device) * 2.0 - 4.0  # softplus: 0.02 .. 0.13
    x = torch.randn((B, T, D), generator=gen, device=device)
    Bm = torch.randn((B, T, N), generator=gen, device=device)
    C = torch.randn((B, T, N), generator=gen, device=device)
    skip = torch.ones(D, device=device)
    return {"x": x.to(dtype), "delta": delta.to(dtype), "A": A, "B": Bm.to(dtype), "C": C.to(dtype), "D": skip}


def steps(point: Point) -> int:
    return point.dims["T"]


def bytes_moved(point: Point, mode: str, dtype: torch.dtype) -> float:
    B, T, D, N = (point.dims[k] for k in ("B", "T", "D", "N"))
    es = torch.empty((), dtype=dtype).element_size()
    fwd = B * T * (2 * D + 2 * N) * es
    bwd = B * T * (5 * D + 4 * N) * es
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def flops(point: Point, mode: str) -> Optional[float]:
    B, T, D, N = (point.dims[k] for k in ("B", "T", "D", "N"))
    f = 7 * B * T * D * N
    return {"fwd": f, "bwd": 2 * f, "fwdbwd": 3 * f}[mode]


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

LEAVES = ("x", "delta", "A", "B", "C", "D")


def _leaves(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    return [inputs[name] for name in LEAVES]


def _linrec(backend: str):
    def build(inputs, point, mode):
        def fn(x, delta, A, Bm, C, D):
            return linrec.selective_scan(x, delta, A, Bm, C, D, delta_softplus=True, backend=backend)[0]
        return fn, _leaves(inputs)
    return build


def expanded_diagonal(x, delta, A, Bm, C, D):
    """The selective scan through ``linrec.diagonal_scan`` on the materialised (B, T, D * N) state."""
    dt = F.softplus(delta.float())                                            # (B, T, D)
    abar = torch.exp(dt[..., None] * A.float())                               # (B, T, D, N)
    u = (dt * x.float())[..., None] * Bm.float()[:, :, None, :]               # (B, T, D, N)
    Bsz, T, Dn, N = abar.shape
    h = linrec.diagonal_scan(abar.reshape(Bsz, T, Dn * N), u.reshape(Bsz, T, Dn * N)).view(Bsz, T, Dn, N)
    y = torch.einsum("btdn,btn->btd", h, C.float()) + D.float() * x.float()
    return y.to(x.dtype)


def torch_loop(x, delta, A, Bm, C, D):
    """Per-step loop with a (B, D, N) fp32 state; unbind once for linear-time autograd."""
    dt = F.softplus(delta.float())
    h = x.new_zeros((x.shape[0], x.shape[2], A.shape[1]), dtype=torch.float32)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.float().unbind(1), dt.unbind(1), Bm.float().unbind(1), C.float().unbind(1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    return (torch.stack(ys, dim=1) + D * x.float()).to(x.dtype)


def _build(fn):
    def build(inputs, point, mode):
        return fn, _leaves(inputs)
    return build


def impls(device: torch.device) -> Tuple[List[Impl], List[str]]:
    """Every implementation to try on ``device``, and one-line notes for those left out."""
    def probe(backend):
        x = torch.ones(1, 2, 2, device=device)
        return linrec.selective_scan(x, x, -torch.ones(2, 2, device=device), torch.ones(1, 2, 2, device=device),
                                     torch.ones(1, 2, 2, device=device), backend=backend)

    out, notes = linrec_backend_impls(
        "selective", "selective_scan", device, probe=probe, build=_linrec,
        reference_refuse=cap_steps(lambda p: p.dims["B"] * p.dims["T"], cpu=2048, cuda=2048,
                                   what="reference (a Python loop over B x T)"))
    out.append(Impl("expanded_diagonal", "baseline", _build(expanded_diagonal)))
    out.append(Impl("torch_loop", "baseline", _build(torch_loop), cap_steps(steps, cpu=4096, cuda=8192)))
    return out, notes


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def _dims(B, T, D, N):
    return {"B": B, "T": T, "D": D, "N": N}


def sweeps(preset: str, device: torch.device) -> List[Point]:
    """The points of a preset (see ``bench/diagonal.py``)."""
    pts: List[Point] = []
    if preset == "tiny":
        for T in (16, 32):
            pts.append(Point("seqlen", "T", _dims(1, T, 4, 4), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "quick":
        for T in (128, 512):
            pts.append(Point("seqlen", "T", _dims(2, T, 64, 16), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "cpu-target":
        pts.append(Point("cpu-target", "T", _dims(2, 2048, 256, 16), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "full":
        for e in range(9, 15):  # T = 512 .. 16384 at Mamba-130M's width (D = 1536, N = 16)
            pts.append(Point("seqlen", "T", _dims(4, 2 ** e, 1536, 16), ("fwd", "bwd", "fwdbwd"), ("fp32", "bf16")))
        for N in (4, 8, 16, 32, 64):
            pts.append(Point("state", "N", _dims(4, 2048, 1536, N), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "gpu-target":
        pts.append(Point("seqlen", "T", _dims(4, 4096, 1536, 16), ("fwd", "bwd", "fwdbwd"), ("fp32", "bf16")))
    else:
        raise ValueError(f"unknown preset {preset!r}")
    return pts


OP = OpSpec(name="selective", make_inputs=make_inputs, impls=impls, bytes_moved=bytes_moved, flops=flops,
            sweeps=sweeps)
