"""The Real-Gated Linear Recurrent Unit and Hawk's recurrent block (De et al., 2024, "Griffin:
Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models").

RG-LRU, per channel, for an input x_t in R^{d_rnn}:

    r_t = sigmoid(W_a x_t + b_a)                     recurrence gate
    i_t = sigmoid(W_x x_t + b_x)                     input gate
    log a_t = -c * r_t * softplus(Lambda)            c = 8, so 0 < a_t = a^(c r_t) <= 1 with a = exp(-softplus(Lambda))
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

``sqrt(1 - a_t^2)`` normalises the input so that the state keeps unit scale whatever the
decay. Lambda is initialised so that a^c is uniform in [a_min, a_max] = [0.9, 0.999].

``allow_neg_eigval=True`` lets a_t range over (-1, 1] so that the recurrence can flip signs, which
is what parity and modular counting need (Grazzi et al., 2025, "Unlocking State-Tracking in Linear
RNNs Through Negative Eigenvalues"). We use a sign gate,

    s_t = tanh(W_s x_t + b_s),    a_t = s_t * a'_t            with a'_t the decay above,

rather than the affine map a_t = 2 a'_t - 1 of Grazzi et al.: with Griffin's initialisation
(a'^c in [0.9, 0.999]) the affine map only reaches negative values after Lambda has moved far out
of softplus's flat tail, which takes long to learn, while the sign gate is a fresh linear map
whose gradient is well conditioned from the start (a tiny parity task trains in a few hundred
steps). b_s starts at 2, so s_t ~ tanh(2) = 0.96 for small inputs and the layer starts close to
the plain RG-LRU. The input normalisation stays valid since |a_t| <= a'_t <= 1; it is computed as
``1 - a_t^2 = (1 - a'_t^2) + a'_t^2 (1 - s_t^2)``, without cancellation when a'_t is near 1.

The layer is Hawk's recurrent block (Griffin, Fig. 2): two linear branches of width d_rnn from
the input; one goes through GeLU, the other through a short causal convolution (width 4) and
the RG-LRU; their product goes through a linear map back to d_model.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import ShortConv, check_input, conv_and_recurrent_state, inverse_softplus, num_sequences, scan_states

# 1 - a_t^2 is floored here before the square root: sqrt has an infinite derivative at 0 (a_t = +-1),
# and the floor keeps the gradient bounded (sqrt(1e-6) = 1e-3 of input still enters at |a_t| = 1).
_MIN_ONE_MINUS_A2 = 1e-6


class RGLRU(nn.Module):
    """Hawk recurrent block around an RG-LRU: (B, T, d_model) -> (B, T, d_model).

    Args:
        d_model: input and output width.
        d_rnn: width of the recurrence (default d_model).
        conv_size: width of the causal depthwise convolution before the RG-LRU (0 disables it).
        conv_init: "near_identity" (default) or "uniform" (nn.Conv1d's); see ``ShortConv``.
        c: the gate temperature (8 in Griffin).
        a_min, a_max: at initialisation a^c = exp(-c softplus(Lambda)) is uniform in [a_min, a_max].
        allow_neg_eigval: a_t in (-1, 1] via a sign gate ``a_t = tanh(W_s x_t + b_s) * a'_t`` (see the
            module doc) instead of a_t in (0, 1].
        backend: passed to ``linrec.diagonal_scan``.

    State: a tuple ``(conv_state, h)``: conv_state (N, d_rnn, conv_size - 1) in the input's dtype
    (None when conv_size = 0), h (N, d_rnn) float32.
    """

    def __init__(self, d_model: int, d_rnn: Optional[int] = None, conv_size: int = 4, conv_init: str = "near_identity",
                 c: float = 8.0, a_min: float = 0.9, a_max: float = 0.999, allow_neg_eigval: bool = False,
                 backend: str = "auto"):
        super().__init__()
        d_rnn = d_model if d_rnn is None else d_rnn
        if not 0.0 < a_min <= a_max < 1.0:
            raise ValueError(f"need 0 < a_min <= a_max < 1, got a_min={a_min}, a_max={a_max}")
        self.d_model, self.d_rnn, self.c = d_model, d_rnn, float(c)
        self.conv_size, self.allow_neg_eigval, self.backend = conv_size, allow_neg_eigval, backend

        self.in_proj = nn.Linear(d_model, 2 * d_rnn)   # [gate branch | recurrent branch]
        self.conv = ShortConv(d_rnn, conv_size, activation=None, bias=True, init=conv_init) if conv_size > 0 else None
        self.gate_a = nn.Linear(d_rnn, d_rnn)          # W_a, b_a: recurrence gate r_t
        self.gate_x = nn.Linear(d_rnn, d_rnn)          # W_x, b_x: input gate i_t
        # a^c = exp(-c softplus(Lambda)) ~ U[a_min, a_max]  =>  Lambda = softplus^{-1}(-log(u) / c).
        u = torch.empty(d_rnn).uniform_(a_min, a_max)
        self.Lambda = nn.Parameter(inverse_softplus(-torch.log(u) / self.c))
        if allow_neg_eigval:
            self.gate_s = nn.Linear(d_rnn, d_rnn)      # W_s, b_s: sign gate s_t
            with torch.no_grad():
                self.gate_s.bias.fill_(2.0)            # s_t ~ tanh(2) = 0.96: start near the plain RG-LRU
        self.out_proj = nn.Linear(d_rnn, d_model)

    def gates(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The decay and the normalised input scale of the RG-LRU.

        Args:
            x: (B, T, d_rnn) the recurrent branch after the convolution.

        Returns:
            a: (B, T, d_rnn) float32, a_t in (0, 1] (in (-1, 1] with ``allow_neg_eigval``).
            x_in: (B, T, d_rnn) float32, ``sqrt(1 - a_t^2) * i_t * x_t``.
        """
        x32 = x.float()
        r = torch.sigmoid(self.gate_a(x).float())
        i = torch.sigmoid(self.gate_x(x).float())
        log_a = -self.c * r * F.softplus(self.Lambda.float())       # log a'_t <= 0
        a = torch.exp(log_a)                                         # a'_t in (0, 1]
        one_minus_a2 = -torch.expm1(2.0 * log_a)                     # 1 - a'^2 = 1 - exp(2 log a'), exact near 1
        if self.allow_neg_eigval:
            s = torch.tanh(self.gate_s(x).float())                   # sign gate s_t in (-1, 1)
            one_minus_a2 = one_minus_a2 + a * a * (1.0 - s * s)      # 1 - (s a')^2
            a = s * a
        mult = torch.sqrt(one_minus_a2.clamp_min(_MIN_ONE_MINUS_A2))
        return a, mult * i * x32

    def forward(self, x: Tensor, state: Optional[Tuple[Optional[Tensor], Tensor]] = None,
                return_state: bool = False, cu_seqlens: Optional[Tensor] = None, group=None
                ) -> Union[Tensor, Tuple[Tensor, Tuple[Optional[Tensor], Tensor]]]:
        """Runs the Hawk block over time.

        Args:
            x: (B, T, d_model) float32 | bfloat16 | float16.
            state: ``(conv_state, h)`` from a previous call (see the class doc), or None for zeros.
                N = B, or the number of packed sequences with ``cu_seqlens``.
            return_state: also return the new state.
            cu_seqlens: (N + 1,) int offsets of N sequences packed along T (B = 1), or None. The scan
                and the convolution both restart at every boundary.
            group: a torch.distributed process group for context parallelism, or None: x is this
                rank's slice of time, cu_seqlens the global offsets, the convolution's halo comes
                from the previous ranks, and the returned state is the whole sequence's.

        Returns:
            y: (B, T, d_model) in x's dtype; with ``return_state`` also the new ``(conv_state, h)``.
        """
        check_input("RGLRU", x, self.d_model)
        conv_state, h0 = conv_and_recurrent_state("RGLRU", state, num_sequences(x, cu_seqlens), (self.d_rnn,),
                                                  "(N, d_rnn)")
        gate_branch, rec_branch = self.in_proj(x).chunk(2, dim=-1)      # (B, T, d_rnn) each
        new_conv_state = None
        if self.conv is not None:
            rec_branch, new_conv_state = self.conv(rec_branch, conv_state, cu_seqlens, group=group)
        a, x_in = self.gates(rec_branch)
        h, final = scan_states("diagonal", a, x_in, h0, cu_seqlens, self.backend, return_state, group)  # fp32
        y = self.out_proj((F.gelu(gate_branch.float()) * h).to(x.dtype))
        if return_state:
            return y, (new_conv_state, final)
        return y
