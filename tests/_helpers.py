"""Checks shared by the layer tests (tests/test_layers.py for every ``linrec.nn`` layer,
tests/test_mamba.py for Mamba's own): seeded inputs, gradients of a fixed random projection, and
the three properties every layer promises - another backend (same weights) agrees, a sequence fed
in pieces with the carried state equals one call, a packed batch equals separate calls."""

import torch

from conftest import DEVICE, rel_rms


def randn(*shape, seed=1):
    """A seeded standard-normal float32 tensor of ``shape`` on the test device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def grads_of(layer, x, y_fn):
    """Backpropagates a fixed random projection of y_fn(x); returns (y, {param name: grad}, grad_x)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = y_fn(x)
    w = randn(*y.shape, seed=7)
    (y * w).sum().backward()
    return y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()}, x.grad.detach()


def run_in_pieces(layer, x, lengths):
    """Feeds x (B, T, d) through the layer in consecutive pieces of ``lengths``, carrying the state."""
    state, ys, t = None, [], 0
    for n in lengths:
        y, state = layer(x[:, t:t + n], state=state, return_state=True)
        ys.append(y)
        t += n
    assert t == x.shape[1]
    return torch.cat(ys, dim=1)


def flat_state(state):
    """All tensors of a (nested tuple) state, in order, for comparisons (None parts left out)."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in flat_state(s)]


def select_sequence(state, i):
    """Sequence i of a (nested tuple) state, keeping a leading dim of 1."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[i:i + 1]
    return tuple(select_sequence(s, i) for s in state)


def assert_shapes_and_finite_gradients(layer, x):
    """The layer maps x (B, T, d_model) to its shape and dtype; the output, the input gradient and
    every parameter's gradient are finite, and no parameter's is zero; ``return_state=True`` gives
    the same output and a finite state, which is returned."""
    y, grads, gx = grads_of(layer, x, layer)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert len(grads) == len(list(layer.parameters()))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"non-finite grad for {name}"
        assert g.abs().sum() > 0, f"zero grad for {name}"
    y2, state = layer(x, return_state=True)
    assert torch.equal(y2, y)
    assert all(torch.isfinite(torch.view_as_real(s) if s.is_complex() else s).all() for s in flat_state(state))
    return state


def assert_layers_agree(layer, other, x, tol):
    """``other`` (given ``layer``'s weights) gives layer's output, input gradient and every parameter
    gradient on x (B, T, d_model), each within ``tol`` relative RMS."""
    other.load_state_dict(layer.state_dict())
    y, g, gx = grads_of(layer, x, layer)
    y2, g2, gx2 = grads_of(other, x, other)
    assert rel_rms(y2, y) < tol and rel_rms(gx2, gx) < tol
    for name in g:
        assert rel_rms(g2[name], g[name]) < tol, name


def assert_pieces_equal_one_call(layer, x, lengths, tol):
    """x (B, T, d_model) fed in pieces of ``lengths`` with the carried state gives one call's output
    and gradients; the final state after two pieces (T - 4 and 4 steps) is one call's."""
    y_full, g_full, gx_full = grads_of(layer, x, layer)
    y_pcs, g_pcs, gx_pcs = grads_of(layer, x, lambda xx: run_in_pieces(layer, xx, lengths))
    assert rel_rms(y_pcs, y_full) < tol
    assert rel_rms(gx_pcs, gx_full) < tol
    for name in g_full:
        assert rel_rms(g_pcs[name], g_full[name]) < tol, name
    cut = x.shape[1] - 4
    _, s_full = layer(x, return_state=True)
    _, s_pcs = layer(x[:, cut:], state=layer(x[:, :cut], return_state=True)[1], return_state=True)
    for a, b in zip(flat_state(s_pcs), flat_state(s_full), strict=True):
        assert rel_rms(a, b) < tol


def assert_packed_equals_separate_calls(layer, lengths, d_model, tol):
    """cu_seqlens: sequences of ``lengths`` packed into one (B = 1) batch give each sequence's own
    output and final state, from zero states and from N carried ones (a batched prefix's)."""
    seqs = [randn(1, n, d_model, seed=10 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    _, s0 = layer(randn(len(lengths), 3, d_model, seed=20), return_state=True)   # N initial states, batched
    for init in (None, s0):
        y_packed, s_packed = layer(torch.cat(seqs, dim=1), state=init, return_state=True, cu_seqlens=cu)
        ys = []
        for i, xs in enumerate(seqs):
            y_i, s_i = layer(xs, state=None if init is None else select_sequence(init, i), return_state=True)
            ys.append(y_i)
            for a, b in zip(flat_state(select_sequence(s_packed, i)), flat_state(s_i), strict=True):
                assert rel_rms(a, b) < tol
        assert rel_rms(y_packed, torch.cat(ys, dim=1)) < tol
