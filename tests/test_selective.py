"""selective_scan (Mamba): every backend against the float64 reference, outputs and every gradient.

The gradient oracle is autograd through ``selective_scan_reference`` itself in float64 (the loop,
not the op), so it is independent of the hand-written backwards of the chunked form and the
Triton kernels. Triton runs in its CPU interpreter without a GPU, so the shapes stay small.
"""

import math

import pytest
import torch

import linrec
from linrec.selective import selective_scan, selective_scan_chunked, selective_scan_reference
from linrec.selective.chunked import selective_scan_chunked_backward

from conftest import DEVICE, HAS_CUDA, TOL, assert_compiled_matches_eager, rel_rms, run_with_grads, to64

BACKENDS = ["triton", "torch", "reference"]
NAMES = ("x", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(Bsz, T, D, N, *, G=None, N_seq=None, dtype=torch.float32, seed=0, optional=True, h0=True):
    """Mamba-like inputs: A = -[1..N] scaled, dt around softplus(delta + bias) in [1e-3, 1e-1]-ish."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale
    x = r(Bsz, T, D)
    delta = r(Bsz, T, D, scale=0.5)
    A = -(torch.arange(1, N + 1, dtype=torch.float32)[None, :] * (0.5 + torch.rand(D, 1, generator=g)))
    bc_shape = (Bsz, T, N) if G is None else (Bsz, T, G, N)
    B, C = r(*bc_shape), r(*bc_shape)
    Dv = r(D) if optional else None
    z = r(Bsz, T, D) if optional else None
    bias = (torch.rand(D, generator=g) * 4 - 4) if optional else None   # softplus(bias) in ~[0.02, 0.7]
    state = r(N_seq if N_seq is not None else Bsz, D, N) if h0 else None
    cast = [t.to(dtype) for t in (x, delta)] + [A] + [t.to(dtype) for t in (B, C)]
    return cast + [Dv, None if z is None else z.to(dtype), bias, state]


def _call(backend, inputs, *, softplus=True, reverse=False, cu_seqlens=None, neg=False):
    def fn(*leaves):
        x, delta, A, B, C, D, z, bias, h0 = leaves
        return selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=softplus, initial_state=h0,
                              output_final_state=True, reverse=reverse, cu_seqlens=cu_seqlens,
                              negative_eigenvalues=neg, backend=backend)
    return fn


def _oracle(inputs, *, softplus=True, reverse=False, cu_seqlens=None, neg=False):
    def fn(*leaves):
        x, delta, A, B, C, D, z, bias, h0 = leaves
        return selective_scan_reference(x, delta, A, B, C, D, z, bias, softplus, h0, reverse, cu_seqlens, neg)
    return run_with_grads(fn, [to64(t) for t in inputs], device="cpu")


def _check(backend, inputs, tol, **flags):
    cu = flags.get("cu_seqlens")
    dev_flags = dict(flags, cu_seqlens=None if cu is None else cu.to(DEVICE))
    outs, grads = run_with_grads(_call(backend, inputs, **dev_flags), inputs)
    outs_ref, grads_ref = _oracle(inputs, **flags)
    assert outs[0].dtype == inputs[0].dtype and outs[0].shape == inputs[0].shape
    assert outs[1].dtype == torch.float32
    for i, (out, ref) in enumerate(zip(outs, outs_ref)):
        assert torch.isfinite(out).all(), f"output {i} not finite"
        assert rel_rms(out.cpu(), ref) < tol, f"output {i} error {rel_rms(out.cpu(), ref)}"
    for name, inp, got, want in zip(NAMES, inputs, grads, grads_ref):
        if inp is None:
            assert got is None
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        assert torch.isfinite(got).all(), f"grad of {name} not finite"
        err = rel_rms(got.cpu(), want)
        assert err < tol, f"grad of {name} error {err}"


# The fp32 reference at T = 1029 is not a case: it would be the oracle's own loop in fp32.
@pytest.mark.parametrize("backend, T", [(b, T) for b in BACKENDS for T in (1, 7, 100, 1029)
                                        if not (b == "reference" and T > 100)])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_reference(backend, T, reverse):
    inputs = _inputs(2 if T < 1000 else 1, T, 8, 4)  # one sequence at T = 1029: the interpreter is slow
    _check(backend, inputs, TOL[torch.float32], reverse=reverse)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_match_reference(backend, dtype):
    inputs = _inputs(2, 60, 8, 4, dtype=dtype)
    _check(backend, inputs, TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("neg", [False, True])
def test_grouped_B_C(backend, neg):
    inputs = _inputs(2, 37, 8, 4, G=2)
    _check(backend, inputs, 1e-5, neg=neg, reverse=neg)
    inputs = _inputs(1, 12, 12, 3, G=4)  # 3 channels per group: the Triton blocks shrink to one channel
    _check(backend, inputs, 1e-5, neg=neg)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("softplus", [False, True])
def test_without_optional_tensors(backend, softplus):
    inputs = _inputs(2, 33, 8, 4, optional=False, h0=False)
    if not softplus:
        inputs[1] = inputs[1].abs() * 0.1  # dt = delta must be a positive step
    _check(backend, inputs, 1e-5, softplus=softplus)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
def test_varlen_with_empty_sequences(backend, reverse):
    lengths = [5, 0, 23, 1, 17, 0]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    inputs = _inputs(1, T, 8, 4, N_seq=len(lengths), G=2)
    _check(backend, inputs, 1e-5, reverse=reverse, cu_seqlens=cu, neg=True)
    # each packed sequence equals the same sequence run alone
    dev = [None if t is None else t.to(DEVICE) for t in inputs]
    y, final = _call(backend, dev, reverse=reverse, cu_seqlens=cu.to(DEVICE), neg=True)(*dev)
    x, delta, A, B, C, D, z, bias, h0 = dev
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:
            torch.testing.assert_close(final[n], h0[n])  # an empty sequence hands on its initial state
            continue
        y1, f1 = selective_scan(x[:, s:e], delta[:, s:e], A, B[:, s:e], C[:, s:e], D, z[:, s:e], delta_bias=bias,
                                delta_softplus=True, initial_state=h0[n:n + 1], output_final_state=True,
                                reverse=reverse, negative_eigenvalues=True, backend=backend)
        torch.testing.assert_close(y[:, s:e], y1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final[n:n + 1], f1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_final_state_alone_carries_gradients(backend):
    """A loss on the final state only (grad_y is None inside the op) still reaches every input."""
    inputs = _inputs(2, 19, 8, 4)
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in inputs]
    _, final = _call(backend, leaves)(*leaves)
    final.square().sum().backward()
    ref = [to64(t).requires_grad_() for t in inputs]
    selective_scan_reference(*ref[:8], True, ref[8])[1].square().sum().backward()
    for name, got, want in zip(NAMES, leaves, ref):
        if name in ("C", "D", "z"):  # the state does not depend on the read-out
            assert torch.all(got.grad == 0), name
            continue
        assert rel_rms(got.grad.cpu(), want.grad) < 1e-5, name


def test_states_carry_over_in_pieces():
    """Running [0, t) then [t, T) from the first piece's final state equals one call (a decoder's prefill)."""
    inputs = [t.to(DEVICE) for t in _inputs(2, 30, 8, 4)]
    for backend in ("triton", "torch"):
        y, final = _call(backend, inputs)(*inputs)
        x, delta, A, B, C, D, z, bias, h0 = inputs
        first = _call(backend, [x[:, :11], delta[:, :11], A, B[:, :11], C[:, :11], D, z[:, :11], bias, h0])
        y1, f1 = first(x[:, :11], delta[:, :11], A, B[:, :11], C[:, :11], D, z[:, :11], bias, h0)
        y2, f2 = first(x[:, 11:], delta[:, 11:], A, B[:, 11:], C[:, 11:], D, z[:, 11:], bias, f1)
        assert rel_rms(torch.cat([y1, y2], 1), y) < 1e-6 and rel_rms(f2, final) < 1e-6


def test_chunked_form_blocks_of_time():
    """The torch form's time blocks (forced small) give the reference's outputs and gradients."""
    inputs = [to64(t) for t in _inputs(1, 50, 4, 3, N_seq=3, G=2)]
    cu = torch.tensor([0, 9, 9, 50])
    args = (*inputs[:8], True, inputs[8], False, cu, True)
    y_ref, f_ref = selective_scan_reference(*args)
    gy = torch.randn_like(y_ref)
    gf = torch.randn_like(f_ref)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = selective_scan_reference(*leaves[:8], True, leaves[8], False, cu, True)
    torch.autograd.backward(out, (gy, gf))
    for block_elements in (1, 4 * 3 * 7, 10 ** 6):
        y, f = selective_scan_chunked(*args, block_elements=block_elements)
        assert rel_rms(y, y_ref) < 1e-12 and rel_rms(f, f_ref) < 1e-12
        grads = selective_scan_chunked_backward(*args, gy, gf, block_elements=block_elements)
        for name, got, leaf in zip(NAMES, grads, leaves):
            assert rel_rms(got, leaf.grad) < 1e-12, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradcheck_float64(backend):
    inputs = [to64(t).to(DEVICE).requires_grad_() for t in _inputs(1, 6, 4, 3, N_seq=2)]
    cu = torch.tensor([0, 2, 6], device=DEVICE)
    fast = backend == "triton" and not HAS_CUDA  # the interpreter is slow: random projections of the Jacobian
    for neg, reverse in ((False, False), (True, True)):
        fn = _call(backend, inputs, cu_seqlens=cu, neg=neg, reverse=reverse)
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


def test_negative_eigenvalues_flip_the_state():
    """With dt A -> -inf, abar = exp(dt A) = 0 forgets, and 2 abar - 1 = -1 flips the sign (parity)."""
    x = torch.zeros(1, 4, 1)
    x[0, 0, 0] = 1.0
    delta = torch.full((1, 4, 1), 1e4)
    A = -torch.ones(1, 1)
    B = torch.full((1, 4, 1), 1e-4)  # dt B x = 1 at t = 0
    C = torch.ones(1, 4, 1)
    for backend in ("triton", "torch", "reference"):
        y_neg, _ = selective_scan(x, delta, A, B, C, negative_eigenvalues=True, backend=backend)
        y_pos, _ = selective_scan(x, delta, A, B, C, backend=backend)
        torch.testing.assert_close(y_neg[0, :, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
        torch.testing.assert_close(y_pos[0, :, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_largest_state_size(backend):
    inputs = _inputs(1, 5, 2, 256)
    _check(backend, inputs, 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
def test_non_finite_inputs_stay_causal(backend, reverse):
    """A NaN / inf at step t reaches only later steps (in the scan's direction) of its own sequence."""
    cu = torch.tensor([0, 10, 25], device=DEVICE)
    inputs = [t.to(DEVICE) for t in _inputs(1, 25, 8, 4, N_seq=2)]
    clean, _ = _call(backend, inputs, cu_seqlens=cu, reverse=reverse)(*inputs)
    bad_t = 16
    for which, value in ((0, float("nan")), (1, float("inf")), (3, float("nan"))):
        dirty = list(inputs)
        dirty[which] = inputs[which].clone()
        dirty[which][0, bad_t] = value
        y, _ = _call(backend, dirty, cu_seqlens=cu, reverse=reverse)(*dirty)
        earlier = slice(10, bad_t) if not reverse else slice(bad_t + 1, 25)
        torch.testing.assert_close(y[:, earlier], clean[:, earlier])
        torch.testing.assert_close(y[:, :10], clean[:, :10])  # the other sequence


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noncontiguous_inputs_and_no_mutation(backend):
    big = _inputs(2, 40, 16, 8, G=2)
    inputs = [big[0][:, ::2, ::2], big[1][:, ::2, ::2], big[2][::2, ::2], big[3][:, ::2, :, ::2],
              big[4][:, ::2, :, ::2], big[5][::2], big[6][:, ::2, ::2], big[7][::2], big[8][:, ::2, ::2]]
    inputs = [t.to(DEVICE) for t in inputs]
    snapshot = [t.clone() for t in inputs]
    leaves = [t.clone().requires_grad_() for t in inputs]
    y, final = _call(backend, leaves)(*leaves)
    (y.sum() + final.sum()).backward()  # stride-0 incoming gradients
    ref = [to64(t).cpu().requires_grad_() for t in inputs]
    y_ref, f_ref = selective_scan_reference(*ref[:8], True, ref[8])
    (y_ref.sum() + f_ref.sum()).backward()
    assert rel_rms(y.cpu(), y_ref) < 1e-5
    for name, got, want in zip(NAMES, leaves, ref):
        assert rel_rms(got.grad.cpu(), want.grad) < 1e-5, name
    for before, after in zip(snapshot, inputs):
        assert torch.equal(before, after)


def test_auto_backend_and_final_state_flag():
    inputs = _inputs(1, 10, 4, 2)
    x, delta, A, B, C, D, z, bias, h0 = inputs
    y, final = selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, initial_state=h0)
    assert final is None
    y_t, _ = selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, initial_state=h0, backend="torch")
    torch.testing.assert_close(y, y_t)


