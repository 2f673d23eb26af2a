"""Benchmark cases for the Householder-product scan (DeltaNet, Gated DeltaNet, (Gated) DeltaProduct).

Per head the state S is (K, V); per token, ``S <- alpha S``, then n rank-1 updates
``S <- S - beta k (k^T S) + beta k v^T``, and ``o = scale S^T q``. Shapes: q (B, T, H, K),
k (B, T, n, H, K) (4-D when n = 1), v (B, T, n, H, V), beta (B, T, n, H), log_gate (B, T, H).
Every case is gated (log_gate given), as in Gated DeltaNet / Gated DeltaProduct.

Implementations:

* ``linrec.<backend>`` for every backend of ``linrec.householder_scan``;
* ``torch_loop``: the per-token, per-factor loop in PyTorch (fp32 state), at small sizes only;
* ``fla.chunk_gated_delta_rule`` (n = 1) and ``fla.chunk_gated_delta_product`` (n >= 2) when
  flash-linear-attention is installed (interleaved (B, T*n, H, K) keys: ``k.flatten(1, 2)``,
  no copy; fla's product kernel accepts bf16/fp16 only).

Work model. Bytes: every input read once and o written (forward); the backward reads the inputs
and dO and writes one gradient per input; forward+backward is the sum. FLOPs are the *nominal*
count of the sequential recurrence per token and head, ``(4 n + 3) K V`` (gate K V, per factor
2 K V for k^T S and 2 K V for the rank-1 update, 2 K V for the read-out), with 2x for the
backward; chunked algorithms do more arithmetic than this, so TFLOP/s here is a lower bound
of the arithmetic really done and comparable across implementations.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import linrec

from .common import (Impl, OpSpec, Point, Skip, Target, both, cap_steps, linrec_backend_impls, needs_cuda,
                     optional_import)

def make_inputs(point: Point, dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """Unit-norm keys, beta in (0, 1), gates alpha = sigmoid(N(3, 1)) (close to 1), q and v ~ N(0, 1)."""
    B, T, H, K, V, n = (point.dims[k] for k in ("B", "T", "H", "K", "V", "n"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device)

    q = randn(B, T, H, K).to(dtype)
    k = F.normalize(randn(B, T, n, H, K), dim=-1).to(dtype)
    v = randn(B, T, n, H, V).to(dtype)
    beta = torch.sigmoid(randn(B, T, n, H)).to(dtype)
    log_gate = F.logsigmoid(randn(B, T, H) + 3.0).to(dtype)
    if n == 1:  # the n = 1 layout users of DeltaNet pass
        k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]
    return {"q": q, "k": k, "v": v, "beta": beta, "log_gate": log_gate}


def steps(point: Point) -> int:
    return point.dims["T"] * point.dims["n"]


def bytes_moved(point: Point, mode: str, dtype: torch.dtype) -> float:
    B, T, H, K, V, n = (point.dims[k] for k in ("B", "T", "H", "K", "V", "n"))
    es = torch.empty((), dtype=dtype).element_size()
    inputs = B * T * H * (K + n * K + n * V + n + 1)  # q, k, v, beta, log_gate
    out = B * T * H * V
    fwd = (inputs + out) * es
    bwd = (2 * inputs + out) * es  # read inputs and dO, write a gradient per input
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def flops(point: Point, mode: str) -> Optional[float]:
    B, T, H, K, V, n = (point.dims[k] for k in ("B", "T", "H", "K", "V", "n"))
    f = B * T * H * (4 * n + 3) * K * V
    return {"fwd": f, "bwd": 2 * f, "fwdbwd": 3 * f}[mode]


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

_ARGS = ("q", "k", "v", "beta", "log_gate")


def _linrec(backend: str):
    def build(inputs, point, mode):
        def fn(q, k, v, beta, log_gate):
            return linrec.householder_scan(q, k, v, beta, log_gate, backend=backend)[0]
        return fn, [inputs[a] for a in _ARGS]
    return build


def torch_loop(q, k, v, beta, log_gate, scale: Optional[float] = None) -> torch.Tensor:
    """The per-token, per-factor loop: fp32 state (B, H, K, V), outputs stacked."""
    if k.dim() == 4:  # n = 1 layout
        k, v, beta = k.unsqueeze(2), v.unsqueeze(2), beta.unsqueeze(2)
    B, T, n, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros((B, H, K, V), dtype=torch.float32)
    outs = []
    # unbind once: linear-time autograd (indexing inside the loop makes the backward T^2)
    steps = zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1), log_gate.unbind(1))
    for q_t, k_t, v_t, beta_t, g_t in steps:
        S = S * g_t.float().exp()[..., None, None]
        for kj, vj, bj in zip(k_t.unbind(1), v_t.unbind(1), beta_t.unbind(1)):
            kj, vj, bj = kj.float(), vj.float(), bj.float()
            kS = torch.einsum("bhk,bhkv->bhv", kj, S)                      # k^T S
            S = S + torch.einsum("bhk,bhv->bhkv", kj, bj[..., None] * (vj - kS))
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t.float()))
    return torch.stack(outs, dim=1).to(q.dtype)


def _build_loop(inputs, point, mode):
    return torch_loop, [inputs[a] for a in _ARGS]


def _loop_memory_rule(point: Point, device: torch.device) -> Optional[str]:
    """Autograd through the loop keeps ~3 states per step; refuse past 8 GiB (1 GiB on the CPU)."""
    B, T, H, K, V, n = (point.dims[k] for k in ("B", "T", "H", "K", "V", "n"))
    need = 3 * 4 * B * H * K * V * T * n
    cap = (8 << 30) if device.type == "cuda" else (1 << 30)
    return f"per-step autograd graph would need ~{need / 2**30:.1f} GiB" if need > cap else None


def _keywords(fn) -> Dict[str, Any]:
    """``head_first=False`` for fla versions that still take it (older ones default to True)."""
    try:
        return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


def _build_fla(inputs, point, mode):
    n = point.dims["n"]
    if n == 1:
        mod, why = optional_import("fla.ops.gated_delta_rule")
        if mod is None:
            raise Skip(why)
        extra = _keywords(mod.chunk_gated_delta_rule)

        def fn(q, k, v, beta, g):
            return mod.chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **extra)[0]
        return fn, [inputs[a] for a in _ARGS]
    mod, why = optional_import("fla.ops.gated_delta_product")
    if mod is None:
        raise Skip(why)

    def fn(q, k, v, beta, g):
        # fla takes the factors interleaved along time: (B, T*n, H, K), a view of (B, T, n, H, K).
        return mod.chunk_gated_delta_product(q=q, k=k.flatten(1, 2), v=v.flatten(1, 2), g=g,
                                             beta=beta.flatten(1, 2), num_householder=n)[0]
    return fn, [inputs[a] for a in _ARGS]


def _probe_inputs(device: torch.device):
    """q, k, v, beta of a minimal case: B = H = 1, T = 2, K = V = 2, n = 1."""
    q = torch.ones(1, 2, 1, 2, device=device)
    return q, torch.nn.functional.normalize(q, dim=-1), q.clone(), torch.full((1, 2, 1), 0.5, device=device)


def impls(device: torch.device) -> Tuple[List[Impl], List[str]]:
    """Every implementation to try on ``device``, and one-line notes for those left out."""
    out, notes = linrec_backend_impls(
        "householder", "householder_scan", device,
        probe=lambda backend: linrec.householder_scan(*_probe_inputs(device), backend=backend),
        build=_linrec, reference_refuse=cap_steps(lambda p: p.dims["B"] * p.dims["T"] * p.dims["n"], cpu=512,
                                                  cuda=1024, what="reference (a Python loop over B x T x n)"))
    out.append(Impl("torch_loop", "baseline", _build_loop,
                    both(cap_steps(steps, cpu=1024, cuda=4096), _loop_memory_rule)))
    if optional_import("fla.ops.gated_delta_rule")[0] is None:
        notes.append("householder: baselines fla.chunk_gated_delta_rule / chunk_gated_delta_product skipped: "
                     "flash-linear-attention not installed")
    else:
        out.append(Impl("fla", "baseline", _build_fla, needs_cuda("fla")))
    return out, notes


# ---------------------------------------------------------------------------------------------
# Sweeps and targets
# ---------------------------------------------------------------------------------------------

TARGET_SHAPES = ((8, 2048, 16, 128), (1, 8192, 32, 128), (4, 4096, 16, 64))  # (B, T, H, K = V)


def _dims(B, T, H, K, n):
    return {"B": B, "T": T, "H": H, "K": K, "V": K, "n": n}


def _target_points() -> List[Point]:
    """The issue's comparison with fla: each target shape for n = 1, 2, 3 factors."""
    return [Point(f"target-n{n}", "T", _dims(B, T, H, K, n), ("fwd", "fwdbwd"), ("bf16",))
            for n in (1, 2, 3) for B, T, H, K in TARGET_SHAPES]


