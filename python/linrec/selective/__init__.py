"""The selective-scan family (Mamba's S6): a diagonal recurrence whose state is expanded N-fold
per channel, driven by input-dependent B_t and read out by C_t.

* ``reference.py`` — sequential loop, float64-capable: the oracle
* ``chunked.py``   — chunked PyTorch form (the expanded state one block of time at a time): the CPU backend
* ``kernels/selective.py`` (installed as ``linrec.kernels.selective``) — fused Triton kernels
* ``op.py``        — checks, backend tables, ``torch.library`` registration
"""

from .chunked import selective_scan_chunked
from .op import selective_scan
from .reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_reference"]
