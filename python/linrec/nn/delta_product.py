"""DeltaProduct (Siems et al., 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via
Householder Products") with the optional forget gate of Gated DeltaNet (Yang et al., 2025, "Gated
Delta Networks: Improving Mamba2 with Delta Rule") and the [-1, 1] eigenvalue range of Grazzi et
al. (2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").

Per head, the state S is a (K x V) matrix. Every token t applies a gate and n delta-rule steps,
i.e. n generalised Householder reflections, before it is read out:

    S <- alpha_t * S                                            alpha_t = exp(log_gate_t), optional
    for j = 1..n:  S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T
    o_t = K^{-1/2} S^T q_t

With unit-norm k, the factor I - beta k k^T has eigenvalues 1 (K - 1 times) and 1 - beta, so
beta in [0, 1] (sigmoid) keeps them in [0, 1] and beta in [0, 2] (2 * sigmoid,
``allow_neg_eigval=True``) puts them in [-1, 1], which is what parity and modular counting need;
n > 1 factors per token make the transition a general product of reflections (rotations,
permutations), which is what the S_3 / A_5 word problems need.

The layer around the scan follows Gated DeltaNet:
  * q, k, v from linear maps (k and v: n per token and head), each through a short depthwise
    causal convolution (width 4) and SiLU; q and k L2-normalised per head (and factor);
  * beta_tj = sigmoid(w_b . x_t) (times 2 with ``allow_neg_eigval``), one per factor and head;
    with ``beta_stretch = m > 0`` the sigmoid is stretched and clipped,
    ``clip((1 + 2m) sigmoid(.) - m, 0, 1)``, so that beta reaches 0 and its maximum exactly (at
    |w_b . x_t| >= log((1 + m) / m)) instead of only in the limit;
  * the gate ``log alpha_t = -exp(A_log) * softplus(w_a . x_t + dt_bias)`` per head (Mamba-2's
    discretisation: exp(A_log) a decay rate, softplus(.) a positive step size);
  * the output RMS-normalised per head, multiplied by SiLU(W_g x_t), and projected back.

The scan is ``linrec.householder_scan`` with k of shape (B, T, n, H, K).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import linrec

from ._common import RMSNorm, ShortConv, check_input, check_state_tensor, inverse_softplus, num_sequences, unpack_state

ConvStates = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


class DeltaProduct(nn.Module):
    """(Gated) DeltaProduct token mixer: (B, T, d_model) -> (B, T, d_model).

    Args:
        d_model: input and output width.
        num_heads: H.
        head_dim: K = V, the key and value width per head (default d_model // num_heads).
        num_householder: n, the Householder factors per token (1 is (Gated) DeltaNet).
        use_gate: multiply the state by alpha_t = exp(log_gate_t) in (0, 1] each token (Gated DeltaNet).
        allow_neg_eigval: beta = 2 * sigmoid (eigenvalues in [-1, 1]) instead of sigmoid ([0, 1]).
        beta_stretch: m >= 0; m > 0 stretches the sigmoid by m on each side and clips it to [0, 1],
            so that a factor can be exactly the identity (beta = 0) or, with ``allow_neg_eigval``,
            an exact reflection (beta = 2, eigenvalue -1). With the plain sigmoid (m = 0, the
            papers' choice) beta only approaches 2: a trained one-layer parity model had
            beta = 1.99 on the flipping token, so its parity signal shrank 0.99x per flip and it
            failed past ~128 flips; with that beta set to exactly 2 the same model was right at
            length 512 (bench/results/tasks/beta_probe.md). Past the clip beta's gradient is zero.
        conv_size: width of the short convolutions on q, k, v (0 disables them).
        conv_init: "near_identity" (default) or "uniform" (Gated DeltaNet's); see ``ShortConv``.
        norm_eps: eps of the per-head output RMSNorm.
        backend: passed to ``linrec.householder_scan``.

    State: a tuple ``(conv_states, S)``: conv_states = (q, k, v) convolution states of shapes
    (N, H*K, W-1), (N, n*H*K, W-1), (N, n*H*V, W-1) in the input's dtype (None each when
    conv_size = 0), and S (N, H, K, V) float32.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: Optional[int] = None, num_householder: int = 2,
                 use_gate: bool = True, allow_neg_eigval: bool = True, beta_stretch: float = 0.0,
                 conv_size: int = 4, conv_init: str = "near_identity", norm_eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        head_dim = d_model // num_heads if head_dim is None else head_dim
        if head_dim < 1 or num_householder < 1 or num_heads < 1:
            raise ValueError(f"need num_heads >= 1, head_dim >= 1, num_householder >= 1, got "
                             f"{num_heads}, {head_dim}, {num_householder}")
        if not beta_stretch >= 0.0:
            raise ValueError(f"beta_stretch must be >= 0, got {beta_stretch}")
        H, K, n = num_heads, head_dim, num_householder
        self.d_model, self.num_heads, self.head_dim, self.num_householder = d_model, H, K, n
        self.use_gate, self.allow_neg_eigval, self.conv_size, self.backend = use_gate, allow_neg_eigval, conv_size, backend
        self.beta_stretch = float(beta_stretch)

        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, n * H * K, bias=False)
        self.v_proj = nn.Linear(d_model, n * H * K, bias=False)
        self.b_proj = nn.Linear(d_model, n * H, bias=False)
        if conv_size > 0:
            self.q_conv = ShortConv(H * K, conv_size, activation="silu", init=conv_init)
            self.k_conv = ShortConv(n * H * K, conv_size, activation="silu", init=conv_init)
            self.v_conv = ShortConv(n * H * K, conv_size, activation="silu", init=conv_init)
        if use_gate:
            self.a_proj = nn.Linear(d_model, H, bias=False)
            # Gated DeltaNet / Mamba-2 init: decay rates A ~ U[1, 16], step sizes dt log-uniform in
            # [1e-3, 1e-1], so alpha = exp(-A dt) starts between ~0.2 and ~1 across heads.
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
            self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.g_proj = nn.Linear(d_model, H * K, bias=False)
        self.o_norm = RMSNorm(K, eps=norm_eps)
        self.o_proj = nn.Linear(H * K, d_model, bias=False)

    def betas(self, x: Tensor) -> Tensor:
        """beta: (B, T, n, H) float32 in [0, 1], or [0, 2] with ``allow_neg_eigval``; x: (B, T, d_model)."""
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.beta_stretch > 0:
            m = self.beta_stretch
            beta = ((1.0 + 2.0 * m) * beta - m).clamp(0.0, 1.0)
        beta = 2.0 * beta if self.allow_neg_eigval else beta
        return rearrange(beta, "b t (n h) -> b t n h", n=self.num_householder)

    def log_gates(self, x: Tensor) -> Optional[Tensor]:
        """log alpha: (B, T, H) float32, <= 0, or None without ``use_gate``; x: (B, T, d_model)."""
        if not self.use_gate:
            return None
        return -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

    def forward(self, x: Tensor, state: Optional[Tuple[ConvStates, Tensor]] = None, return_state: bool = False,
                cu_seqlens: Optional[Tensor] = None, group=None
                ) -> Union[Tensor, Tuple[Tensor, Tuple[ConvStates, Tensor]]]:
        """Runs the layer over time.

        Args:
            x: (B, T, d_model) float32 | bfloat16 | float16.
            state: ``(conv_states, S)`` from a previous call (see the class doc), or None for zeros.
                N = B, or the number of packed sequences with ``cu_seqlens``.
            return_state: also return the new state.
            cu_seqlens: (N + 1,) int offsets of N sequences packed along T (B = 1), or None; the scan
                and the convolutions restart at every boundary.
            group: a torch.distributed process group for context parallelism, or None: x is this
                rank's slice of time, cu_seqlens the global offsets, the convolutions' halos come
                from the previous ranks, and the returned state is the whole sequence's.

        Returns:
            y: (B, T, d_model) in x's dtype; with ``return_state`` also the new ``(conv_states, S)``.
        """
        check_input("DeltaProduct", x, self.d_model)
        H, K, n = self.num_heads, self.head_dim, self.num_householder
        N = num_sequences(x, cu_seqlens)
        conv_states, S0 = (((None, None, None), None) if state is None
                           else unpack_state("DeltaProduct", state, "((q_conv, k_conv, v_conv), S)", 2))
        conv_states = unpack_state("DeltaProduct", conv_states, "((q_conv, k_conv, v_conv), S)", 3)
        if S0 is not None:
            check_state_tensor("DeltaProduct", "S", S0, (N, H, K, K), "(N, H, K, V)")
            S0 = S0.float()

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size > 0:
            q, cq = self.q_conv(q, conv_states[0], cu_seqlens, group=group)
            k, ck = self.k_conv(k, conv_states[1], cu_seqlens, group=group)
            v, cv = self.v_conv(v, conv_states[2], cu_seqlens, group=group)
            new_conv_states: ConvStates = (cq, ck, cv)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
            new_conv_states = (None, None, None)
        # Unit-norm q and k per head (and factor): then I - beta k k^T has eigenvalues in [1 - beta, 1].
        q = F.normalize(rearrange(q, "b t (h d) -> b t h d", h=H).float(), dim=-1, eps=1e-6).to(x.dtype)
        k = F.normalize(rearrange(k, "b t (n h d) -> b t n h d", n=n, h=H).float(), dim=-1, eps=1e-6).to(x.dtype)
        # In x's dtype like q and k (under autocast the projections come out in bf16).
        v = rearrange(v, "b t (n h d) -> b t n h d", n=n, h=H).to(x.dtype)

        scan = linrec.householder_scan
        if group is not None:
            from linrec.distributed import householder_scan as scan
            scan = functools.partial(scan, group=group)
        o, S = scan(q, k, v, self.betas(x), self.log_gates(x), S0, scale=K ** -0.5, output_final_state=return_state,
                    cu_seqlens=cu_seqlens, backend=self.backend)                 # o: (B, T, H, V)
        g = rearrange(self.g_proj(x), "b t (h d) -> b t h d", h=H)
        o = self.o_norm(o) * F.silu(g.float()).to(o.dtype)
        y = self.o_proj(rearrange(o, "b t h d -> b t (h d)").to(x.dtype))
        if return_state:
            return y, (new_conv_states, S)
        return y
