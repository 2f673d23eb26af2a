"""Drop-in sequence-mixing layers built on linrec's scans: (B, T, d_model) -> (B, T, d_model).

| layer              | family                                   | from                                          |
|--------------------|------------------------------------------|-----------------------------------------------|
| ``LRU``            | diagonal, complex, time-invariant        | Orvieto et al., Resurrecting RNNs             |
| ``RGLRU``          | diagonal, real, input-dependent gate     | Hawk / Griffin (De et al.)                    |
| ``DeltaProduct``   | Householder, n factors, optional gate    | DeltaProduct, Gated DeltaNet, DeltaNet[-1,1]  |
| ``BlockDiagonalRNN`` | block-diagonal, input-dependent        | Fan et al. regular-language LRNN, block SLiCE |

Every layer is usable as ``y = layer(x)`` and, for stateful decoding / chunked prefill, as
``y, state = layer(x, state=state, return_state=True)``; ``cu_seqlens=`` takes packed
variable-length batches (B = 1).
"""

from ._common import RMSNorm, ShortConv
from .block_diagonal import BlockDiagonalRNN
from .delta_product import DeltaProduct
from .lru import LRU
from .mamba import Mamba
from .rglru import RGLRU

__all__ = ["LRU", "RGLRU", "DeltaProduct", "BlockDiagonalRNN", "Mamba", "ShortConv", "RMSNorm"]
