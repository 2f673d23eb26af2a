"""linrec: parallel scans for linear recurrences, with Triton kernels and exact references.

Public ops (the contract; docs/design.md §2, Public API):

* ``block_diagonal_scan(A, x, initial_state=None, *, reverse=False, cu_seqlens=None, backend="auto")``
* ``diagonal_scan(a, x, initial_state=None, *, reverse=False, cu_seqlens=None, backend="auto")``
* ``householder_scan(q, k, v, beta, log_gate=None, initial_state=None, *, scale=None,
  output_final_state=False, cu_seqlens=None, backend="auto")``

Layers live in ``linrec.nn``, which ``import linrec`` also loads (as ``import torch`` gives
``torch.nn``).
"""

from .block_diagonal import block_diagonal_scan
from .diagonal import diagonal_scan
from .householder import householder_scan
from .selective import selective_scan

# Imported after the ops: the layers call ``linrec.<op>`` at run time, so by the time
# ``linrec.nn`` runs its ``import linrec`` the ops above are already bound (no import cycle).
from . import nn  # noqa: E402  (isort: skip)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``linrec.distributed`` (context parallelism on torch.distributed) is imported on first use."""
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'linrec' has no attribute {name!r}")

__all__ = ["block_diagonal_scan", "diagonal_scan", "householder_scan", "selective_scan", "nn"]