def test_opcheck():
    x, delta, A, B, C, D, z, bias, h0 = _inputs(2, 9, 4, 3, G=2)
    for backend in BACKENDS:
        for reverse in (False, True):
            args = [t.clone().requires_grad_() for t in (x, delta, A, B, C, D, z, bias, h0)]
            torch.library.opcheck(torch.ops.linrec.selective_scan.default,
                                  (*args, None, True, reverse, reverse, backend))
    x, delta, A, B, C, D, z, bias, h0 = _inputs(1, 9, 4, 3, N_seq=2)
    args = [t.clone().requires_grad_() for t in (x, delta, A, B.unsqueeze(2), C.unsqueeze(2), None, None, None, h0)
            if t is not None]
    torch.library.opcheck(torch.ops.linrec.selective_scan.default,
                          (*args[:5], None, None, None, args[5], torch.tensor([0, 4, 9]), False, False, False, "torch"))


def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 4 * 3 + 2 * 4)
            self.A_log = torch.nn.Parameter(torch.zeros(4, 3))

        def forward(self, u, cu):
            x, delta, z, B, C = self.proj(u).split([4, 4, 4, 4, 4], dim=-1)
            y, final = selective_scan(x, delta, -self.A_log.exp(), B[..., :3], C[..., :3], None, z,
                                      delta_softplus=True, output_final_state=True, cu_seqlens=cu,
                                      negative_eigenvalues=True, backend="torch")
            return y.square().sum() + final.sum()

    assert_compiled_matches_eager(Model(), torch.randn(1, 12, 6), torch.tensor([0, 5, 12]))


