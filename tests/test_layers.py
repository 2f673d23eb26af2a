"""linrec.nn layers: shapes, finite gradients, state carry-over (pieces and token by token equal
one call, gradients included), packed variable-length batches, backend agreement, and the
parameter ranges each layer promises (|lambda|, a_t, beta, column norms)."""

import itertools
import math

import pytest
import torch

import linrec
from linrec.nn import LRU, RGLRU, BlockDiagonalRNN, DeltaProduct, Mamba, ShortConv
from linrec.nn._common import RMSNorm

from _helpers import (assert_layers_agree, assert_packed_equals_separate_calls, assert_pieces_equal_one_call,
                      assert_shapes_and_finite_gradients, randn)
from conftest import DEVICE, rel_rms

D_MODEL = 12

# name -> (constructor taking backend, the op the layer needs)
LAYERS = {
    "lru": (lambda be: LRU(D_MODEL, 8, backend=be), "diagonal_scan"),
    "rglru": (lambda be: RGLRU(D_MODEL, 10, backend=be), "diagonal_scan"),
    "rglru_neg": (lambda be: RGLRU(D_MODEL, 10, allow_neg_eigval=True, backend=be), "diagonal_scan"),
    "rglru_noconv": (lambda be: RGLRU(D_MODEL, conv_size=0, backend=be), "diagonal_scan"),
    "deltaproduct": (lambda be: DeltaProduct(D_MODEL, num_heads=2, head_dim=4, num_householder=2,
                                             backend=be), "householder_scan"),
    "deltanet_nogate": (lambda be: DeltaProduct(D_MODEL, num_heads=3, head_dim=4, num_householder=1, use_gate=False,
                                                allow_neg_eigval=False, backend=be), "householder_scan"),
    "deltaproduct_noconv": (lambda be: DeltaProduct(D_MODEL, num_heads=2, head_dim=3, num_householder=3,
                                                    conv_size=0, backend=be), "householder_scan"),
    "fan": (lambda be: BlockDiagonalRNN(D_MODEL, block_size=3, num_blocks=2, parameterization="fan",
                                        backend=be), "block_diagonal_scan"),
    "slice": (lambda be: BlockDiagonalRNN(D_MODEL, block_size=3, num_blocks=2, parameterization="slice",
                                          backend=be), "block_diagonal_scan"),
    "fan_max_center": (lambda be: BlockDiagonalRNN(D_MODEL, block_size=3, num_blocks=2, p=1.2, column_norm="max",
                                                   center_columns=True, backend=be), "block_diagonal_scan"),
    "mamba": (lambda be: Mamba(D_MODEL, d_state=4, expand=2, backend=be), "selective_scan"),
    "mamba_neg": (lambda be: Mamba(D_MODEL, d_state=3, expand=1, negative_eigenvalues=True, backend=be),
                  "selective_scan"),
}
NAMES = list(LAYERS)
TOL = 1e-5  # fp32, docs/design.md §8 (Numerics)


def make_layer(name, backend="auto", seed=0):
    ctor, op = LAYERS[name]
    assert hasattr(linrec, op), f"linrec.{op} is missing"
    torch.manual_seed(seed)
    return ctor(backend).to(DEVICE)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_gradients(name):
    assert_shapes_and_finite_gradients(make_layer(name), randn(2, 9, D_MODEL))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lengths", [[4, 1, 3, 5], [1] * 13], ids=["pieces", "token_by_token"])