def sweeps(preset: str, device: torch.device) -> List[Point]:
    """The points of a preset (see ``bench/diagonal.py``)."""
    pts: List[Point] = []
    if preset == "tiny":
        for T in (16, 32):
            pts.append(Point("seqlen", "T", _dims(1, T, 2, 8, 1), ("fwd", "fwdbwd"), ("fp32",)))
        pts.append(Point("factors", "n", _dims(1, 16, 2, 8, 2), ("fwd",), ("fp32",)))
    elif preset == "quick":
        for T in (32, 128):
            pts.append(Point("seqlen", "T", _dims(1, T, 4, 32, 1), ("fwd", "fwdbwd"), ("fp32",)))
        for n in (1, 2, 3):
            pts.append(Point("factors", "n", _dims(1, 32, 4, 32, n), ("fwd",), ("fp32",)))
    elif preset == "cpu-target":
        for n in (1, 2):
            pts.append(Point("cpu-target", "n", _dims(1, 512, 8, 64, n), ("fwd", "fwdbwd"), ("fp32",)))
    elif preset == "full":
        for e in range(8, 15):  # T = 256 .. 16384
            pts.append(Point("seqlen", "T", _dims(4, 2 ** e, 16, 64, 1), ("fwd", "bwd", "fwdbwd"),
                             ("bf16", "fp32")))
        for H in (4, 8, 16, 32, 64):
            pts.append(Point("heads", "H", _dims(4, 2048, H, 64, 1), ("fwd", "fwdbwd"), ("bf16",)))
        for K in (32, 64, 128, 256):
            pts.append(Point("headdim", "K", _dims(4, 2048, 16, K, 1), ("fwd", "fwdbwd"), ("bf16",)))
        for n in (1, 2, 3, 4):
            pts.append(Point("factors", "n", _dims(4, 2048, 16, 64, n), ("fwd", "fwdbwd"), ("bf16",)))
        pts.extend(_target_points())
    elif preset == "gpu-target":
        pts.extend(_target_points())
    else:
        raise ValueError(f"unknown preset {preset!r}")
    return pts


def targets() -> List[Target]:
    """fwd+bwd against fla at the issue's three shapes, per number of factors (goal: parity)."""
    gpu = ("linrec.cuda", "linrec.triton")
    out = []
    for n in (1, 2, 3):
        for B, T, H, K in TARGET_SHAPES:
            def where(r, n=n, B=B, T=T, H=H, K=K):
                return (r["op"] == "householder" and r["mode"] == "fwdbwd" and int(r["n"]) == n
                        and (int(r["B"]), int(r["T"]), int(r["H"]), int(r["K"])) == (B, T, H, K))
            out.append(Target(f"householder fwd+bwd n={n} (B,T,H,K=V)=({B},{T},{H},{K}) vs fla", "speedup",
                              gpu, 1.0, where, ("fla",)))
    return out


OP = OpSpec(name="householder", make_inputs=make_inputs, impls=impls, bytes_moved=bytes_moved, flops=flops,
            sweeps=sweeps, targets=targets)
