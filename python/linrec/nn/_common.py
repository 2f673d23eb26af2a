"""Pieces shared by the layers in ``linrec.nn``.

* ``ShortConv``: a depthwise causal convolution over time (kernel 4 by default) that
  carries its last ``kernel_size - 1`` inputs as a state, so that a sequence fed in
  pieces gives the outputs of one call, and that restarts at the boundaries of
  packed sequences (``cu_seqlens``).
* ``RMSNorm``: root-mean-square normalisation over the last dimension.
* helpers to pick the final recurrent state of every sequence out of a scan's output
  and to check a layer's ``state`` argument.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def num_sequences(x: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    """N, the number of sequences in a (B, T, ...) input: B, or the packed count with ``cu_seqlens``."""
    if cu_seqlens is None:
        return x.shape[0]
    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B = 1, got input of shape {tuple(x.shape)}")
    return cu_seqlens.shape[0] - 1


def check_input(name: str, x: Tensor, d_model: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor of shape (B, T, d_model={d_model}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name} expects input of shape (B, T, d_model={d_model}), got {tuple(x.shape)}")


def check_state_tensor(layer: str, name: str, t: Tensor, shape: Sequence[int], doc: str) -> None:
    """Checks one tensor of a layer's ``state`` argument against the shape it needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{layer}: state {name} must be a torch.Tensor of shape {doc} = {tuple(shape)}, "
                        f"got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{layer}: state {name} must have shape {doc} = {tuple(shape)}, got {tuple(t.shape)}")


def unpack_state(layer: str, state, structure: str, parts: int) -> tuple:
    """Splits a layer's tuple ``state`` into its ``parts`` pieces, or says what it needs.

    ``structure`` names the pieces, e.g. ``"(conv_state, h)"``: a bare tensor (or a tuple of the
    wrong length) is answered with that structure, not with a confusing shape error.
    """
    if not isinstance(state, (tuple, list)) or len(state) != parts:
        got = (f"a tensor of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor)
               else f"a {type(state).__name__} of length {len(state)}" if isinstance(state, (tuple, list))
               else type(state).__name__)
        raise TypeError(f"{layer}: state must be the tuple {structure} returned by a previous call with "
                        f"return_state=True, or None; got {got}")
    return tuple(state)


def final_states(h: Tensor, cu_seqlens: Optional[Tensor], initial_state: Optional[Tensor]) -> Tensor:
    """The last state of every sequence from a forward scan's output.

    Args:
        h: (B, T, *S) all states of a forward-in-time scan.
        cu_seqlens: (N + 1,) offsets of N sequences packed along T (B = 1), or None.
        initial_state: (N, *S) or None; what an empty sequence (or T = 0) hands on.

    Returns:
        (N, *S): ``h[:, -1]`` without ``cu_seqlens``; ``h[0, end_n - 1]`` for sequence n with it.
    """
    N = h.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        initial_state = h.new_zeros((N,) + tuple(h.shape[2:]))
    if cu_seqlens is None:
        return h[:, -1] if h.shape[1] > 0 else initial_state.to(h.dtype)
    ends = cu_seqlens[1:].long()
    lengths = ends - cu_seqlens[:-1].long()
    last = h[0, (ends - 1).clamp_min(0)] if h.shape[1] > 0 else initial_state.to(h.dtype)
    empty = (lengths == 0).view((N,) + (1,) * (h.dim() - 2))
    return torch.where(empty, initial_state.to(h.dtype), last)


