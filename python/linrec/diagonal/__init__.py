"""The diagonal family: ``h_t = a_t * h_{t-1} + x_t`` (LRU, Hawk RG-LRU, S4D, Mamba-style scans).

* ``reference.py`` — sequential loop, float64-capable: the oracle
* ``chunked.py``   — chunked PyTorch form: the CPU backend
* ``kernels/diagonal.py`` (installed as ``linrec.kernels.diagonal``) — Triton kernels
* ``op.py``        — checks, dispatch, ``torch.library`` registration
"""

from .chunked import diagonal_scan_chunked
from .op import diagonal_scan
from .reference import diagonal_scan_reference

__all__ = ["diagonal_scan", "diagonal_scan_chunked", "diagonal_scan_reference"]
