"""The optional CUDA backend: availability, the JIT build of ``csrc/`` and the launchers.

Nothing here runs at import time. The extension is compiled with
``torch.utils.cpp_extension.load`` (ninja) the first time ``backend="cuda"`` is
used in a process, into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``); later processes find the cached build
and only re-link it when a source or a flag changed.

Environment variables:

* ``LINREC_CUDA_ARCH``: the GPU architectures to compile for, e.g. ``90a``,
  ``sm_80``, ``8.0;9.0``. Default: the current device's (``major minor``).
* ``LINREC_DISABLE_CUDA=1``: never build or use the CUDA backend.
* ``LINREC_CUDA_VERBOSE=1``: print the compiler's output while building.

The launchers mirror those of the Triton kernels in ``linrec.kernels.diagonal``:
``diagonal_scan_forward(a, x, initial_state, *, cu_seqlens, reverse)`` and
``diagonal_scan_backward(a, h, grad_h, initial_state, *, cu_seqlens, reverse, x_dtype)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ._common import accumulation_dtype, num_sequences
from ._jit import BuildSpec, JitExtension, find_sources

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
SOURCES = ("binding.cpp", "diagonal_scan_kernel.cu")

_JIT = JitExtension("CUDA extension", disable_env="LINREC_DISABLE_CUDA", verbose_env="LINREC_CUDA_VERBOSE")


def _probe() -> Optional[str]:
    """The CUDA backend's own availability check (the shared ones are ``JitExtension``'s)."""
    if getattr(torch.version, "hip", None):
        return f"this PyTorch ({torch.__version__}) is a ROCm build; the CUDA kernels need a CUDA build"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found; set CUDA_HOME to build the kernels"
    return None


def cuda_backend_unavailable_reason() -> Optional[str]:
    """Why ``backend="cuda"`` cannot run in this process (one line), or None when it can.

    Cheap and side-effect free: it builds nothing.
    """
    return _JIT.unavailable_reason(_probe)


def source_dir() -> Path:
    """The folder with the CUDA sources: ``linrec/csrc`` when installed, ``csrc/`` in the repo."""
    return find_sources("", SOURCES[1], "CUDA sources (csrc/)")


def cuda_archs() -> List[str]:
    """Architectures to build for, from ``LINREC_CUDA_ARCH`` or the current device, as e.g. ``["90a"]``."""
    spec = os.environ.get("LINREC_CUDA_ARCH", "").strip()
    if not spec:
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}{minor}"]
    archs = []
    for item in re.split(r"[,;\s]+", spec):
        if not item:
            continue
        arch = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"LINREC_CUDA_ARCH has an unknown architecture {item!r}; "
                             "use e.g. '80', 'sm_90a' or '8.0;9.0'")
        archs.append(arch)
    return archs


def nvcc_flags(archs: List[str]) -> List[str]:
    """nvcc flags of the build (also used by the CI compile check)."""
    flags = ["-O3", "-std=c++17", "-lineinfo"]
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def load_extension():
    """Builds (first use) or loads (cached) the extension and returns the module.

    Raises RuntimeError saying why when the backend is unavailable or the build fails.
    """
    return _JIT.load(cuda_backend_unavailable_reason,
                     "linrec's CUDA backend is unavailable: {reason}. "
                     "backend='triton' (CUDA tensors) or 'torch' (any device) would run instead.",
                     _build_spec)


def _build_spec() -> BuildSpec:
    archs = cuda_archs()
    src = source_dir()
    return BuildSpec(
        load_kwargs=dict(name="linrec_cuda_" + "_".join(archs), sources=[str(src / name) for name in SOURCES],
                         extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=nvcc_flags(archs),
                         extra_include_paths=[str(src)]),
        failed=(f"building linrec's CUDA extension for sm_{'/'.join(archs)} failed: {{error}}. "
                "Set LINREC_CUDA_VERBOSE=1 for the compiler output, LINREC_DISABLE_CUDA=1 to "
                "stop trying; backend='triton' would run instead."),
    )


def _common_storage(*tensors: torch.Tensor) -> torch.dtype:
    """The kernel's storage dtype: the tensors' shared dtype, or the accumulation dtype when they differ."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return dtypes.pop()
    return accumulation_dtype(tensors[0].dtype)


def diagonal_scan_forward(a: torch.Tensor, x: torch.Tensor, initial_state: Optional[torch.Tensor], *,
                          cu_seqlens: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    """States of ``h_t = a_t * h_{t-1} + x_t`` with the CUDA kernel.

    Args:
        a: broadcastable to (B, T, D), x's kind (broadcast dims stay stride 0: no copy).
        x: (B, T, D) float32 | bfloat16 | float16 | complex64, on a CUDA device.
        initial_state: (N, D) or None. cu_seqlens: (N + 1,) int32/int64 with B = 1, or None.
        reverse: scan from t = T down to 1.

    Returns:
        h: (B, T, D) in x's dtype. With a of another dtype than x, both are read in fp32.
    """
    ext = load_extension()
    out_dtype = x.dtype
    storage = _common_storage(a, x)
    acc = accumulation_dtype(storage)
    x = x.to(storage).contiguous()
    a = a.to(storage).expand(x.shape)
    h0 = initial_state.to(acc).contiguous() if initial_state is not None else None
    cu = cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ext.diagonal_scan(a, x, h0, cu, out, None, None, None, reverse, False)
    return out.to(out_dtype)


def diagonal_scan_backward(a: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                           initial_state: Optional[torch.Tensor], *, cu_seqlens: Optional[torch.Tensor],
                           reverse: bool, x_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the diagonal scan in one sweep (the reverse scan with dL/da and dL/dh0 fused).

    Args:
        a: as forward; h: (B, T, D) forward states; grad_h: (B, T, D) dL/dh (any strides, stride 0 too).
        initial_state: (N, D) or None; x_dtype: dtype for dL/dx.

    Returns:
        grad_a: (B, T, D) in the accumulation dtype (summing over broadcast dims is the caller's),
        grad_x: (B, T, D) in x_dtype, grad_initial_state: (N, D) in the accumulation dtype.
    """
    ext = load_extension()
    B, T, D = h.shape
    N = num_sequences(B, cu_seqlens)
    storage = _common_storage(a, h, grad_h)
    acc = accumulation_dtype(storage)
    h = h.to(storage).contiguous()
    grad_h = grad_h.to(storage).contiguous()
    a = a.to(storage).expand(h.shape)
    h0 = initial_state.to(acc).contiguous() if initial_state is not None else None
    cu = cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None
    grad_x = torch.empty((B, T, D), dtype=storage, device=h.device)
    grad_a = torch.empty((B, T, D), dtype=acc, device=h.device)
    grad_h0 = torch.zeros((N, D), dtype=acc, device=h.device)
    ext.diagonal_scan(a, grad_h, h0, cu, grad_x, h, grad_a, grad_h0, reverse, True)
    return grad_a, grad_x.to(x_dtype), grad_h0
