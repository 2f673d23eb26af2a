"""diagonal_scan: every backend against the float64 reference, forward and backward."""

import pytest
import torch

import linrec
import linrec._common
from linrec import _cpp
from linrec.diagonal import diagonal_scan_reference

from conftest import (DEVICE, HAS_CUDA, TOL, assert_close_to_reference, assert_compiled_matches_eager, rel_rms,
                      run_with_grads, to64)

BACKENDS = ["triton", "torch", "cpp"]
WIDE_BACKENDS = ["triton", "torch"]  # float64 / complex128 too (the compiled CPU backend stops at fp32 / complex64)


def _inputs(B, T, D, dtype, *, a_kind="mixed", seed=0, a_shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = a_shape if a_shape is not None else (B, T, D)
    if dtype.is_complex:
        r = torch.rand(shape, generator=g) * 0.3 + 0.69
        theta = torch.rand(shape, generator=g) * 6.28
        a = torch.polar(r, theta).to(dtype)
        x = torch.randn(B, T, D, generator=g, dtype=torch.float32).to(dtype) + 1j * torch.randn(B, T, D, generator=g)
        return a, x.to(dtype)
    if a_kind == "mixed":  # negatives, zeros (resets) and ones (no decay) among gates in [-1, 1]
        a = torch.rand(shape, generator=g) * 2 - 1
        flat = a.view(-1)
        flat[::7] = 0.0
        flat[3::11] = 1.0
        flat[5::13] = -1.0
    else:
        a = torch.rand(shape, generator=g) * 0.1 + 0.9
    x = torch.randn(B, T, D, generator=g)
    return a.to(dtype), x.to(dtype)


def _run(backend, a, x, h0, reverse, cu_seqlens=None, device=None):
    """Forward + backward of a random projection; returns (h, [grads of a, x, h0])."""
    device = device or DEVICE
    cu = cu_seqlens.to(device) if cu_seqlens is not None else None
    (h,), grads = run_with_grads(lambda *t: linrec.diagonal_scan(*t, reverse=reverse, cu_seqlens=cu, backend=backend),
                                 (a, x, h0), device=device)
    return h, grads


def _check(backend, a, x, h0, reverse, tol, cu_seqlens=None):
    h, grads = _run(backend, a, x, h0, reverse, cu_seqlens)
    h_ref, grads_ref = _run("reference", to64(a), to64(x), to64(h0), reverse, cu_seqlens)
    assert h.dtype == x.dtype
    assert_close_to_reference([h], [h_ref], grads, grads_ref, (a, x, h0), ("a", "x", "initial_state"), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 100, 1029])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_reference(backend, T, reverse):
    a, x = _inputs(2, T, 19, torch.float32)
    h0 = torch.randn(2, 19)
    _check(backend, a, x, h0, reverse, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
def test_dtypes_match_reference(backend, dtype, reverse):
    a, x = _inputs(2, 77, 24, dtype)
    h0 = torch.randn(2, 24, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
    _check(backend, a, x, h0, reverse, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_shape", [(19,), (1, 50, 19), (3, 1, 19), (1, 1, 1)])
def test_broadcast_a(backend, a_shape):
    a, x = _inputs(3, 50, 19, torch.float32, a_shape=a_shape, a_kind="decay")
    _check(backend, a, x, None, False, 1e-5)
    h, grads = _run(backend, a, x, None, False)
    assert grads[0].shape == a.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_varlen_equals_separate_sequences(backend, reverse):
    lengths = [5, 0, 33, 1, 17]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    a, x = _inputs(1, T, 12, torch.float32)
    h0 = torch.randn(len(lengths), 12)
    _check(backend, a, x, h0, reverse, 1e-5, cu_seqlens=cu)
    h, _ = _run(backend, a, x, h0, reverse, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e > s:
            single = linrec.diagonal_scan(a[:, s:e].to(DEVICE), x[:, s:e].to(DEVICE), h0[n : n + 1].to(DEVICE),
                                          reverse=reverse, backend=backend)
            torch.testing.assert_close(h[:, s:e].detach(), single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_triton_chunked_sweep(reverse, varlen, dtype):
    """Long sequences with few channels are split into chunks run in parallel (3-step sweep)."""
    from linrec.kernels.diagonal import diagonal_scan_backward, diagonal_scan_forward
    from linrec.diagonal.chunked import diagonal_scan_chunked_backward

    cu = torch.tensor([0, 37, 37, 100, 101, 170]) if varlen else None
    B, T = (1, 170) if varlen else (2, 101)
    N = 5 if varlen else B
    a, x = _inputs(B, T, 6, dtype)
    h0 = torch.randn(N, 6, dtype=dtype)
    g = torch.randn(B, T, 6, dtype=dtype)
    a64, x64, h064, g64 = (to64(t) for t in (a, x, h0, g))
    ref = diagonal_scan_reference(a64, x64, h064, cu_seqlens=cu, reverse=reverse)
    grads_ref = diagonal_scan_chunked_backward(a64, ref, g64, h064, cu_seqlens=cu, reverse=reverse)
    for chunks in (3, 7):
        dev = [t.to(DEVICE) for t in (a, x, h0, g)]
        cu_dev = cu.to(DEVICE) if cu is not None else None
        h = diagonal_scan_forward(dev[0], dev[1], dev[2], cu_seqlens=cu_dev, reverse=reverse, num_chunks=chunks)
        assert rel_rms(h.cpu(), ref) < 1e-5
        grads = diagonal_scan_backward(dev[0], ref.to(dtype).to(DEVICE), dev[3], dev[2], cu_seqlens=cu_dev,
                                       reverse=reverse, x_dtype=dtype, num_chunks=chunks)
        for got, want in zip(grads, grads_ref):
            assert rel_rms(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("a_shape", [(19,), (3, 1, 19), (1, 1, 1), "strided"])
def test_triton_complex_a_strides(a_shape):
    """complex64 on the Triton backend with a's strides other than a contiguous (B, T, D): the
    kernel loads each tile row as interleaved (re, im) scalars and addresses a by its element
    strides (0 along broadcast dims; (1, 3, 150) for a permuted (D, T, B) tensor), forward and
    backward."""
    if a_shape == "strided":
        a_dtb, _ = _inputs(19, 50, 3, torch.complex64)
        a = a_dtb.permute(2, 1, 0)  # (3, 50, 19), dense (its copies keep the strides), channel stride 150
        assert a.stride() == (1, 3, 150)
        _, x = _inputs(3, 50, 19, torch.complex64, seed=1)
    else:
        a, x = _inputs(3, 50, 19, torch.complex64, a_shape=a_shape)
    h0 = torch.randn(3, 19, dtype=torch.complex64)
    for reverse in (False, True):
        _check("triton", a, x, h0, reverse, TOL[torch.complex64])


@pytest.mark.parametrize("model", [None, "h100"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_triton_empty_time_axis_with_initial_state(dtype, reverse, model, monkeypatch):
    """T = 0 with an initial state (a reported interpreter failure, 'mask has unsupported dtype'):
    h is empty, and so are dL/da and dL/dx; dL/dh0 is zero (no step reads h0). Under the
    interpreter's own plan and the plan an H100 would launch (one-tile look-back chunks)."""
    if model is not None:
        if DEVICE != "cpu":
            pytest.skip("the device model is an interpreter plan")
        monkeypatch.setenv("LINREC_DEVICE_MODEL", model)
    B, D = 2, 24
    a, x = _inputs(B, 0, D, dtype)
    h0 = torch.randn(B, D).to(dtype)
    a, x, h0 = (t.to(DEVICE).requires_grad_(True) for t in (a, x, h0))
    h = linrec.diagonal_scan(a, x, initial_state=h0, reverse=reverse, backend="triton")
    assert h.shape == (B, 0, D) and h.dtype == dtype
    grad_a, grad_x, grad_h0 = torch.autograd.grad(h, (a, x, h0), torch.ones_like(h))
    assert grad_a.shape == (B, 0, D) and grad_x.shape == (B, 0, D)
    assert grad_h0.shape == (B, D) and grad_h0.dtype == dtype
    assert torch.count_nonzero(grad_h0) == 0
    # Packed: every sequence empty.
    cu = torch.tensor([0, 0, 0], device=DEVICE)
    h = linrec.diagonal_scan(a[:1], x[:1], initial_state=h0, cu_seqlens=cu, reverse=reverse, backend="triton")
    assert h.shape == (1, 0, D)


@pytest.mark.parametrize("backend", WIDE_BACKENDS)
def test_gradcheck_float64(backend):
    a, x = _inputs(2, 9, 3, torch.float32)
    args = [t.double().to(DEVICE).requires_grad_() for t in (a, x, torch.randn(2, 3))]
    # The interpreter is slow: fast mode checks random projections of the Jacobian.
    fast = backend == "triton" and not HAS_CUDA
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda a_, x_, h0_: linrec.diagonal_scan(a_, x_, h0_, reverse=reverse, backend=backend), args,
            fast_mode=fast)
    c = [t.to(torch.complex128).to(DEVICE).requires_grad_() for t in (a * 0.5 + 0.3j, x, torch.randn(2, 3) * 1j)]
    assert torch.autograd.gradcheck(lambda a_, x_, h0_: linrec.diagonal_scan(a_, x_, h0_, backend=backend), c,
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_fp32_accuracy(backend):
    # T >= 65536 exercises 64-bit offsets and the accumulated error of long carries.
    T = 70000
    a, x = _inputs(1, T, 1 if not HAS_CUDA else 64, torch.float32, a_kind="decay")
    h = linrec.diagonal_scan(a.to(DEVICE), x.to(DEVICE), backend=backend)
    ref = diagonal_scan_reference(a.double(), x.double()) if T * a.shape[2] < 200_000 else \
        linrec.diagonal_scan(a.double(), x.double(), backend="torch")
    assert rel_rms(h.cpu(), ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_stride0_grads_and_no_mutation(backend):
    a_big, x_big = _inputs(2, 40, 30, torch.float32)
    a = a_big[:, ::2, ::3].to(DEVICE)  # non-contiguous views
    x = x_big.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2, ::3].to(DEVICE)
    h0 = torch.randn(10, 2).t().to(DEVICE)  # (2, 10) non-contiguous
    snapshot = [t.clone() for t in (a, x, h0)]
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    h = linrec.diagonal_scan(*leaves, backend=backend)
    h.sum().backward()  # stride-0 incoming gradient
    ref_leaves = [t.detach().double().requires_grad_() for t in (a, x, h0)]
    diagonal_scan_reference(*ref_leaves).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert rel_rms(got.grad, want.grad) < 1e-5
    for before, after in zip(snapshot, (a, x, h0)):
        assert torch.equal(before, after)


def test_auto_backend_picks_by_device():
    a, x = _inputs(1, 10, 4, torch.float32)
    h = linrec.diagonal_scan(a, x)  # CPU tensors: the compiled CPU backend where it builds, else torch
    want = "cpp" if _cpp.cpp_backend_unavailable_reason() is None else "torch"
    torch.testing.assert_close(h, linrec.diagonal_scan(a, x, backend=want), rtol=0, atol=0)
    # float64 is not the compiled backend's: auto runs the torch form.
    torch.testing.assert_close(linrec.diagonal_scan(a.double(), x.double()),
                               linrec.diagonal_scan(a.double(), x.double(), backend="torch"), rtol=0, atol=0)


def test_auto_without_a_compiler_runs_torch_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(_cpp, "cpp_backend_unavailable_reason", lambda: "no C++ compiler was found (stand-in)")
    monkeypatch.setattr(linrec._common, "_cpu_fallback_noted", False)
    a, x = _inputs(2, 30, 4, torch.float32)
    for _ in range(2):
        h = linrec.diagonal_scan(a, x)
    torch.testing.assert_close(h, linrec.diagonal_scan(a, x, backend="torch"), rtol=0, atol=0)
    err = capsys.readouterr().err
    assert err.count("no C++ compiler was found (stand-in)") == 1 and "torch backend" in err


def test_opcheck():
    a, x = _inputs(2, 20, 5, torch.float32)
    h0 = torch.randn(2, 5)
    for backend in ("triton", "torch", "reference"):
        for reverse in (False, True):
            torch.library.opcheck(torch.ops.linrec.diagonal_scan.default,
                                  (a.requires_grad_(), x.requires_grad_(), h0.requires_grad_(), None, reverse, backend))
    cu = torch.tensor([0, 7, 20])
    torch.library.opcheck(torch.ops.linrec.diagonal_scan.default, (a[:1], x[:1], h0, cu, False, "torch"))


def test_torch_compile_fullgraph_varlen():
    a, x = _inputs(1, 12, 3, torch.float32)
    cu = torch.tensor([0, 5, 12])

    def f(a_, x_):
        return linrec.diagonal_scan(a_, x_, cu_seqlens=cu, backend="torch")

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(a, x), f(a, x))


def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 12)

        def forward(self, u):
            gate, inp = self.proj(u).sigmoid().chunk(2, dim=-1)
            return linrec.diagonal_scan(gate, inp, backend="torch").sum()

    model = Model()
    u = torch.randn(2, 30, 6)
    assert_compiled_matches_eager(model, u)


# --- bad input: each raises a clear error naming the argument -------------------------------------

def _good():
    return torch.rand(2, 10, 4), torch.randn(2, 10, 4)


@pytest.mark.parametrize("case, exc, match", [
    (lambda a, x: linrec.diagonal_scan(a, x[0]), ValueError, "x must have 3 dimensions"),
    (lambda a, x: linrec.diagonal_scan(a[..., :3], x), ValueError, "a must have shape"),
    (lambda a, x: linrec.diagonal_scan(a[None], x), ValueError, "a must have at most 3"),
    (lambda a, x: linrec.diagonal_scan(a, x.long()), TypeError, "x must have dtype"),
    (lambda a, x: linrec.diagonal_scan(a.int(), x), TypeError, "a must have dtype"),
    (lambda a, x: linrec.diagonal_scan(a.to(torch.complex64), x), TypeError, "a must have dtype"),
    (lambda a, x: linrec.diagonal_scan(a.numpy(), x), TypeError, "a must be a torch.Tensor"),
    (lambda a, x: linrec.diagonal_scan(a, x, torch.zeros(3, 4)), ValueError, "initial_state must have shape"),
    (lambda a, x: linrec.diagonal_scan(a, x, torch.zeros(2, 4, dtype=torch.int64)), TypeError, "initial_state"),
    (lambda a, x: linrec.diagonal_scan(a, x, reverse=1), TypeError, "reverse must be a bool"),
    (lambda a, x: linrec.diagonal_scan(a[:1], x[:1], torch.zeros(1, 4), cu_seqlens=torch.tensor([0, 4, 10])),
     ValueError, "initial_state must have shape"),
])
def test_bad_input(case, exc, match):
    a, x = _good()
    with pytest.raises(exc, match=match):
        case(a, x)

