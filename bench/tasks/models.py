"""A small sequence model around ``linrec.nn`` layers, and packed-batch helpers.

``SequenceModel``: tokens (B, T) -> embedding -> ``num_layers`` pre-norm residual blocks
``x + mixer(norm(x))``, ``x + mlp(norm(x))`` -> norm -> linear head -> logits (B, T, classes).
The mixer is any ``linrec.nn`` layer, picked by a short spec string (``build_mixer``).
The MLPs and norms act per token, so the model's recurrent state is the list of its mixers'
states: decoding one token at a time costs the same memory at every step.

Packed batches: N sequences concatenated along time in a batch of B = 1 and described by
``cu_seqlens = [0, l_1, l_1 + l_2, ..., T]`` (as in linrec's ops and layers). ``mask_to_cu_seqlens``
turns a (B, L) padding mask into those offsets; ``pack_padded`` / ``unpack_to_padded`` move the
tokens between the two layouts.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import linrec.nn as lnn


# --------------------------------------------------------------------------------------------
# Mixer specs
# --------------------------------------------------------------------------------------------

MIXER_SPEC_HELP = """\
mixer spec: KIND[-FLAG...]
  rglru            RG-LRU (Hawk), a_t in [0, 1];            rglru-neg: a_t in [-1, 1]
  lru              LRU (complex diagonal, time-invariant, d_state = d_model)
  dpN              DeltaProduct with N Householder factors, beta in [0, 1]
  dpN-neg          ... beta in [0, 2] (eigenvalues in [-1, 1]);  add -gate for the forget gate,
                   -hH for H heads (default 2), -hard for beta = clip(1.2 sigmoid - 0.1, 0, 1)
                   (x 2 with -neg), which reaches 0 and its maximum exactly (beta_stretch=0.1)
  mamba            Mamba (selective scan), eigenvalues in [0, 1]; mamba-neg: in [-1, 1] (Grazzi et
                   al.); -sN state size (default 16)
  -noconv          (rglru, dpN, mamba) without the short causal convolution before the recurrence
  bd-fan / bd-slice  BlockDiagonalRNN with that parameterization; -bK block size (default 8),
                   -pX the column norm of the clamp (default 1; Fan et al. use 1.2); -max divides
                   each block by its largest column norm instead of clamping each column, -center
                   subtracts the column means first (both as in Fan et al.'s code)"""


def parse_spec(spec: str) -> Tuple[str, set, dict]:
    """``"dp2-neg-h4"`` -> (``"dp2"``, {``"neg"``}, {``"h"``: 4}); ``"bd-fan-p1.2"`` -> p = 1.2;
    ``"mamba-neg-s8"`` -> (``"mamba"``, {``"neg"``}, {``"s"``: 8})."""
    kind, *rest = spec.split("-")
    flags, numbers = set(), {}
    for item in rest:
        if len(item) > 1 and item[0] in "hbs" and item[1:].isdigit():
            numbers[item[0]] = int(item[1:])
        elif len(item) > 1 and item[0] == "p" and item[1:].replace(".", "", 1).isdigit():
            numbers["p"] = float(item[1:])
        else:
            flags.add(item)
    return kind, flags, numbers


def build_mixer(spec: str, d_model: int) -> nn.Module:
    """A ``linrec.nn`` layer (B, T, d_model) -> (B, T, d_model) from a spec (see ``MIXER_SPEC_HELP``)."""
    kind, flags, numbers = parse_spec(spec)
    neg = "neg" in flags
    conv_size = 0 if "noconv" in flags else 4
    family = "dp" if kind.startswith("dp") else kind
    known = {"rglru": {"neg", "noconv"}, "lru": set(), "dp": {"neg", "gate", "hard", "noconv"},
             "mamba": {"neg", "noconv"},
             "bd": {"fan", "slice", "max", "center"}}.get(family, set())
    if flags - known:
        raise ValueError(f"flags {sorted(flags - known)} do not apply to {kind!r} in mixer spec {spec!r}\n"
                         f"{MIXER_SPEC_HELP}")
    if kind == "rglru":
        return lnn.RGLRU(d_model, allow_neg_eigval=neg, conv_size=conv_size)
    if kind == "lru":
        return lnn.LRU(d_model, d_state=d_model)
    if kind == "mamba":
        return lnn.Mamba(d_model, d_state=numbers.get("s", 16), d_conv=conv_size, negative_eigenvalues=neg)
    if kind.startswith("dp") and kind[2:].isdigit():
        heads = numbers.get("h", 2)
        if d_model % heads:
            raise ValueError(f"d_model = {d_model} is not divisible by {heads} heads in {spec!r}")
        return lnn.DeltaProduct(d_model, num_heads=heads, head_dim=d_model // heads,
                                num_householder=int(kind[2:]), use_gate="gate" in flags, allow_neg_eigval=neg,
                                beta_stretch=0.1 if "hard" in flags else 0.0, conv_size=conv_size)
    if kind == "bd":
        block = numbers.get("b", 8)
        if d_model % block:
            raise ValueError(f"d_model = {d_model} is not divisible by block size {block} in {spec!r}")
        param = "slice" if "slice" in flags else "fan"
        kwargs = dict(block_size=block, num_blocks=d_model // block, parameterization=param,
                      column_norm="max" if "max" in flags else "clamp", center_columns="center" in flags)
        if "p" in numbers:
            kwargs["p"] = numbers["p"]
        return lnn.BlockDiagonalRNN(d_model, **kwargs)
    raise ValueError(f"unknown mixer spec {spec!r}\n{MIXER_SPEC_HELP}")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; (B, T, D) -> (B, T, D)."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_ratio: int = 2):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: Tensor, state=None, cu_seqlens: Optional[Tensor] = None):
        """x: (B, T, D); ``state``: the mixer's state or None. Returns (y (B, T, D), new mixer state)."""
        kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        mixed, new_state = self.mixer(self.mixer_norm(x), state=state, return_state=True, **kwargs)
        x = x + mixed
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_state


class SequenceModel(nn.Module):
    """Token classifier / language model: tokens (B, T) -> logits (B, T, num_classes).

    Args:
        vocab_size: number of input symbols.
        num_classes: number of output classes (``vocab_size`` for a language model).
        d_model: width of the residual stream.
        num_layers: number of [mixer, MLP] blocks.
        mixer: spec string for ``build_mixer`` (e.g. ``"rglru-neg"``, ``"dp2-neg"``, ``"bd-fan"``).
        mlp_ratio: hidden width of the MLPs in units of ``d_model``.
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int, num_layers: int, mixer: str,
                 mlp_ratio: int = 2):
        super().__init__()
        self.mixer_spec = mixer
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(build_mixer(mixer, d_model), d_model, mlp_ratio)
                                    for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor, *, state: Optional[List] = None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        """tokens: (B, T) int64 (B = 1 with ``cu_seqlens``).

        ``state``: a list with one mixer state per block (from an earlier call with
        ``return_state=True``), or None to start from zeros. Returns logits (B, T, num_classes),
        and with ``return_state=True`` also the list of the blocks' new states.
        """
        x = self.embed(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, block_state = block(x, state=None if state is None else state[i], cu_seqlens=cu_seqlens)
            new_states.append(block_state)
        logits = self.head(self.norm(x))
        return (logits, new_states) if return_state else logits


def state_numel(state) -> int:
    """Number of elements in a (nested) model state: constant across decode steps."""
    if isinstance(state, Tensor):
        return state.numel()
    if isinstance(state, (list, tuple)):
        return sum(state_numel(s) for s in state)
    if isinstance(state, dict):
        return sum(state_numel(s) for s in state.values())
    return 0


# --------------------------------------------------------------------------------------------
# Padding masks <-> packed batches
# --------------------------------------------------------------------------------------------

def mask_to_cu_seqlens(mask: Tensor) -> Tensor:
    """Offsets of the packed sequences described by a padding mask.

    mask: (B, L) bool, True at real tokens. Each row holds one sequence; its real tokens keep
    their order when packed (right, left or any padding pattern), and rows with no real token
    are dropped. Returns ``cu_seqlens`` (N + 1,) int32, N = number of non-empty rows:
    ``[0, n_1, n_1 + n_2, ...]`` with n_i the number of True entries of row i.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, L) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    lengths = mask.sum(dim=1)
    lengths = lengths[lengths > 0]
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    return cu_seqlens


def pack_padded(x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Packs the real entries of a padded batch into B = 1.

    x: (B, L, ...) ; mask: (B, L) bool. Returns (packed (1, sum(mask), ...), cu_seqlens (N + 1,)).
    """
    if x.shape[:2] != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} disagree on (B, L)")
    return x[mask].unsqueeze(0), mask_to_cu_seqlens(mask)


def unpack_to_padded(packed: Tensor, mask: Tensor, fill: float = 0) -> Tensor:
    """Inverse of ``pack_padded``: packed (1, sum(mask), ...) -> (B, L, ...) with ``fill`` at padding."""
    out = packed.new_full(tuple(mask.shape) + tuple(packed.shape[2:]), fill)
    out[mask] = packed[0]
    return out


def lengths_to_cu_seqlens(lengths: Sequence[int], device=None) -> Tensor:
    """Offsets (N + 1,) int32 for sequences of the given lengths."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int32, device=device), dim=0)
    return cu
