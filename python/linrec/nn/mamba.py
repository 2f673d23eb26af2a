"""Mamba's block (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"), on ``linrec.selective_scan``, optionally with negative eigenvalues (Grazzi et al., 2025,
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").

For an input u_t in R^{d_model}, with d_inner = expand * d_model::

    x_t, z_t   = in_proj(u_t)                        two branches of width d_inner
    x_t        = silu(conv(x)_t)                     depthwise causal convolution of width d_conv
    dt_low, B_t, C_t = x_proj(x_t)                   widths dt_rank, d_state, d_state
    delta_t    = W_dt dt_low                         (dt_proj's weight; its bias is delta_bias)
    dt_t       = softplus(delta_t + b_dt)
    h_t        = exp(dt_t A) h_{t-1} + dt_t B_t x_t  per channel, state of size d_state
    y_t        = (C_t . h_t + D x_t) * silu(z_t)
    out_t      = out_proj(y_t)

``negative_eigenvalues=True`` replaces the transition exp(dt A) by 2 exp(dt A) - 1, in (-1, 1]: the
state can flip sign, which parity and modular counting need.

Initialisation as in Mamba: A = -[1, ..., d_state] for every channel (kept as A_log = log(-A));
dt log-uniform in [dt_min, dt_max] = [1e-3, 1e-1] (floored at 1e-4) through the softplus-inverse
bias of dt_proj, whose weight is uniform in +-dt_rank^-0.5; D = 1; the convolution uniform
(``nn.Conv1d``'s bound 1/sqrt(d_conv)) with a bias; no biases in the projections.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..selective import selective_scan
from ._common import ShortConv, check_input, conv_and_recurrent_state, inverse_softplus, num_sequences


class Mamba(nn.Module):
    """Mamba block around a selective scan: (B, T, d_model) -> (B, T, d_model).

    Args:
        d_model: input and output width.
        d_state: N, the states per channel (16 in Mamba).
        d_conv: width of the causal depthwise convolution (0 disables it).
        expand: d_inner = expand * d_model channels in the scan.
        dt_rank: rank of the dt projection; "auto" = ceil(d_model / 16).
        negative_eigenvalues: transitions 2 exp(dt A) - 1 in (-1, 1] instead of exp(dt A) in (0, 1].
        backend: passed to ``linrec.selective_scan``.
        dt_min, dt_max: at initialisation dt = softplus(b_dt) is log-uniform in [dt_min, dt_max].
        dt_init_floor: lower bound on the initial dt.
        conv_init: "uniform" (Mamba's, the default) or "near_identity"; see ``ShortConv``.

    State: a tuple ``(conv_state, h)``: conv_state (N, d_inner, d_conv - 1) in the input's dtype
    (None when d_conv = 0), h (N, d_inner, d_state) float32.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", negative_eigenvalues: bool = False, backend: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 conv_init: str = "uniform"):
        super().__init__()
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"dt_rank must be a positive int or 'auto', got {dt_rank!r}")
        if d_state < 1 or expand < 1 or d_conv < 0:
            raise ValueError(f"need d_state >= 1, expand >= 1 and d_conv >= 0, got d_state={d_state}, "
                             f"expand={expand}, d_conv={d_conv}")
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = expand * d_model
        self.dt_rank, self.negative_eigenvalues, self.backend = dt_rank, negative_eigenvalues, backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)             # [x branch | z gate]
        self.conv = ShortConv(d_inner, d_conv, activation="silu", bias=True, init=conv_init) if d_conv > 0 else None
        if self.conv is not None and conv_init == "uniform":
            with torch.no_grad():  # nn.Conv1d's bias init, as Mamba's conv1d
                self.conv.bias.uniform_(-1.0 / math.sqrt(d_conv), 1.0 / math.sqrt(d_conv))
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)     # [dt_low | B | C]
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank ** -0.5
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-std, std)
            self.dt_proj.bias.copy_(inverse_softplus(dt.clamp(min=dt_init_floor)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor, state: Optional[Tuple[Optional[Tensor], Tensor]] = None,
                return_state: bool = False, cu_seqlens: Optional[Tensor] = None, group=None
                ) -> Union[Tensor, Tuple[Tensor, Tuple[Optional[Tensor], Tensor]]]:
        """Runs the Mamba block over time.

        Args:
            x: (B, T, d_model) float32 | bfloat16 | float16.
            state: ``(conv_state, h)`` from a previous call (see the class doc), or None for zeros.
                N = B, or the number of packed sequences with ``cu_seqlens``.
            return_state: also return the new state.
            cu_seqlens: (N + 1,) int offsets of N sequences packed along T (B = 1), or None. The scan
                and the convolution both restart at every boundary.
            group: a torch.distributed process group for context parallelism, or None: x is this
                rank's slice of time, cu_seqlens the global offsets, the convolution's halo comes
                from the previous ranks, the scan is ``linrec.distributed.selective_scan``, and the
                returned state is the whole sequence's (on every rank).

        Returns:
            y: (B, T, d_model) in out_proj's output dtype (x's, or autocast's);
            with ``return_state`` also the new ``(conv_state, h)``.
        """
        check_input("Mamba", x, self.d_model)
        conv_state, h0 = conv_and_recurrent_state("Mamba", state, num_sequences(x, cu_seqlens),
                                                  (self.d_inner, self.d_state), "(N, d_inner, d_state)")
        xs, z = self.in_proj(x).chunk(2, dim=-1)                                 # (B, T, d_inner) each
        new_conv_state = None
        if self.conv is not None:
            xs, new_conv_state = self.conv(xs, conv_state, cu_seqlens, group=group)
        dt_low, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt_low, self.dt_proj.weight)                            # (B, T, d_inner); bias in the scan
        A = -torch.exp(self.A_log.float())                                       # (d_inner, d_state)
        scan = selective_scan
        if group is not None:  # context parallelism: this rank's slice of time, the state entering it exchanged
            import linrec.distributed as lrd
            scan = functools.partial(lrd.selective_scan, group=group)
        y, h = scan(xs, delta, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                    delta_softplus=True, initial_state=h0, output_final_state=return_state,
                    cu_seqlens=cu_seqlens, negative_eigenvalues=self.negative_eigenvalues,
                    backend=self.backend)
        out = self.out_proj(y)
        if return_state:
            return out, (new_conv_state, h)
        return out