def conv_and_recurrent_state(layer: str, state, num_seqs: int, h_shape: Sequence[int], h_doc: str
                             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """A ``(conv_state, h)`` layer state (Mamba, RGLRU) split and checked: (conv_state, h0), h0 as
    float32 (N, *h_shape) or None; the conv state is ShortConv's to check. None gives (None, None).

    Args:
        layer: the layer's name for the messages; state: what the caller passed (None, or the tuple
        a previous call returned); num_seqs: N; h_shape, h_doc: h's shape after N, and its spelling
        for the messages (e.g. ``"(N, d_rnn)"``).
    """
    if state is None:
        return None, None
    conv_state, h0 = unpack_state(layer, state, "(conv_state, h)", 2)
    if h0 is not None:
        check_state_tensor(layer, "h", h0, (num_seqs, *h_shape), h_doc)
        h0 = h0.float()
    return conv_state, h0


def scan_states(family: str, coefficients: Tensor, inputs: Tensor, initial_state: Optional[Tensor],
                cu_seqlens: Optional[Tensor], backend: str, return_state: bool, group=None
                ) -> Tuple[Tensor, Optional[Tensor]]:
    """All states of a forward ``linrec.<family>_scan`` and, with ``return_state``, every sequence's
    last one: on one device, or with time split over ``group`` (``linrec.distributed``: inputs are
    this rank's slice, the final state is the whole sequence's, on every rank).

    Args:
        family: "diagonal" (coefficients a, inputs x: (B, T, D)) or "block_diagonal" (A: (B, T, G,
            b, b), x: (B, T, G, b)); the shapes and dtypes are the single-device op's.
        initial_state: (N, *S) or None; cu_seqlens: (N + 1,) offsets or None.

    Returns:
        h: (B, T, *S) as the op returns it; final: (N, *S) in h's dtype (the accumulation dtype with
        a group), or None unless ``return_state``.
    """
    import linrec
    if group is not None:
        from .. import distributed
        scan = {"diagonal": distributed._diagonal, "block_diagonal": distributed._block_diagonal}[family]
        return scan(coefficients, inputs, initial_state, group, False, cu_seqlens, backend, return_state)
    h = getattr(linrec, f"{family}_scan")(coefficients, inputs, initial_state, cu_seqlens=cu_seqlens, backend=backend)
    return h, (final_states(h, cu_seqlens, initial_state) if return_state else None)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time with a carried state (Mamba / Gated DeltaNet style).

    ``y_t[c] = act(bias[c] + sum_{j=0}^{W-1} weight[c, j] * x_{t-W+1+j}[c])`` with kernel width W,
    where inputs before the start of a sequence come from the carried state (the sequence's
    previous W - 1 inputs), or are zero when there is none.

    Args:
        channels: C, the number of channels (each has its own kernel).
        kernel_size: W, the temporal width (>= 1).
        activation: "silu" or None.
        bias: whether to add a learned per-channel bias.
        init: "near_identity" (default): nn.Conv1d's uniform init scaled by 0.1, plus 1 on the tap of
            the current token, so the convolution starts as (almost) the identity and the layer
            around it starts like its convolution-free form; "uniform": nn.Conv1d's init,
            U(-1/sqrt(W), 1/sqrt(W)), as in Mamba / Gated DeltaNet. On a small S_3 word problem a
            DeltaProduct layer with the uniform init had not learned after 1600 steps (loss 0.9),
            with the near-identity init it had (loss 0.13), like the layer without convolutions.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: Optional[str] = "silu", bias: bool = False,
                 init: str = "near_identity"):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        if init not in ("near_identity", "uniform"):
            raise ValueError(f"init must be 'near_identity' or 'uniform', got {init!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        # (C, 1, W): the layout of F.conv1d with groups = C; tap W - 1 multiplies the current token.
        bound = 1.0 / math.sqrt(kernel_size)
        weight = torch.empty(channels, 1, kernel_size).uniform_(-bound, bound)
        if init == "near_identity":
            weight.mul_(0.1)
            weight[:, 0, -1] += 1.0
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def state_shape(self, num_seqs: int) -> Tuple[int, int, int]:
        """(N, C, W - 1): the last W - 1 inputs of each sequence, oldest first."""
        return (num_seqs, self.channels, self.kernel_size - 1)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                group=None) -> Tuple[Tensor, Tensor]:
        """Convolves x over time.

        Args:
            x: (B, T, C) any float dtype.
            state: (N, C, W - 1) in x's dtype (cast if not), or None for zeros; N = B, or the
                number of packed sequences with ``cu_seqlens``.
            cu_seqlens: (N + 1,) int offsets of sequences packed along T (B = 1), or None.
            group: a torch.distributed process group, or None. With a group, x is this rank's slice
                of time (cu_seqlens: global offsets), the previous ranks' last W - 1 inputs arrive
                through the group (``linrec.distributed.short_conv``) and new_state is the whole
                sequences', on every rank.

        Returns:
            y: (B, T, C) in x's dtype.
            new_state: (N, C, W - 1), the last W - 1 inputs of each sequence (state included).
        """
        if group is not None:
            from ..distributed import short_conv
            return short_conv(self, x, state, cu_seqlens, group)
        B, T, C = x.shape
        W = self.kernel_size
        N = num_sequences(x, cu_seqlens)
        if state is None:
            state = x.new_zeros(self.state_shape(N))
        else:
            check_state_tensor("ShortConv", "conv", state, self.state_shape(N), "(N, C, kernel_size - 1)")
            state = state.to(x.dtype)
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if cu_seqlens is None and T == 0:
            return x, state
        if cu_seqlens is None:
            # Prepend each sequence's carried inputs; a 'valid' convolution then gives T outputs.
            padded = torch.cat([state, x.transpose(1, 2)], dim=2)  # (B, C, W - 1 + T)
            y = F.conv1d(padded, weight, bias, groups=C).transpose(1, 2)  # (B, T, C)
            new_state = padded[:, :, padded.shape[2] - (W - 1):]
        else:
            y, new_state = self._packed(x[0], state, cu_seqlens, weight, bias)
        if self.activation == "silu":
            y = F.silu(y)
        return y, new_state

    def _packed(self, x: Tensor, state: Tensor, cu_seqlens: Tensor, weight: Tensor, bias: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor]:
        """The convolution of packed sequences, without a Python loop over them.

        Every input a window needs is gathered from ``source = [x; carried inputs]``: the input
        ``s`` steps before packed position t is x[t - s] when it lies in t's own sequence, and
        otherwise entry ``(W - 1) + (pos_t - s)`` of that sequence's carried state (pos_t: t's
        position within its sequence). No host synchronisation, so it compiles without breaks.

        x: (T, C); state: (N, C, W - 1); cu_seqlens: (N + 1,). Returns (y (1, T, C), new_state).
        """
        T, C = x.shape
        W, N = self.kernel_size, state.shape[0]
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        source = torch.cat([x, state.transpose(1, 2).reshape(N * (W - 1), C)])  # (T + N (W-1), C)

        def index(seq: Tensor, pos: Tensor) -> Tensor:
            """Row of ``source`` holding the input at position ``pos`` (may be < 0) of sequence ``seq``."""
            return torch.where(pos >= 0, starts[seq] + pos, T + seq * (W - 1) + (W - 1) + pos)

        t = torch.arange(T, device=x.device)
        seq_id = torch.searchsorted(ends, t, right=True)          # sequence of every packed position
        pos = t - starts[seq_id]
        y = x.new_zeros((T, C)) if bias is None else bias.expand(T, C).clone()
        for s in range(W):  # tap W - 1 - s multiplies the input s steps back
            y = y + source[index(seq_id, pos - s)] * weight[:, 0, W - 1 - s]
        # The new state: the last W - 1 inputs of every sequence, oldest first.
        k = torch.arange(W - 1, device=x.device)
        seq = torch.arange(N, device=x.device)[:, None]
        rows = index(seq, (ends - starts)[:, None] - (W - 1) + k)   # (N, W - 1)
        new_state = source[rows].transpose(1, 2)                    # (N, C, W - 1)
        return y.unsqueeze(0), new_state


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (Zhang & Sennrich, 2019).

    Computed on ``x / max|x|`` (the ratio is unchanged: eps is rescaled with it), so that a
    state of magnitude above 1e19, whose squares overflow float32, still normalises to finite
    values: a recurrence whose state grows is read out correctly until the state itself overflows.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim) in x's dtype, computed in fp32."""
        x32 = x.float()
        # The scale is a constant of the normalisation (detached): y does not depend on it.
        scale = x32.detach().abs().amax(-1, keepdim=True).clamp_min(1e-12)
        xs = x32 / scale
        y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps / scale.pow(2))
        return (y * self.weight.float()).to(x.dtype)


def inverse_softplus(y: Tensor) -> Tensor:
    """x with softplus(x) = y for y > 0: ``x = y + log(1 - exp(-y))`` (stable for small and large y)."""
    return y + torch.log(-torch.expm1(-y))