# --- bad input: each raises a clear error naming the argument -------------------------------------

def _good():
    return _inputs(2, 5, 4, 3)


@pytest.mark.parametrize("case, exc, match", [
    (lambda a: selective_scan(a[0][0], *a[1:5]), ValueError, "x must have 3 dimensions"),
    (lambda a: selective_scan(a[0].long(), *a[1:5]), TypeError, "x must have dtype"),
    (lambda a: selective_scan(a[0], a[1][:, :4], *a[2:5]), ValueError, "delta must have shape"),
    (lambda a: selective_scan(a[0], a[1], a[2][:3], *a[3:5]), ValueError, "A must have shape"),
    (lambda a: selective_scan(a[0], a[1], a[2][0], *a[3:5]), ValueError, "A must have 2 dimensions"),
    (lambda a: selective_scan(*a[:3], a[3][..., :2], a[4]), ValueError, "B must have shape"),
    (lambda a: selective_scan(*a[:3], a[3].numpy(), a[4]), TypeError, "B must be a torch.Tensor"),
    (lambda a: selective_scan(*a[:4], a[4].unsqueeze(2).expand(2, 5, 3, 3)), ValueError, "G must divide D"),
    (lambda a: selective_scan(*a[:3], a[3].unsqueeze(2).expand(2, 5, 2, 3), a[4]), ValueError,
     "B and C must have the same number of groups"),
    (lambda a: selective_scan(*a[:5], a[5][:3]), ValueError, "D must have shape"),
    (lambda a: selective_scan(*a[:5], None, a[6][:1]), ValueError, "z must have shape"),
    (lambda a: selective_scan(*a[:5], delta_bias=a[7][None]), ValueError, "delta_bias must have 1 dimensions"),
    (lambda a: selective_scan(*a[:5], initial_state=a[8][:1]), ValueError, "initial_state must have shape"),
    (lambda a: selective_scan(*a[:5], initial_state=a[8].long()), TypeError, "initial_state must have dtype"),
    (lambda a: selective_scan(*a[:5], reverse=1), TypeError, "reverse must be a bool"),
    (lambda a: selective_scan(*a[:5], negative_eigenvalues="yes"), TypeError, "negative_eigenvalues must be a bool"),
    (lambda a: selective_scan(*a[:5], backend="cuda"), ValueError, "backend='cuda' is not implemented"),
    (lambda a: selective_scan(*[t[:1] for t in a[:2]], a[2], *[t[:1] for t in a[3:5]],
                              cu_seqlens=torch.tensor([0, 3, 4])), ValueError, "cu_seqlens must end"),
    (lambda a: selective_scan(a[0][:, :, :1], a[1][:, :, :1], torch.zeros(1, 257), torch.zeros(2, 5, 257),
                              torch.zeros(2, 5, 257), backend="triton"), ValueError, "N <= 256"),
])
def test_bad_input(case, exc, match):
    with pytest.raises(exc, match=match):
        case(_good())
