"""linrec.nn.Mamba: shapes, finite gradients, decoding token by token equal to the full pass,
packed sequences equal to separate calls, backend agreement, initialisation, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from linrec.nn import Mamba

from _helpers import (assert_layers_agree, assert_packed_equals_separate_calls, assert_pieces_equal_one_call,
                      assert_shapes_and_finite_gradients, randn)
from conftest import DEVICE, assert_compiled_matches_eager, rel_rms

D_MODEL = 8
TOL = 1e-5


def make(backend="auto", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("d_state", 4)
    return Mamba(D_MODEL, backend=backend, **kw).to(DEVICE)


@pytest.mark.parametrize("neg", [False, True])
def test_shapes_and_finite_gradients(neg):
    layer = make(negative_eigenvalues=neg)
    conv_state, h = assert_shapes_and_finite_gradients(layer, randn(2, 9, D_MODEL))
    assert conv_state.shape == (2, layer.d_inner, 3) and h.shape == (2, layer.d_inner, 4) and h.dtype == torch.float32


@pytest.mark.parametrize("neg", [False, True])
@pytest.mark.parametrize("lengths", [[4, 1, 3, 5], [1] * 13], ids=["pieces", "token_by_token"])
def test_decoding_equals_full_pass(neg, lengths):
    """Chunked prefill / token-by-token decoding with the carried state reproduces one call, gradients included."""
    assert_pieces_equal_one_call(make(negative_eigenvalues=neg), randn(2, 13, D_MODEL), lengths, TOL)


def test_varlen_equals_separate_calls():
    """Packed sequences, an empty one among them, equal separate calls (outputs and final states)."""
    assert_packed_equals_separate_calls(make(negative_eigenvalues=True), [5, 1, 7, 0], D_MODEL, TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backends_agree(backend):
    assert_layers_agree(make("torch", negative_eigenvalues=True), make(backend, negative_eigenvalues=True),
                        randn(2, 11, D_MODEL), TOL)


def test_initialisation():
    layer = Mamba(64, d_state=16)
    assert layer.d_inner == 128 and layer.dt_rank == 4
    torch.testing.assert_close(-layer.A_log.exp(), -torch.arange(1.0, 17.0).repeat(128, 1))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not clustered
    torch.testing.assert_close(layer.D.detach(), torch.ones(128))
    assert layer.dt_proj.weight.abs().max() <= 4 ** -0.5


def test_negative_eigenvalues_reach_negative_transitions():
    """With negative_eigenvalues the transition 2 exp(dt A) - 1 is negative where dt A < -log 2."""
    layer = make(negative_eigenvalues=True)
    with torch.no_grad():
        layer.dt_proj.bias.fill_(3.0)  # dt ~ 3: dt A <= -3 for every state
    x = randn(1, 6, D_MODEL)
    _, (_, h1) = layer(x[:, :5], return_state=True)
    _, (_, h2) = layer(x[:, 5:], state=(layer(x[:, :5], return_state=True)[1][0], h1), return_state=True)
    assert torch.isfinite(h2).all()
    # most of the old state flips sign in one step (the input's share is small against it only sometimes)
    assert (torch.sign(h2) != torch.sign(h1)).float().mean() > 0.3


def test_bfloat16_and_autocast_run():
    layer = make()
    x = randn(2, 9, D_MODEL)
    y32 = layer(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ya = layer(x)
    assert ya.dtype == torch.bfloat16 and rel_rms(ya.float(), y32) < 5e-2
    y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    assert rel_rms(y16.float(), y32) < 5e-2


def test_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = make("torch", negative_eigenvalues=True)

        def forward(self, u):
            return self.mixer(u).square().mean()

    assert_compiled_matches_eager(Model(), randn(2, 10, D_MODEL))


def test_no_convolution():
    layer = make(d_conv=0)
    y, (conv_state, h) = layer(randn(1, 5, D_MODEL), return_state=True)
    assert conv_state is None and torch.isfinite(y).all()


def test_bad_input_raises():
    layer = make()
    with pytest.raises(ValueError, match="Mamba expects input of shape"):
        layer(randn(2, 5, D_MODEL + 1))
    with pytest.raises(TypeError, match=r"state must be the tuple \(conv_state, h\)"):
        layer(randn(2, 5, D_MODEL), state=torch.zeros(2, 16, 4))
    with pytest.raises(ValueError, match="state h must have shape"):
        layer(randn(2, 5, D_MODEL), state=(None, torch.zeros(3, 16, 4)))
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(D_MODEL, dt_rank=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(D_MODEL, dt_min=0.2, dt_max=0.1)
