"""The Householder-product family: DeltaNet, Gated DeltaNet, DeltaProduct, Gated DeltaProduct.

Per head the state is a (K, V) matrix S; per token the transition is
``alpha_t prod_j (I - beta_tj k_tj k_tj^T)`` followed by the writes ``beta_tj k_tj v_tj^T``.

* ``reference.py`` — sequential loop, float64-capable: the oracle
* ``chunked.py``   — chunked PyTorch form (WY / UT representation per chunk): the CPU backend
* ``recurrent.py`` — step-by-step form for decoding (T small), no chunk padding
* ``kernels/householder.py`` (installed as ``linrec.kernels.householder``) — Triton kernels
* ``op.py``        — checks, dispatch, ``torch.library`` registration
"""

from .chunked import householder_scan_chunked
from .op import householder_scan
from .recurrent import householder_scan_recurrent
from .reference import householder_scan_reference

__all__ = ["householder_scan", "householder_scan_chunked", "householder_scan_recurrent", "householder_scan_reference"]
