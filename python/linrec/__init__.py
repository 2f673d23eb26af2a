"""linrec: parallel scans for linear recurrences, with Triton kernels and exact references.

Public ops (DESIGN.md §2):

* ``diagonal_scan(a, x, initial_state=None, *, reverse=False, cu_seqlens=None, backend="auto")``

Layers live in ``linrec.nn``.
"""

from .diagonal import diagonal_scan

__version__ = "0.1.0"

__all__ = ["diagonal_scan"]
