"""The Linear Recurrent Unit (Orvieto et al., 2023, "Resurrecting Recurrent Neural Networks for
Long Sequences"): a complex diagonal, time-invariant linear recurrence.

For an input u_t in R^{d_model} and a state h_t in C^{d_state}:

    h_t = lambda * h_{t-1} + gamma * (B u_t)           lambda, gamma in C^{d_state} / R^{d_state}
    y_t = Re(C h_t) + D * u_t                           C in C^{d_model x d_state}, D in R^{d_model}

The eigenvalues are parameterised as ``lambda = exp(-exp(nu_log) + i exp(theta_log))`` so that
|lambda| = exp(-exp(nu_log)) < 1 whatever the parameters (the paper's "exponential
parameterisation", which keeps the recurrence stable), and initialised uniformly on the ring
r_min <= |lambda| <= r_max (uniform in area, i.e. |lambda|^2 uniform in [r_min^2, r_max^2]) with
phase uniform in [0, max_phase]. The input normalisation ``gamma = sqrt(1 - |lambda|^2)`` keeps
the state's variance independent of |lambda| for white-noise inputs; as in the paper it is a
learnable parameter, stored as its log and initialised to that value.

The scan is ``linrec.diagonal_scan`` in complex64 with the (d_state,) coefficient lambda
broadcast over batch and time.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._common import check_input, check_state_tensor, num_sequences, scan_states


class LRU(nn.Module):
    """Linear Recurrent Unit: (B, T, d_model) -> (B, T, d_model).

    Args:
        d_model: input and output width.
        d_state: N, the number of complex state channels.
        r_min, r_max: the ring 0 <= r_min <= |lambda| <= r_max < 1 of the initial eigenvalues.
        max_phase: initial phases are uniform in [0, max_phase] (radians).
        backend: passed to ``linrec.diagonal_scan`` ("auto", "torch", "triton", "reference").

    Parameters (all real):
        nu_log, theta_log: (d_state,) float32, lambda = exp(-exp(nu_log) + i exp(theta_log)).
        gamma_log: (d_state,) float32, the input normalisation is exp(gamma_log).
        B_re, B_im: (d_state, d_model), the complex input matrix B = B_re + i B_im.
        C_re, C_im: (d_model, d_state), the complex output matrix C = C_re + i C_im.
        D: (d_model,), the skip connection.

    State: h, (N, d_state) complex64, the last state of each of the N sequences.
    """

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 2 * math.pi, backend: str = "auto"):
        super().__init__()
        if not 0.0 <= r_min <= r_max < 1.0:
            raise ValueError(f"need 0 <= r_min <= r_max < 1, got r_min={r_min}, r_max={r_max}")
        if max_phase < 0:
            raise ValueError(f"max_phase must be >= 0, got {max_phase}")
        self.d_model, self.d_state = d_model, d_state
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.backend = backend

        # |lambda|^2 uniform in [r_min^2, r_max^2]  =>  nu = -log|lambda| = -0.5 log(u (r_max^2 - r_min^2) + r_min^2).
        u1 = torch.rand(d_state)
        nu = -0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2)
        # r_max < 1 keeps nu > 0; the floor only guards log() against r_min = r_max -> 1 rounding.
        self.nu_log = nn.Parameter(torch.log(nu.clamp_min(1e-12)))
        # theta uniform in [0, max_phase]; floored away from 0 so that log(theta) stays finite.
        theta = (max_phase * torch.rand(d_state)).clamp_min(1e-6)
        self.theta_log = nn.Parameter(torch.log(theta))
        # gamma = sqrt(1 - |lambda|^2) = sqrt(1 - exp(-2 nu)), computed with expm1 for |lambda| near 1.
        self.gamma_log = nn.Parameter(0.5 * torch.log(-torch.expm1(-2 * nu)))

        # Glorot-style complex init of the paper: B ~ N(0, 1 / (2 d_model)) per real/imaginary part,
        # C ~ N(0, 1 / d_state) per part (its 1/sqrt(2) is absorbed by taking the real part), D ~ N(0, 1).
        self.B_re = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model))

    def eigenvalues(self) -> Tensor:
        """lambda: (d_state,) complex64, ``exp(-exp(nu_log) + i exp(theta_log))``."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log.float()), torch.exp(self.theta_log.float())))

    def init_state(self, num_seqs: int, device=None) -> Tensor:
        """Zero state: (num_seqs, d_state) complex64."""
        return torch.zeros(num_seqs, self.d_state, dtype=torch.complex64, device=device)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None, group=None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Runs the LRU over time.

        Args:
            x: (B, T, d_model) float32 | bfloat16 | float16.
            state: (N, d_state) complex64 from a previous call, or None for zeros. N = B, or the
                number of packed sequences with ``cu_seqlens``.
            return_state: also return the final state.
            cu_seqlens: (N + 1,) int32/int64 offsets of N sequences packed along T (B = 1), or None.
            group: a torch.distributed process group for context parallelism, or None: x is this
                rank's slice of time, cu_seqlens the global offsets, state the state before the
                whole sequence and the returned state the whole sequence's (on every rank).

        Returns:
            y: (B, T, d_model) in x's dtype; and, with ``return_state``, the new state
            (N, d_state) complex64.
        """
        check_input("LRU", x, self.d_model)
        N = num_sequences(x, cu_seqlens)
        if state is not None:
            check_state_tensor("LRU", "h", state, (N, self.d_state), "(N, d_state)")
            state = state.to(torch.complex64)
        u = x.float()
        lam = self.eigenvalues()                                   # (d_state,) complex64
        gamma = torch.exp(self.gamma_log.float())                  # (d_state,)
        # gamma * (B u): real input, complex matrix -> the two real products, then combine.
        # .float(): under autocast the products come out in bf16, which torch.complex rejects.
        Bu = torch.complex((u @ (self.B_re.float() * gamma[:, None]).t()).float(),
                           (u @ (self.B_im.float() * gamma[:, None]).t()).float())  # (B, T, d_state) complex64
        h, final = scan_states("diagonal", lam, Bu, state, cu_seqlens, self.backend, return_state, group)
        # Re(C h) = C_re Re(h) - C_im Im(h)
        y = h.real @ self.C_re.float().t() - h.imag @ self.C_im.float().t() + self.D.float() * u
        y = y.to(x.dtype)
        if return_state:
            return y, final
        return y