def test_pieces_equal_one_call(name, lengths):
    """Chunked prefill / decoding with the carried state reproduces one call, gradients included."""
    assert_pieces_equal_one_call(make_layer(name), randn(2, 13, D_MODEL), lengths, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_packed_sequences_equal_separate_calls(name):
    """cu_seqlens: a packed batch (B = 1) gives each sequence's own outputs and final state, with and
    without initial states, and convolutions do not leak across boundaries."""
    assert_packed_equals_separate_calls(make_layer(name), [5, 1, 7], D_MODEL, TOL)


@pytest.mark.parametrize("name", NAMES)
def test_reference_backend_agrees(name):
    assert_layers_agree(make_layer(name), make_layer(name, backend="reference"), randn(2, 11, D_MODEL), TOL)


@pytest.mark.parametrize("name", ["lru", "rglru_neg", "deltaproduct", "fan", "slice"])
def test_triton_backend_agrees(name):
    """The Triton kernels (on the GPU, or in the CPU interpreter) give the torch backend's outputs and grads."""
    assert_layers_agree(make_layer(name, backend="torch"), make_layer(name, backend="triton"), randn(2, 11, D_MODEL),
                        TOL)


@pytest.mark.parametrize("name", ["lru", "rglru", "deltaproduct", "fan"])
def test_bfloat16_input_runs(name):
    layer = make_layer(name)
    x = randn(2, 9, D_MODEL)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    assert rel_rms(y16.float(), y32) < 5e-2


# ---- parameter ranges -------------------------------------------------------------------------

@pytest.mark.parametrize("r_min,r_max,max_phase", [(0.9, 0.999, 2 * math.pi), (0.0, 0.5, math.pi / 10)])
def test_lru_eigenvalues_on_the_ring(r_min, r_max, max_phase):
    torch.manual_seed(0)
    layer = LRU(D_MODEL, 4096, r_min=r_min, r_max=r_max, max_phase=max_phase)
    lam = layer.eigenvalues().detach()
    mod = lam.abs()
    assert mod.min() >= r_min - 1e-6 and mod.max() <= r_max + 1e-6
    # uniform on the ring's area: |lambda|^2 is uniform in [r_min^2, r_max^2], so its mean is the midpoint
    assert abs(mod.pow(2).mean().item() - (r_min ** 2 + r_max ** 2) / 2) < 0.02 * (r_max ** 2 - r_min ** 2) + 1e-3
    phase = torch.angle(lam) % (2 * math.pi)
    assert phase.max() <= max_phase + 1e-4
    gamma = torch.exp(layer.gamma_log.detach())
    assert torch.allclose(gamma, torch.sqrt(1 - mod.pow(2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("allow_neg", [False, True])
def test_rglru_gate_range(allow_neg):
    torch.manual_seed(0)
    layer = RGLRU(D_MODEL, 64, allow_neg_eigval=allow_neg)
    # at init a^c = exp(-c softplus(Lambda)) is uniform in [0.9, 0.999]
    a_c = torch.exp(-layer.c * torch.nn.functional.softplus(layer.Lambda.detach()))
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    with torch.no_grad():
        layer.Lambda.uniform_(-5.0, 5.0)         # include gates near 0 (and near -1)
        a, x_in = layer.gates(randn(4, 50, 64) * 5)
    lo = -1.0 if allow_neg else 0.0
    assert a.min() >= lo and a.max() <= 1.0 and torch.isfinite(x_in).all()
    if allow_neg:
        assert a.min() < -0.5                   # the negative range is reached
    else:
        assert a.min() > 0.0


@pytest.mark.parametrize("allow_neg", [False, True])
def test_delta_product_beta_range(allow_neg):
    torch.manual_seed(0)
    layer = DeltaProduct(D_MODEL, num_heads=2, head_dim=4, num_householder=3, allow_neg_eigval=allow_neg)
    beta = layer.betas(randn(2, 40, D_MODEL) * 20).detach()
    assert beta.shape == (2, 40, 3, 2)
    hi = 2.0 if allow_neg else 1.0
    assert beta.min() >= 0.0 and beta.max() <= hi
    assert beta.max() > (1.5 if allow_neg else 0.9)
    log_gate = layer.log_gates(randn(2, 40, D_MODEL)).detach()
    assert log_gate.shape == (2, 40, 2) and (log_gate <= 0).all()


@pytest.mark.parametrize("allow_neg", [False, True])
def test_delta_product_stretched_beta_reaches_its_ends_exactly(allow_neg):
    torch.manual_seed(0)
    hi = 2.0 if allow_neg else 1.0
    plain = DeltaProduct(D_MODEL, num_heads=2, head_dim=4, num_householder=2, allow_neg_eigval=allow_neg)
    stretched = DeltaProduct(D_MODEL, num_heads=2, head_dim=4, num_householder=2, allow_neg_eigval=allow_neg,
                             beta_stretch=0.1)
    stretched.load_state_dict(plain.state_dict())
    x = (randn(2, 40, D_MODEL) * 3).requires_grad_()      # logits of a few units: sigmoid(z) < 1 in fp32
    beta_plain, beta = plain.betas(x), stretched.betas(x)
    # The plain sigmoid only approaches its ends; the stretched one reaches them, and is the same
    # monotone map of the same logits elsewhere: clip(1.2 s - 0.1, 0, 1) with s the plain sigmoid.
    assert 0.0 < beta_plain.min() and beta_plain.max() < hi
    assert (beta == 0.0).any() and (beta == hi).any()
    torch.testing.assert_close(beta, ((1.2 * beta_plain / hi - 0.1).clamp(0, 1) * hi))
    # No gradient flows through a clipped beta; inside the range it is 1.2x the plain sigmoid's.
    (grad,) = torch.autograd.grad(beta.sum(), x)
    assert torch.isfinite(grad).all()
    clipped = (beta == 0.0) | (beta == hi)
    b_grad = torch.autograd.grad(stretched.betas(x), x, torch.ones_like(beta) * clipped)[0]
    assert (b_grad == 0).all()
    with pytest.raises(ValueError, match="beta_stretch"):
        DeltaProduct(D_MODEL, num_heads=2, beta_stretch=-0.1)


@pytest.mark.parametrize("p", [1.0, 1.2, 2.0])
def test_fan_columns_have_unit_bounded_p_norm(p):
    torch.manual_seed(0)
    layer = BlockDiagonalRNN(D_MODEL, block_size=4, num_blocks=3, parameterization="fan", p=p)
    A = layer.transitions(randn(2, 30, D_MODEL) * 10).detach()       # large inputs: normalisation active
    assert A.shape == (2, 30, 3, 4, 4)
    col = torch.linalg.vector_norm(A, ord=p, dim=-2)
    assert col.max() <= 1.0 + 1e-5
    assert col.max() >= 1.0 - 1e-5  # columns above 1 were scaled onto the unit sphere, not shrunk further
    if p == 1.0:  # induced l1 norm = max column l1 norm <= 1: the recurrence never expands in l1
        h = randn(2, 30, 3, 4)
        assert (torch.einsum("btgij,btgj->btgi", A, h).abs().sum(-1) <= h.abs().sum(-1) + 1e-5).all()


@pytest.mark.parametrize("parameterization", ["fan", "slice"])
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_max_column_norm_puts_every_block_on_the_unit_sphere(parameterization, scale):
    """column_norm="max": each block divided by its largest column p-norm, whatever the input's size
    (the clamp leaves blocks whose columns are all inside the ball alone); center_columns: 1^T A = 0."""
    torch.manual_seed(0)
    p = 1.2
    layer = BlockDiagonalRNN(D_MODEL, block_size=4, num_blocks=3, parameterization=parameterization, p=p,
                             column_norm="max", center_columns=True)
    A = layer.transitions(randn(2, 30, D_MODEL) * scale).detach()
    col = torch.linalg.vector_norm(A, ord=p, dim=-2)                     # (B, T, G, b)
    assert torch.allclose(col.amax(dim=-1), torch.ones(()), atol=1e-5)
    assert A.sum(dim=-2).abs().max() < 1e-5                             # every column sums to zero
    layer.center_columns = False
    A = layer.transitions(randn(2, 30, D_MODEL) * scale).detach()
    assert torch.allclose(torch.linalg.vector_norm(A, ord=p, dim=-2).amax(dim=-1), torch.ones(()), atol=1e-5)
    assert A.sum(dim=-2).abs().max() > 1e-2                             # not centred without the flag


def test_slice_starts_near_identity_and_is_linear_in_the_control():
    torch.manual_seed(0)
    layer = BlockDiagonalRNN(D_MODEL, block_size=4, num_blocks=3, parameterization="slice", slice_dim=5)
    u = randn(2, 30, D_MODEL)
    A = layer.transitions(u).detach()
    eye = torch.eye(4).expand_as(A)
    assert 0 < (A - eye).abs().max() < 0.2                       # input-dependent, near the identity
    assert torch.linalg.vector_norm(A, ord=layer.p, dim=-2).max() <= 1.0 + 1e-5   # clamped by default
    layer.slice_normalize = False
    with torch.no_grad():
        z = layer.z_proj(u)
        A_raw = layer.transitions(u)
        want = eye + sum(z[..., i, None, None, None] * layer.generators[i] for i in range(5))
    assert torch.allclose(A_raw, want, atol=1e-6)                 # A = I + sum_i z_i A_i exactly


# ---- short convolution and bad input ----------------------------------------------------------

def test_short_conv_matches_conv1d_and_resets_at_boundaries():
    torch.manual_seed(0)
    conv = ShortConv(5, 4, activation=None, bias=True).to(DEVICE)
    x = randn(1, 9, 5)
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias,
                                      groups=5).transpose(1, 2)
    y, state = conv(x)
    assert torch.allclose(y, want, atol=1e-6) and torch.equal(state, x[0, -3:].t()[None])
    cu = torch.tensor([0, 2, 9], device=DEVICE)
    y_packed, _ = conv(x, cu_seqlens=cu)
    # the default init is close to the identity on the current token (tap W - 1)
    assert (conv.weight[:, 0, -1] - 1).abs().max() <= 0.1 / math.sqrt(4) + 1e-6
    assert conv.weight[:, 0, :-1].abs().max() <= 0.1 / math.sqrt(4) + 1e-6
    assert torch.allclose(y_packed[:, :2], conv(x[:, :2])[0], atol=1e-6)
    assert torch.allclose(y_packed[:, 2:], conv(x[:, 2:])[0], atol=1e-6)


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_short_conv_packed_equals_separate_calls_with_states(kernel_size):
    """Packed sequences (an empty one, ones shorter than the kernel) with carried states give each
    sequence's own outputs and new state, as separate calls would."""
    torch.manual_seed(0)
    C, W = 3, kernel_size
    conv = ShortConv(C, W, activation="silu", bias=True).to(DEVICE)
    lengths = [5, 0, 1, 2, 7]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEVICE)
    x = randn(1, sum(lengths), C)
    state = randn(len(lengths), C, W - 1)
    y, new_state = conv(x, state, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_n, state_n = conv(x[:, s:e], state[n:n + 1])
        assert torch.allclose(y[:, s:e], y_n, atol=1e-6)
        assert torch.allclose(new_state[n:n + 1], state_n, atol=1e-6)


def test_short_conv_packed_compiles_without_graph_breaks():
    torch.manual_seed(0)
    conv = ShortConv(3, 4).to(DEVICE)
    x, cu, state = randn(1, 9, 3), torch.tensor([0, 2, 9], device=DEVICE), randn(2, 3, 3)
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    y, new_state = compiled(x, state, cu)
    y_want, state_want = conv(x, state, cu)
    assert torch.allclose(y, y_want, atol=1e-6) and torch.equal(new_state, state_want)


def test_rmsnorm_is_finite_for_states_whose_squares_overflow():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    x = torch.randn(3, 8)
    want = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)).float()
    assert torch.allclose(norm(x), want, atol=1e-6)
    assert torch.allclose(norm(x * 1e25), norm(x), atol=1e-6)       # (1e25)^2 overflows float32
    assert torch.equal(norm(torch.zeros(2, 8)), torch.zeros(2, 8))


@pytest.mark.parametrize("name", ["lru", "rglru", "deltaproduct", "fan"])
def test_bad_input_raises(name):
    layer = make_layer(name)
    with pytest.raises(ValueError, match="d_model"):
        layer(randn(2, 5, D_MODEL + 1))
    _, state = layer(randn(2, 5, D_MODEL), return_state=True)
    with pytest.raises(ValueError, match="state"):
        layer(randn(3, 5, D_MODEL), state=state)
    with pytest.raises(ValueError, match="B = 1"):
        layer(randn(2, 5, D_MODEL), cu_seqlens=torch.tensor([0, 5], device=DEVICE))


@pytest.mark.parametrize("name, structure", [("rglru", r"\(conv_state, h\)"),
                                             ("deltaproduct", r"\(\(q_conv, k_conv, v_conv\), S\)")])
def test_state_of_the_wrong_structure_names_the_structure(name, structure):
    layer = make_layer(name)
    _, (conv, h) = layer(randn(2, 5, D_MODEL), return_state=True)
    for wrong, got in ((h, "a tensor of shape"), ((h,), "a tuple of length 1"), ((conv, h, h), "length 3")):
        with pytest.raises(TypeError, match=structure) as info:
            layer(randn(2, 5, D_MODEL), state=wrong)
        assert got in str(info.value)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="parameterization"):
        BlockDiagonalRNN(D_MODEL, 2, 2, parameterization="dense")
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        BlockDiagonalRNN(D_MODEL, 2, 2, allow_neg_eigval=False)
    with pytest.raises(ValueError, match="column_norm"):
        BlockDiagonalRNN(D_MODEL, 2, 2, column_norm="frobenius")
    with pytest.raises(ValueError, match="r_min"):
        LRU(D_MODEL, 4, r_min=0.5, r_max=1.0)
