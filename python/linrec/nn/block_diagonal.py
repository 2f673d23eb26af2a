"""A linear RNN with input-dependent block-diagonal transitions.

    h_t[g] = A(u_t)[g] @ h_{t-1}[g] + x_t[g]         g = 1..G blocks of size b x b
    x_t = W_in u_t,   y_t = W_out RMSNorm(h_t)

Two parameterisations of the blocks A(u_t)[g] (``parameterization=``):

* ``"fan"`` — the regular-language LRNN of Fan, Chi and Rudnicky ("Advancing Regular Language
  Reasoning in Linear Recurrent Neural Networks", arXiv:2309.07412): a linear map of the input gives G*b*b
  entries, and every column of every block is divided by max(1, its p-norm), so that
  ||A[:, j]||_p <= 1 (``column_norm="clamp"``, see below). For p = 1 (the default here) this bounds
  the induced l1 norm of every block by 1, so the state can never blow up. The paper uses
  p = 1.2 (``p=1.2``), slightly more expressive, but for p > 1 the column bound no longer bounds
  the growth: ||A h||_p <= ||h||_1 only, so the state may grow by up to b^(1 - 1/p) per token,
  1.41 for b = 8. Trained models do use that room: a byte-level LM (``bench/tasks/lm.py``,
  segments up to 512 bytes) had states of 1e35 after 10 steps and overflowed float32 at the
  11th; a parity model grew its state ~1.37x per token. Trained on short sequences, p = 1.2
  extrapolated better on the regular-language tasks of ``bench/tasks`` (mod-5 arithmetic with
  three layers: 1.000 at L=256 where p = 1 fell to 0.62 at L=64;
  ``bench/results/tasks/state_tracking.md``), so it stays an option. The map's
  bias starts at the identity, so a block starts near a norm-preserving matrix, perturbed by
  the input.
* ``"slice"`` — a block-diagonal structured linear CDE (SLiCE; Walker et al., 2025, "Structured
  Linear CDEs: Maximally Expressive and Parallel-in-Time Sequence Models"): A(u_t) = I + sum_i z_ti A_i,
  linear in a low-dimensional control z_t = W_z u_t + b_z (dimension ``slice_dim``), with A_i
  learned block-diagonal generators, which start small (``slice_init_scale``) so that the
  transitions start within a few percent of the identity. Nothing bounds I + sum_i z_i A_i,
  though: any persistent component of the perturbation with an eigenvalue of positive real part
  compounds over time (at init, over T = 8192 random tokens, the state grew by ~1e10). So by
  default (``slice_normalize=True``) the blocks get the same column clamp as ``"fan"``,
  A[:, j] / max(1, ||A[:, j]||_p), which leaves A = I + sum_i z_i A_i untouched wherever its columns
  are inside the unit p-ball and only shrinks the expanding ones; ``slice_normalize=False`` gives
  the plain linear-in-z form (for short sequences or inputs that are small increments, as in the
  CDE setting of the paper).

How the columns are bounded (both parameterisations; ``column_norm=``, ``center_columns=``):

* ``"clamp"`` (default): A[:, j] / max(1, ||A[:, j]||_p). Columns inside the unit p-ball are left
  alone, so the layer may also learn contractions, columns of norm 0.99 say: harmless on the
  training lengths, but such a component decays to 0.08 over 256 tokens.
* ``"max"``: A / max_j ||A[:, j]||_p, as the code released with Fan et al.'s paper does: every block
  has its largest column exactly on the unit sphere, so no block can shrink as a whole.
* ``center_columns=True`` (also from that code) first subtracts from every column its mean over
  the rows, so that 1^T A = 0: the all-ones direction, which a permutation-like block maps to
  itself and along which the inputs would otherwise pile up as an undecayed sum, is not carried
  from one token to the next.

The RMSNorm on h before the output map keeps the readout's scale fixed while the state's norm
drifts (an undecayed sum in ``"fan"``, a slow growth in ``"slice"``).

The scan is ``linrec.block_diagonal_scan`` on A of shape (B, T, G, b, b) and x of shape (B, T, G, b).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from ._common import RMSNorm, check_input, check_state_tensor, num_sequences, scan_states

PARAMETERIZATIONS = ("fan", "slice")
COLUMN_NORMS = ("clamp", "max")


class BlockDiagonalRNN(nn.Module):
    """Block-diagonal input-dependent linear RNN: (B, T, d_model) -> (B, T, d_model).

    Args:
        d_model: input and output width.
        block_size: b, the size of each block.
        num_blocks: G; the hidden size is G * b.
        parameterization: "fan" (column p-norm normalised, Fan et al.) or "slice" (I + sum_i z_i A_i).
        p: the column norm of the clamp (>= 1). 1 (the default) bounds the l1 gain of every block
            by 1; 1.2 as in Fan et al. lets the state grow (see the module doc).
        slice_dim: r, the dimension of the control z_t of "slice" (default min(d_model, 16)).
        slice_init_scale: std of the entries of sum_i z_i A_i at init, for z of unit-variance entries.
        slice_normalize: bound the columns of the "slice" blocks as those of "fan".
        column_norm: "clamp" (each column divided by max(1, its p-norm)) or "max" (each block divided
            by its largest column p-norm, as in Fan et al.'s code); see the module doc.
        center_columns: subtract each column's mean over its rows before the norm (Fan et al.'s code).
        allow_neg_eigval: accepted for a uniform interface with the other layers; the blocks are general
            real matrices, so their eigenvalues already range over the (p-norm) unit ball, negative
            values and complex pairs included. Only True is supported.
        backend: passed to ``linrec.block_diagonal_scan``.

    State: h, (N, G, b) float32.
    """

    def __init__(self, d_model: int, block_size: int, num_blocks: int, parameterization: str = "fan",
                 p: float = 1.0, slice_dim: Optional[int] = None, slice_init_scale: float = 0.01,
                 slice_normalize: bool = True, column_norm: str = "clamp", center_columns: bool = False,
                 allow_neg_eigval: bool = True, backend: str = "auto"):
        super().__init__()
        if not allow_neg_eigval:
            raise ValueError("BlockDiagonalRNN cannot restrict its eigenvalues to [0, 1]: its blocks are general "
                             "real matrices; use allow_neg_eigval=True (the default)")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if p < 1:
            raise ValueError(f"p must be >= 1, got {p}")
        if column_norm not in COLUMN_NORMS:
            raise ValueError(f"column_norm must be one of {COLUMN_NORMS}, got {column_norm!r}")
        b, G = block_size, num_blocks
        self.d_model, self.block_size, self.num_blocks = d_model, b, G
        self.parameterization, self.p, self.backend = parameterization, float(p), backend
        self.slice_normalize = slice_normalize
        self.column_norm, self.center_columns = column_norm, bool(center_columns)

        self.in_proj = nn.Linear(d_model, G * b)
        if parameterization == "fan":
            self.A_proj = nn.Linear(d_model, G * b * b)
            with torch.no_grad():
                # A starts as normalise(I + W u): the identity, input-dependently perturbed.
                self.A_proj.weight.mul_(1.0 / math.sqrt(b))
                self.A_proj.bias.copy_(torch.eye(b).repeat(G, 1, 1).flatten())
        else:
            r = min(d_model, 16) if slice_dim is None else slice_dim
            self.slice_dim = r
            self.z_proj = nn.Linear(d_model, r)
            # E = sum_i z_i A_i has entries of std slice_init_scale for unit-variance z_i.
            self.generators = nn.Parameter(torch.randn(r, G, b, b) * (slice_init_scale / math.sqrt(r)))
        self.norm = RMSNorm(G * b)
        self.out_proj = nn.Linear(G * b, d_model)

    def transitions(self, u: Tensor) -> Tensor:
        """A(u): (B, T, G, b, b) float32 for u: (B, T, d_model)."""
        b, G = self.block_size, self.num_blocks
        if self.parameterization == "fan":
            A = rearrange(self.A_proj(u).float(), "bt t (g i j) -> bt t g i j", g=G, i=b, j=b)
            return self._bound_columns(A)
        z = self.z_proj(u).float()                                                   # (B, T, r)
        eye = torch.eye(b, dtype=torch.float32, device=u.device)
        A = eye + torch.einsum("btr,rgij->btgij", z, self.generators.float())
        return self._bound_columns(A) if self.slice_normalize else A

    def _bound_columns(self, A: Tensor) -> Tensor:
        """Bounds the columns A[..., :, j] of every block to the unit p-ball; A: (B, T, G, b, b).

        ``"clamp"`` divides each column by max(1, its p-norm), ``"max"`` each block by its largest
        column p-norm; ``center_columns`` first subtracts each column's mean over the rows.
        """
        if self.center_columns:
            A = A - A.mean(dim=-2, keepdim=True)
        # (sum_i |A_ij|^p)^(1/p), with a tiny floor inside the root so that the derivative stays
        # finite for an all-zero column (vector_norm's backward gives 0/0 there).
        col_norm = (A.abs().pow(self.p).sum(dim=-2, keepdim=True) + 1e-30).pow(1.0 / self.p)  # (B, T, G, 1, b)
        if self.column_norm == "max":
            return A / col_norm.amax(dim=-1, keepdim=True)
        return A / col_norm.clamp_min(1.0)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None, group=None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Runs the layer over time.

        Args:
            x: (B, T, d_model) float32 | bfloat16 | float16.
            state: h (N, G, b) float32 from a previous call, or None for zeros. N = B, or the number
                of packed sequences with ``cu_seqlens``.
            return_state: also return the new state.
            cu_seqlens: (N + 1,) int offsets of N sequences packed along T (B = 1), or None.
            group: a torch.distributed process group for context parallelism, or None: x is this
                rank's slice of time, cu_seqlens the global offsets, and the returned state is the
                whole sequence's.

        Returns:
            y: (B, T, d_model) in x's dtype; with ``return_state`` also the new h (N, G, b) float32.
        """
        check_input("BlockDiagonalRNN", x, self.d_model)
        N = num_sequences(x, cu_seqlens)
        b, G = self.block_size, self.num_blocks
        if state is not None:
            check_state_tensor("BlockDiagonalRNN", "h", state, (N, G, b), "(N, G, b)")
            state = state.float()
        A = self.transitions(x)                                                        # (B, T, G, b, b)
        inp = rearrange(self.in_proj(x).float(), "bt t (g i) -> bt t g i", g=G)        # (B, T, G, b)
        h, final = scan_states("block_diagonal", A, inp, state, cu_seqlens, self.backend, return_state, group)
        y = self.out_proj(self.norm(rearrange(h, "bt t g i -> bt t (g i)")).to(x.dtype))
        if return_state:
            return y, final
        return y
