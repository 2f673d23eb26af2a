"""The block-diagonal family: ``h_t[g] = A_t[g] @ h_{t-1}[g] + x_t[g]`` (regular-language LRNNs, block SLiCE).

* ``reference.py`` — sequential loop, float64-capable: the oracle
* ``chunked.py``   — chunked PyTorch form: the CPU backend
* ``kernels/block_diagonal.py`` (installed as ``linrec.kernels.block_diagonal``) — Triton kernels
* ``op.py``        — checks, dispatch, ``torch.library`` registration
"""

from .chunked import block_diagonal_scan_chunked
from .op import block_diagonal_scan
from .reference import block_diagonal_scan_reference

__all__ = ["block_diagonal_scan", "block_diagonal_scan_chunked", "block_diagonal_scan_reference"]
