"""The compiled CPU backend: availability, the JIT build of ``csrc/cpu/`` and the launchers.

Nothing here runs at import time. The extension (one module, three C++ sources) is compiled
with ``torch.utils.cpp_extension.load`` (ninja, -O3) the first time it is used in a process,
into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
later processes find the cached build and only rebuild when a source or a flag changed. A
one-line message on stderr says when a build starts.

The build targets the vector width PyTorch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or the portable default) and uses
PyTorch's OpenMP for ``at::parallel_for``.

Environment variables:

* ``LINREC_DISABLE_CPP=1``: never build or use the CPU extension.
* ``LINREC_CPP_VERBOSE=1``: print the compiler's output while building.
* ``LINREC_CPP_CACHE_MB=N``: the output cache's limit in MiB (0: off; default an eighth of the
  physical memory, at most 4 GiB). Outputs of 8 MiB or more are mapped in 2 MiB-aligned blocks
  advised as transparent huge pages, and a freed one is kept for the next output of its size
  instead of being unmapped (``csrc/cpu/common.h``, ``OutputCache``): a fresh large output costs
  page faults (and, in a virtual machine, host faults) comparable to the scan itself.
  ``output_cache_info()``, ``empty_output_cache()`` and ``set_output_cache_limit()`` below.
* ``LINREC_CPP_HUGEPAGES=0``: no ``MADV_HUGEPAGE`` on those blocks (4 KiB pages).

Launchers (all tensors on the CPU; dtypes: float32 | bfloat16 | float16 | complex64 for the
diagonal scan, float32 | bfloat16 | float16 for the block-diagonal one, accumulation in fp32 /
complex64):

* ``diagonal_scan_forward(a, x, initial_state, *, cu_seqlens, reverse) -> h``
* ``diagonal_scan_backward(a, h, grad_h, initial_state, *, cu_seqlens, reverse) -> (grad_a, grad_x, grad_h0)``
* ``block_diagonal_scan_forward(A, x, initial_state, *, cu_seqlens, reverse) -> h``
* ``block_diagonal_scan_backward(A, h, grad_h, initial_state, *, cu_seqlens, reverse) -> (grad_A, grad_x, grad_h0)``
* ``householder_scan_forward(q, k, v, beta, log_gate, initial_state, *, cu_seqlens, scale) -> (o, final_state)``
* ``householder_scan_backward(q, k, v, beta, log_gate, initial_state, grad_o, grad_final, *, cu_seqlens, scale)
  -> (grad_q, grad_k, grad_v, grad_beta, grad_log_gate, grad_initial_state)`` (the Householder
  backends' FORWARD / BACKWARD tables in ``linrec.householder.op`` take them through
  ``without_saved`` / ``ignoring_saved``: they keep nothing for the backward), and
  ``householder_supports(q, ...)``: whether backend='auto' should run them for a call (T <= 8, or
  K <= 64 at any T).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import HOUSEHOLDER_RECURRENT_MAX_T, accumulation_dtype, sum_to_shape
from ._jit import BuildSpec, JitExtension, find_sources

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
BLOCK_DIAGONAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK = 16  # largest block size b of the block-diagonal kernels
SOURCES = ("binding.cpp", "diagonal.cpp", "block_diagonal.cpp", "householder.cpp")
HOUSEHOLDER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_JIT = JitExtension("CPU extension", disable_env="LINREC_DISABLE_CPP", verbose_env="LINREC_CPP_VERBOSE")


def _compiler() -> Optional[str]:
    """The C++ compiler ``torch.utils.cpp_extension`` would call (``$CXX``, else ``c++``), if found."""
    cxx = os.environ.get("CXX", "c++").split()
    return shutil.which(cxx[0]) if cxx else None


def _probe() -> Optional[str]:
    """The CPU backend's own availability check (the shared ones are ``JitExtension``'s)."""
    if _compiler() is None:
        return f"no C++ compiler was found ({os.environ.get('CXX', 'c++')} is not on PATH; set CXX)"
    return None


def cpp_backend_unavailable_reason() -> Optional[str]:
    """Why the compiled CPU backend cannot run in this process (one line), or None when it can.

    Cheap and side-effect free: it builds nothing. Once the extension is loaded it skips the
    compiler and ninja probes (``backend="auto"`` asks on every op call).
    """
    return _JIT.unavailable_reason(_probe)


def source_dir() -> Path:
    """The folder with the C++ sources: ``linrec/csrc/cpu`` when installed, ``csrc/cpu`` in the repo."""
    return find_sources("cpu", SOURCES[1], "C++ sources (csrc/cpu/)")


def cpu_capability() -> str:
    """The vector extension the build targets: ``avx512``, ``avx2`` or ``default``."""
    try:
        cap = torch.backends.cpu.get_cpu_capability().lower()
    except Exception:  # pragma: no cover - very old or unusual builds
        cap = "default"
    return cap if cap in ("avx512", "avx2") else "default"


def build_flags(capability: str) -> Tuple[List[str], List[str]]:
    """(compiler flags, linker flags) of the build for ``capability`` (also used by the tests)."""
    cflags = ["-O3", "-std=c++17"]
    if capability == "avx512":
        cflags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                   "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    elif capability == "avx2":
        cflags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    ldflags: List[str] = []
    # at::parallel_for is inline OpenMP code with PyTorch's OpenMP backend: without -fopenmp it
    # would run on one thread. libgomp.so.1 resolves to the copy PyTorch has loaded already.
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def load_extension():
    """Builds (first use) or loads (cached) the extension and returns the module.

    Raises RuntimeError saying why when the backend is unavailable or the build fails.
    """
    return _JIT.load(cpp_backend_unavailable_reason,
                     "linrec's compiled CPU backend is unavailable: {reason}. backend='torch' would run instead.",
                     _build_spec)


def _build_spec() -> BuildSpec:
    capability = cpu_capability()
    src = source_dir()
    cflags, ldflags = build_flags(capability)
    return BuildSpec(
        load_kwargs=dict(name=f"linrec_cpu_{capability}", sources=[str(src / s) for s in SOURCES],
                         extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[str(src)]),
        failed=("building linrec's CPU extension failed: {error}. Set LINREC_CPP_VERBOSE=1 for the compiler "
                "output, LINREC_DISABLE_CPP=1 to stop trying; backend='torch' would run instead."),
        announce=f"linrec: compiling the CPU kernels ({capability}; once, about a minute; cached in {{where}})",
    )


# ----------------------------------------------------------------------------------------------
# The output cache
# ----------------------------------------------------------------------------------------------

def output_cache_info() -> dict:
    """The cpp backend's output cache: ``cached_bytes``, ``cached_blocks``, ``limit_bytes``,
    ``hits`` and ``misses`` (large outputs served from the cache / newly mapped) in this process.
    All zero, and the limit None, while the extension is not loaded (nothing is built for this)."""
    if _JIT.module is None:
        return dict(cached_bytes=0, cached_blocks=0, limit_bytes=None, hits=0, misses=0)
    return dict(_JIT.module.output_cache_info())


def empty_output_cache() -> None:
    """Unmaps every block the output cache holds (outputs still in use are not affected), as
    ``torch.cuda.empty_cache()`` does on the GPU. A no-op while the extension is not loaded."""
    if _JIT.module is not None:
        _JIT.module.empty_output_cache()


def set_output_cache_limit(megabytes: float) -> float:
    """Sets the output cache's limit in MiB (0 turns caching off and empties it), unmapping the
    oldest cached blocks above it; returns the previous limit in MiB. Loads (or builds) the
    extension."""
    if megabytes < 0:
        raise ValueError(f"megabytes must be >= 0, got {megabytes}")
    return load_extension().set_output_cache_limit(int(megabytes * 2**20)) / 2**20


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _check_cpu(**tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the cpp backend runs on CPU tensors; {name} is on {t.device}")


def _unit_last_stride(t: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """``t`` if its last ``dims`` dimensions are laid out densely (row-major), else a contiguous copy."""
    if t.numel() == 0:  # an empty tensor counts as contiguous whatever its strides: give it real ones
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    expected = 1
    for i in range(1, dims + 1):
        if t.shape[-i] > 1 and t.stride(-i) != expected:
            return t.contiguous()
        expected *= t.shape[-i]
    return t


def _offsets(cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()


def _diagonal_coefficients(a: torch.Tensor, storage: torch.dtype, D: int) -> torch.Tensor:
    """a as the kernel reads it: 3-D (Ba, Ta, D), Ba/Ta of size 1 where a is broadcast, in the
    storage dtype or (when a has another dtype) the accumulation dtype, unit channel stride."""
    if a.dtype != storage:
        a = a.to(accumulation_dtype(storage))
    while a.dim() < 3:
        a = a.unsqueeze(0)
    if a.shape[2] != D:  # broadcast along channels: spelled out (along D only)
        a = a.expand(a.shape[0], a.shape[1], D).contiguous()
    return _unit_last_stride(a)


def _check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"the cpp backend takes {name} in {names}, got {str(t.dtype).replace('torch.', '')}")


def diagonal_scan_forward(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                          cu_seqlens: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """States of ``h_t = a_t * h_{t-1} + x_t`` (reverse: ``h_{t+1}``), one pass over time.

    Args:
        a: broadcastable to (B, T, D), x's kind; a (D,) or (B, 1, D) a is never expanded.
        x: (B, T, D) float32 | bfloat16 | float16 | complex64. initial_state: (N, D) or None.
        cu_seqlens: (N + 1,) int32/int64 offsets with B = 1, or None. reverse: scan from T down.

    Returns:
        h: (B, T, D) contiguous, in x's dtype (accumulated in fp32 / complex64; with a of another
        dtype than x, a is read in the accumulation dtype).
    """
    _check_cpu(a=a, x=x, initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_dtype("x", x, SUPPORTED_DTYPES)
    ext = load_extension()
    acc = accumulation_dtype(x.dtype)
    x = _unit_last_stride(x)
    a3 = _diagonal_coefficients(a, x.dtype, x.shape[2])
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    return ext.diagonal_forward(a3, x, h0, _offsets(cu_seqlens), bool(reverse))


def diagonal_scan_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                           initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                           reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan in one sweep (dL/dx, dL/da and dL/dh0 fused).

    With ``g_t = dL/dx_t``: ``g_t = grad_h_t + conj(a_{t+1}) g_{t+1}``, ``dL/da_t = g_t conj(h_{t-1})``
    (``g conj(h0)`` at the first step, or exactly 0 without an initial state) and
    ``dL/dh0 = conj(a_1) g_1``; a reverse scan mirrors every index (the conventions of
    ``diagonal_scan_chunked_backward``).

    Args:
        a: as forward (its own broadcastable shape); h: (B, T, D) forward states;
        grad_h: (B, T, D) dL/dh (any strides); initial_state: (N, D) or None; cu_seqlens, reverse
        as forward.

    Returns:
        grad_a: in a's shape, summed over its broadcast dimensions in fp32; its dtype is a's
          where a has x's dtype or the accumulation dtype and a is not broadcast, else the
          accumulation dtype;
        grad_x: (B, T, D) in h's dtype (the accumulation dtype if h and grad_h differ);
        grad_h0: (N, D) in the accumulation dtype, zeros without an initial state.
    """
    _check_cpu(a=a, h=h, grad_h=grad_h, initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_dtype("h", h, SUPPORTED_DTYPES)
    ext = load_extension()
    storage = h.dtype if grad_h.dtype == h.dtype else accumulation_dtype(h.dtype)
    acc = accumulation_dtype(storage)
    B, T, D = h.shape
    h = _unit_last_stride(h.to(storage))
    grad_h = _unit_last_stride(grad_h.to(storage))
    a3 = _diagonal_coefficients(a, storage, D)
    accumulate = (a3.shape[0], a3.shape[1]) != (B, T)
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    grad_a, grad_x, grad_h0 = ext.diagonal_backward(a3, h, grad_h, h0, _offsets(cu_seqlens), bool(reverse),
                                                    accumulate)
    return sum_to_shape(grad_a, a.shape), grad_x, grad_h0


def _block_transitions(A: torch.Tensor, storage: torch.dtype, b: int) -> torch.Tensor:
    """A as the kernel reads it: 5-D (Ba, Ta, Ga, b, b) with contiguous (b, b) blocks, in the
    storage dtype or (when A has another dtype) float32."""
    if A.dtype != storage:
        A = A.to(torch.float32)
    while A.dim() < 5:
        A = A.unsqueeze(0)
    if tuple(A.shape[-2:]) != (b, b):
        A = A.expand(*A.shape[:3], b, b).contiguous()
    return _unit_last_stride(A, 2)


def _check_block(x: torch.Tensor) -> None:
    _check_dtype("x", x, BLOCK_DIAGONAL_DTYPES)
    if not 1 <= x.shape[-1] <= MAX_BLOCK:
        raise ValueError(f"the cpp backend's block-diagonal scan takes block sizes 1 <= b <= {MAX_BLOCK}, "
                         f"got b = {x.shape[-1]}")


def block_diagonal_scan_forward(A: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                                cu_seqlens: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """States of ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]``, one pass over time, b <= 16.

    Args:
        A: broadcastable to (B, T, G, b, b), e.g. (G, b, b) (never expanded); real.
        x: (B, T, G, b) float32 | bfloat16 | float16. initial_state: (N, G, b) or None.
        cu_seqlens: (N + 1,) offsets with B = 1, or None. reverse: scan from T down.

    Returns:
        h: (B, T, G, b) contiguous in x's dtype (accumulated in fp32).
    """
    _check_cpu(A=A, x=x, initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_block(x)
    ext = load_extension()
    x = _unit_last_stride(x, 2)
    A5 = _block_transitions(A, x.dtype, x.shape[-1])
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    return ext.block_diagonal_forward(A5, x, h0, _offsets(cu_seqlens), bool(reverse))


def block_diagonal_scan_backward(A: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                                 initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                                 reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block-diagonal scan in one sweep that reads every A_t once.

    For a forward-in-time scan ``g_t = grad_h_t + A_{t+1}^T g_{t+1}``, ``dL/dA_t = g_t h_{t-1}^T``
    (``g h0^T`` at the first step, exactly 0 without an initial state), ``dL/dh0 = A_1^T g_1``
    (returned also without an initial state, as ``block_diagonal_scan_chunked_backward`` does);
    a reverse scan mirrors every index.

    Returns:
        grad_A: in A's shape, float32, summed over A's broadcast dimensions;
        grad_x: (B, T, G, b) in h's dtype (float32 if h and grad_h differ);
        grad_h0: (N, G, b) float32.
    """
    _check_cpu(A=A, h=h, grad_h=grad_h, initial_state=initial_state, cu_seqlens=cu_seqlens)
    _check_block(h)
    ext = load_extension()
    storage = h.dtype if grad_h.dtype == h.dtype else torch.float32
    B, T, G, b = h.shape
    h = _unit_last_stride(h.to(storage), 2)
    grad_h = _unit_last_stride(grad_h.to(storage), 2)
    A5 = _block_transitions(A, storage, b)
    accumulate = tuple(A5.shape[:3]) != (B, T, G)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    grad_A, grad_x, grad_h0 = ext.block_diagonal_backward(A5, h, grad_h, h0, _offsets(cu_seqlens), bool(reverse),
                                                          accumulate)
    return sum_to_shape(grad_A, A.shape), grad_x, grad_h0


# ----------------------------------------------------------------------------------------------
# Householder-product scan, step by step (csrc/cpu/householder.cpp)
# ----------------------------------------------------------------------------------------------

# Head size up to which the step-by-step scan beats the chunked torch form at every length
# (measured, 1 thread, fp32, B=2 H=4 T=1024 n=1: K=V=32 forward 6.7x / backward 3.7x, K=V=64
# 3.4x / 2.3x, K=64 V=128 3.7x / 1.7x, K=V=128 still 2.3x / 1.1x); decoding calls (T <= 8) take
# it at any head size.
HOUSEHOLDER_SEQUENTIAL_MAX_K = 64


def householder_supports(q: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the cpp Householder kernels take a call and should run it under backend='auto':
    CPU tensors, q in float32 | bfloat16 | float16, and either at most ``HOUSEHOLDER_RECURRENT_MAX_T``
    tokens (decoding) or K <= ``HOUSEHOLDER_SEQUENTIAL_MAX_K`` (where the sequential scan beats the
    chunked form at any T). Whether the extension builds is ``settle_cpu_auto``'s question (it
    falls back to torch with a one-line note), not this predicate's.

    Args:
        q: (B, T, H, K); tensors: the call's other tensors (k, v, beta, log_gate, initial_state,
        cu_seqlens, ...; None allowed), checked to be on the CPU.
    """
    if q.device.type != "cpu" or q.dtype not in HOUSEHOLDER_DTYPES:
        return False
    if q.shape[1] > HOUSEHOLDER_RECURRENT_MAX_T and q.shape[-1] > HOUSEHOLDER_SEQUENTIAL_MAX_K:
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _householder_inputs(q, k, v, beta, log_gate, initial_state):
    """The layouts householder.cpp reads: q, k, v contiguous in q's dtype (k, v with the n axis),
    beta, log_gate, initial_state contiguous float32."""
    _check_cpu(q=q, k=k, v=v, beta=beta, log_gate=log_gate, initial_state=initial_state)
    _check_dtype("q", q, HOUSEHOLDER_DTYPES)
    if k.dim() == 4:
        k = k.unsqueeze(2)
    if v.dim() == 4:
        v = v.unsqueeze(2)
    if beta.dim() == 3:
        beta = beta.unsqueeze(2)
    f32 = torch.float32
    return (q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(), beta.to(f32).contiguous(),
            None if log_gate is None else log_gate.to(f32).contiguous(),
            None if initial_state is None else initial_state.to(f32).contiguous())


def householder_scan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                             log_gate: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], *,
                             cu_seqlens: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Householder-product scan one token and one factor at a time (any T; meant for decoding).

    Per token: ``S <- exp(log_gate_t) S``, then for every factor j ``S <- S + beta_j k_j (v_j - S^T k_j)^T``,
    and ``o_t = scale S^T q_t``; accumulated in fp32, parallel over (sequence, head).

    Args:
        q: (B, T, H, K) float32 | bfloat16 | float16; k: (B, T, n, H, K); v: (B, T, n, H, V) (4-D
        k / v / 3-D beta mean n = 1); beta: (B, T, n, H), log_gate: (B, T, H) or None, any float
        dtype; initial_state: (N, H, K, V) or None; cu_seqlens: (N + 1,) offsets with B = 1, or None;
        scale: the read-out scale.

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (N, H, K, V) float32.
    """
    ext = load_extension()
    q, k, v, beta, log_gate, initial_state = _householder_inputs(q, k, v, beta, log_gate, initial_state)
    o, final = ext.householder_forward(q, k, v, beta, log_gate, initial_state, _offsets(cu_seqlens), float(scale))
    return o, final


def householder_scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                              log_gate: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                              grad_o: torch.Tensor, grad_final: Optional[torch.Tensor], *,
                              cu_seqlens: Optional[torch.Tensor], scale: float) -> List[Optional[torch.Tensor]]:
    """Gradients of ``householder_scan_forward``: the states before every factor are recomputed
    (from checkpoints every ~sqrt(T) tokens; one segment when decoding), then one backward sweep.

    Args: as the forward, plus grad_o (B, T, H, V) and grad_final (N, H, K, V) or None (zeros).

    Returns:
        [grad_q, grad_k, grad_v, grad_beta, grad_log_gate, grad_initial_state]: each in its input's
        shape and dtype (k, v, beta in the shape they were given: 4-D / 3-D for n = 1), None for an
        absent log_gate or initial_state. Accumulated in fp32.
    """
    ext = load_extension()
    shapes = (k.shape, v.shape, beta.shape)
    dtypes = (beta.dtype, None if log_gate is None else log_gate.dtype,
              None if initial_state is None else initial_state.dtype)
    q, k, v, beta, log_gate, initial_state = _householder_inputs(q, k, v, beta, log_gate, initial_state)
    _check_cpu(grad_o=grad_o, grad_final=grad_final)
    grad_o = grad_o.to(torch.float32).contiguous()
    grad_final = None if grad_final is None else grad_final.to(torch.float32).contiguous()
    dq, dk, dv, dbeta, dg, dh0 = ext.householder_backward(q, k, v, beta, log_gate, initial_state, grad_o, grad_final,
                                                          _offsets(cu_seqlens), float(scale))
    return [dq, dk.reshape(shapes[0]), dv.reshape(shapes[1]), dbeta.reshape(shapes[2]).to(dtypes[0]),
            None if log_gate is None else dg.to(dtypes[1]),
            None if initial_state is None else dh0.to(dtypes[2])]
