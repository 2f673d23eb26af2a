"""block_diagonal_scan: every backend against the float64 reference, forward and backward."""

import pytest
import torch

import linrec
from linrec import _cpp
from linrec.block_diagonal import block_diagonal_scan_reference
from linrec.block_diagonal.op import broadcast_grad_A

from conftest import (DEVICE, HAS_CUDA, TOL, assert_close_to_reference, assert_compiled_matches_eager, rel_rms,
                      run_with_grads, to64)

BACKENDS = ["triton", "torch", "cpp"]
WIDE_BACKENDS = ["triton", "torch"]  # b up to 64 and float64 too (the compiled CPU backend stops at b = 16, fp32)


def _orthogonal(shape, g):
    """Random orthogonal b x b blocks of shape (..., b, b) (spectral norm exactly 1)."""
    q, r = torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _inputs(B, T, G, b, dtype, *, kind="contractive", seed=0, A_shape=None):
    """A: (B, T, G, b, b) (or A_shape) and x: (B, T, G, b), both in ``dtype``.

    kind "contractive": random blocks scaled to spectral norm <= ~0.95, with some exact
    zero blocks (resets) and some identity blocks; "orthogonal": orthogonal blocks;
    "colnorm": non-negative columns summing to 1 (stochastic matrices).
    """
    g = torch.Generator().manual_seed(seed)
    shape = A_shape if A_shape is not None else (B, T, G, b, b)
    if kind == "orthogonal":
        A = _orthogonal(shape, g)
    elif kind == "colnorm":
        A = torch.rand(shape, generator=g, dtype=torch.float64)
        A = A / A.sum(dim=-2, keepdim=True)
    else:
        A = torch.randn(shape, generator=g, dtype=torch.float64)
        A = 0.95 * A / torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-6)[..., None, None]
        flat = A.reshape(-1, b, b)
        flat[::7] = 0.0
        flat[3::11] = torch.eye(b, dtype=torch.float64)
    x = torch.randn(B, T, G, b, generator=g, dtype=torch.float64)
    return A.to(dtype), x.to(dtype)


def _run(backend, A, x, h0, reverse, cu_seqlens=None):
    """Forward + backward of a random projection; returns (h, [grads of A, x, h0])."""
    cu = cu_seqlens.to(DEVICE) if cu_seqlens is not None else None
    (h,), grads = run_with_grads(
        lambda *t: linrec.block_diagonal_scan(*t, reverse=reverse, cu_seqlens=cu, backend=backend), (A, x, h0))
    return h, grads


def _complete(A, h, h0, cu_seqlens, reverse, grads):
    """A backend's (grad_A or None, grad_x, grad_h0), with grad_A formed as the op forms it when None."""
    grad_A, grad_x, grad_h0 = grads
    if grad_A is None:
        grad_A = broadcast_grad_A(A.shape, h, grad_x, h0, cu_seqlens=cu_seqlens, reverse=reverse)
    return grad_A, grad_x, grad_h0


def _check(backend, A, x, h0, reverse, tol, cu_seqlens=None):
    h, grads = _run(backend, A, x, h0, reverse, cu_seqlens)
    h_ref, grads_ref = _run("reference", to64(A), to64(x), to64(h0), reverse, cu_seqlens)
    assert h.dtype == x.dtype
    assert_close_to_reference([h], [h_ref], grads, grads_ref, (A, x, h0), ("A", "x", "initial_state"), tol)


@pytest.mark.parametrize("backend, b", [(backend, b) for backend in BACKENDS for b in (1, 2, 3, 4, 8, 16)]
                         + [(backend, 64) for backend in WIDE_BACKENDS])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_reference(backend, b, reverse):
    T = 37 if b < 64 else 9
    G = 3 if b < 16 else (2 if b == 16 else 1)
    A, x = _inputs(2, T, G, b, torch.float32, seed=b)
    h0 = torch.randn(2, G, b)
    _check(backend, A, x, h0, reverse, 1e-5)


@pytest.mark.parametrize("b", [33, 48, 63])
@pytest.mark.parametrize("A_kind", ["full", "shared"])
@pytest.mark.parametrize("reverse, varlen", [(False, False), (True, False), (False, True)])
def test_triton_block_sizes_33_to_63(b, A_kind, reverse, varlen):
    # Block sizes 33..63 compile as one 64 x 64 tile with b a runtime argument; the forward's walk
    # re-reads row b - 1 for the tile's rows past b and loads x padded to (2, 1, 64) (see
    # kernels/block_diagonal.py, X_PAD). Two blocks (G = 2): rows re-read at a block's end must not
    # reach the next block's values; packed sequences include an empty one.
    T, G = 11, 2
    B = 1 if varlen else 2
    cu = torch.tensor([0, 4, 4, T], dtype=torch.int32) if varlen else None
    N = 3 if varlen else B
    A, x = _inputs(B, T, G, b, torch.float32, seed=b, A_shape=(G, b, b) if A_kind == "shared" else None)
    h0 = torch.randn(N, G, b)
    _check("triton", A, x, h0, reverse, 1e-5, cu_seqlens=cu)


def test_triton_block_size_33_keeps_overflow_exact():
    # An infinite entry in a block's last row: the states follow IEEE arithmetic as the float64
    # reference does (+-inf where it is infinite, no NaN from the tile rows past b, which re-read
    # that last row and are never multiplied into a state).
    b, G, T = 33, 2, 3
    g = torch.Generator().manual_seed(4)
    A = torch.randn(1, T, G, b, b, generator=g)
    x = torch.randn(1, T, G, b, generator=g)
    A[0, 0, 1, b - 1, b - 1] = float("inf")
    x[0, 0, 1, b - 1] = 0.0
    h0 = torch.ones(1, G, b)
    h = linrec.block_diagonal_scan(A.to(DEVICE), x.to(DEVICE), h0.to(DEVICE), backend="triton").cpu()
    want = block_diagonal_scan_reference(A.double(), x.double(), h0.double())
    inf_want = torch.isinf(want[:, :2])
    assert inf_want.any() and not torch.isnan(want[:, :2]).any()
    assert torch.equal(torch.isinf(h[:, :2]), inf_want)
    assert torch.equal(torch.sign(h[:, :2][inf_want]), torch.sign(want[:, :2][inf_want]).float())
    assert not torch.isnan(h[:, :2]).any()
    finite = torch.isfinite(want)
    assert rel_rms(h[finite], want[finite]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 100, 301])
def test_lengths_and_chunking(backend, T):
    # T around and past the chunk size; odd lengths leave a tail after the last chunk.
    if backend == "triton" and not HAS_CUDA and T > 100:
        T = 129
    A, x = _inputs(2, T, 2, 3, torch.float32, seed=T)
    _check(backend, A, x, torch.randn(2, 2, 3), False, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [2, 16])
def test_low_precision_matches_reference(backend, dtype, b):
    A, x = _inputs(2, 29, 2, b, dtype, seed=3)
    h0 = torch.randn(2, 2, b).to(dtype)
    _check(backend, A, x, h0, b == 16, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("A_shape", [(3, 4, 4), (1, 30, 1, 4, 4), (2, 1, 3, 4, 4), (4, 4), (30, 3, 4, 4)])
def test_broadcast_A(backend, A_shape):
    A, x = _inputs(2, 30, 3, 4, torch.float32, A_shape=A_shape, seed=5)
    _check(backend, A, x, None, False, 1e-5)
    _, grads = _run(backend, A, x, None, True)
    assert grads[0].shape == A.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_varlen_equals_separate_sequences(backend, reverse):
    lengths = [5, 0, 23, 1, 12]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    A, x = _inputs(1, T, 2, 3, torch.float32, seed=7)
    h0 = torch.randn(len(lengths), 2, 3)
    _check(backend, A, x, h0, reverse, 1e-5, cu_seqlens=cu)
    h, _ = _run(backend, A, x, h0, reverse, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e > s:
            single = linrec.block_diagonal_scan(A[:, s:e].to(DEVICE), x[:, s:e].to(DEVICE), h0[n : n + 1].to(DEVICE),
                                                reverse=reverse, backend=backend)
            torch.testing.assert_close(h[:, s:e].detach(), single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_time_invariant_A(backend):
    cu = torch.tensor([0, 4, 11, 20])
    A, x = _inputs(1, 20, 2, 4, torch.float32, A_shape=(2, 4, 4), seed=8)
    _check(backend, A, x, torch.randn(3, 2, 4), True, 1e-5, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_b1_agrees_with_diagonal_scan(backend):
    A, x = _inputs(2, 40, 5, 1, torch.float32, seed=9)
    h0 = torch.randn(2, 5, 1)
    h = linrec.block_diagonal_scan(A.to(DEVICE), x.to(DEVICE), h0.to(DEVICE), backend=backend)
    h_diag = linrec.diagonal_scan(A[..., 0, 0].to(DEVICE), x[..., 0].to(DEVICE), h0[..., 0].to(DEVICE),
                                  backend=backend)
    torch.testing.assert_close(h[..., 0], h_diag, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_G1_is_a_dense_recurrence(backend):
    A, x = _inputs(2, 20, 1, 5, torch.float64, seed=10)
    h = linrec.block_diagonal_scan(A.float().to(DEVICE), x.float().to(DEVICE), backend=backend).cpu().double()
    state = torch.zeros(2, 5, dtype=torch.float64)
    for t in range(20):
        state = torch.einsum("bij,bj->bi", A[:, t, 0], state) + x[:, t, 0]
        assert rel_rms(h[:, t, 0], state) < 1e-5


@pytest.mark.parametrize("backend", WIDE_BACKENDS)
def test_gradcheck_float64(backend):
    A, x = _inputs(2, 7, 2, 3, torch.float64, seed=11)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64)
    args = [t.to(DEVICE).requires_grad_() for t in (A, x, h0)]
    fast = backend == "triton" and not HAS_CUDA  # the interpreter is slow: random Jacobian projections
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda A_, x_, h0_: linrec.block_diagonal_scan(A_, x_, h0_, reverse=reverse, backend=backend), args,
            fast_mode=fast)
    At = A[0, 0].to(DEVICE).requires_grad_()  # time-invariant (G, b, b)
    assert torch.autograd.gradcheck(lambda A_, x_: linrec.block_diagonal_scan(A_, x_, backend=backend),
                                    (At, args[1]), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["orthogonal", "colnorm"])
def test_long_sequence_fp32_accuracy(backend, kind):
    # Transitions of spectral norm <= 1 over T = 16k: errors must not grow with T.
    # (The interpreter pays ~1 ms per step, so Triton on the CPU checks a shorter sequence.)
    full = HAS_CUDA or backend == "torch"
    T = 16384 if full else 1024
    B, G, b = (1, 2, 4) if full else (1, 1, 2)
    A, x = _inputs(B, T, G, b, torch.float64, kind=kind, seed=12)
    h = linrec.block_diagonal_scan(A.float().to(DEVICE), x.float().to(DEVICE), backend=backend)
    ref = linrec.block_diagonal_scan(A, x, backend="torch")  # float64; the torch form matches the loop to 1e-15
    assert rel_rms(h.cpu(), ref) < 1e-5


def test_torch_backend_float64_matches_reference_exactly():
    A, x = _inputs(2, 300, 3, 4, torch.float64, kind="orthogonal", seed=13)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    for reverse in (False, True):
        got = linrec.block_diagonal_scan(A, x, h0, reverse=reverse, backend="torch")
        want = block_diagonal_scan_reference(A, x, h0, reverse=reverse)
        assert rel_rms(got, want) < 1e-12


@pytest.mark.parametrize("b, A_kind", [(1, "full"), (3, "full"), (3, "shared"), (16, "full"), (33, "full"),
                                        (64, "shared")])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_triton_lookback_chunks(b, A_kind, reverse, varlen):
    # The GPU launcher cuts long sequences into chunks joined by decoupled look-back in the same
    # launch when there are few (sequence, block group) programs; force that path here with tiny
    # chunks. Under the interpreter every predecessor has finished, so a chunk reads its
    # predecessor's inclusive state (fast path); force_aggregates makes each chunk walk twice and
    # compose its predecessors' b x b products and end states back to chunk 0, as on a GPU whose
    # predecessors are still running.
    from linrec.block_diagonal.chunked import block_diagonal_scan_chunked_backward
    from linrec.kernels.block_diagonal import block_diagonal_scan_backward, block_diagonal_scan_forward

    T, G = (23, 2) if b < 32 else (9, 1)
    B = 1 if varlen else 2
    cu = torch.tensor([0, 5, 5, T - 1, T], dtype=torch.int64) if varlen else None
    N = 4 if varlen else B
    A, x = _inputs(B, T, G, b, torch.float32, seed=16 + b, A_shape=(G, b, b) if A_kind == "shared" else None)
    h0, grad_h = torch.randn(N, G, b), torch.randn(B, T, G, b)
    dev = [t.to(DEVICE) for t in (A, x, h0, grad_h)]
    cu_dev = cu.to(DEVICE) if cu is not None else None
    h_ref = block_diagonal_scan_reference(A.double(), x.double(), h0.double(), cu_seqlens=cu, reverse=reverse)
    grads_ref = _complete(A.double(), h_ref, h0.double(), cu, reverse, block_diagonal_scan_chunked_backward(
        A.double(), h_ref, grad_h.double(), h0.double(), cu_seqlens=cu, reverse=reverse))
    for force_aggregates in (False, True):
        kw = dict(cu_seqlens=cu_dev, reverse=reverse, chunk_len=4, force_aggregates=force_aggregates)
        h = block_diagonal_scan_forward(dev[0], dev[1], dev[2], **kw)
        raw = block_diagonal_scan_backward(dev[0], h, dev[3], dev[2], **kw)
        if A_kind == "full":  # written by the kernel in A's dtype
            assert raw[0] is not None and raw[0].dtype == A.dtype
        grads = _complete(dev[0], h, dev[2], cu_dev, reverse, raw)
        assert rel_rms(h.cpu(), h_ref) < 1e-5, force_aggregates
        for got, want in zip(grads, grads_ref):
            assert got.shape == want.shape
            assert rel_rms(got.cpu(), want) < 1e-5, force_aggregates


@pytest.mark.parametrize("backend", BACKENDS)
def test_A_dtype_may_differ_from_x(backend):
    A, x = _inputs(2, 19, 2, 4, torch.float32, seed=17)
    h0 = torch.randn(2, 2, 4)
    h, grads = _run(backend, A, x.to(torch.bfloat16), h0, False)
    h_ref, grads_ref = _run("reference", A.double(), x.to(torch.bfloat16).double(), h0.double(), False)
    assert h.dtype == torch.bfloat16 and grads[0].dtype == torch.float32 and grads[2].dtype == torch.float32
    assert rel_rms(h, h_ref) < 1e-2
    for got, want in zip(grads, grads_ref):
        assert rel_rms(got, want) < 1e-2


@pytest.mark.parametrize("chunk_size", [3, 8, 1000])
@pytest.mark.parametrize("A_shape", [None, (2, 4, 4)])
def test_chunked_and_stepwise_paths_agree(chunk_size, A_shape):
    # The torch backend picks chunking or stepping by a cost model; both must be exact.
    from linrec.block_diagonal import block_diagonal_scan_chunked
    A, x = _inputs(3, 61, 2, 4, torch.float64, seed=15, A_shape=A_shape)
    h0 = torch.randn(3, 2, 4, dtype=torch.float64)
    from linrec.block_diagonal.chunked import block_diagonal_scan_chunked_backward
    grad_h = torch.randn(3, 61, 2, 4, dtype=torch.float64)
    for reverse in (False, True):
        got = block_diagonal_scan_chunked(A, x, h0, reverse=reverse, chunk_size=chunk_size)
        leaves = [t.clone().requires_grad_() for t in (A, x, h0)]
        want = block_diagonal_scan_reference(*leaves, reverse=reverse)
        assert rel_rms(got, want) < 1e-12
        (want * grad_h).sum().backward()
        grads = _complete(A, got, h0, None, reverse, block_diagonal_scan_chunked_backward(
            A, got, grad_h, h0, cu_seqlens=None, reverse=reverse, chunk_size=chunk_size))
        for g, leaf in zip(grads, leaves):
            assert g.shape == leaf.shape and rel_rms(g, leaf.grad) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_stride0_grads_and_no_mutation(backend):
    A_big, x_big = _inputs(2, 40, 6, 3, torch.float32, seed=14)
    A = A_big[:, ::2, ::2].transpose(-1, -2).to(DEVICE)  # non-contiguous views
    x = x_big[:, ::2, ::2].to(DEVICE)
    h0 = torch.randn(3, 3, 2).permute(2, 0, 1).to(DEVICE)  # (2, 3, 3) non-contiguous
    snapshot = [t.clone() for t in (A, x, h0)]
    leaves = [t.clone().requires_grad_() for t in (A, x, h0)]
    h = linrec.block_diagonal_scan(*leaves, backend=backend)
    h.sum().backward()  # stride-0 incoming gradient
    ref_leaves = [t.detach().double().requires_grad_() for t in (A, x, h0)]
    block_diagonal_scan_reference(*ref_leaves).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert rel_rms(got.grad, want.grad) < 1e-5
    for before, after in zip(snapshot, (A, x, h0)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("shape, A_shape", [((2, 0, 3, 4), (2, 0, 3, 4, 4)), ((2, 0, 3, 4), (3, 4, 4)),
                                            ((2, 5, 0, 4), (0, 4, 4))])
def test_empty_time_or_blocks(backend, shape, A_shape):
    A = torch.rand(A_shape, device=DEVICE, requires_grad=True)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    h0 = torch.randn(shape[0], shape[2], shape[3], device=DEVICE, requires_grad=True)
    h = linrec.block_diagonal_scan(A, x, h0, backend=backend)
    assert h.shape == x.shape
    h.sum().backward()
    assert A.grad.shape == A.shape and x.grad.shape == x.shape
    assert torch.count_nonzero(h0.grad) == 0  # with no steps, h0 reaches no output


def test_auto_backend_picks_by_device():
    A, x = _inputs(1, 10, 2, 3, torch.float32)
    h = linrec.block_diagonal_scan(A, x)  # CPU tensors: the compiled CPU backend where it builds, else torch
    want = "cpp" if _cpp.cpp_backend_unavailable_reason() is None else "torch"
    torch.testing.assert_close(h, linrec.block_diagonal_scan(A, x, backend=want), rtol=0, atol=0)


def test_opcheck():
    A, x = _inputs(2, 20, 2, 3, torch.float32)
    h0 = torch.randn(2, 2, 3)
    for backend in ("torch", "reference"):
        for reverse in (False, True):
            torch.library.opcheck(torch.ops.linrec.block_diagonal_scan.default,
                                  (A.clone().requires_grad_(), x.clone().requires_grad_(),
                                   h0.clone().requires_grad_(), None, reverse, backend))
    torch.library.opcheck(torch.ops.linrec.block_diagonal_scan.default,
                          (A[0, 0].clone().requires_grad_(), x.clone().requires_grad_(), None, None, False, "torch"))
    cu = torch.tensor([0, 7, 20])
    torch.library.opcheck(torch.ops.linrec.block_diagonal_scan.default,
                          (A[:1].clone().requires_grad_(), x[:1].clone().requires_grad_(), h0, cu, False, "torch"))


def test_opcheck_triton():
    A, x = _inputs(1, 6, 1, 2, torch.float32)
    h0 = torch.randn(1, 1, 2)
    args = [t.to(DEVICE).requires_grad_() for t in (A, x, h0)]
    torch.library.opcheck(torch.ops.linrec.block_diagonal_scan.default, (*args, None, True, "triton"))
    At = args[0][0, 0].detach().requires_grad_()  # time-invariant (G, b, b): gradient summed outside the kernel
    torch.library.opcheck(torch.ops.linrec.block_diagonal_scan.default, (At, args[1], None, None, False, "triton"))


def test_torch_compile_fullgraph():
    G, b = 2, 3

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_A = torch.nn.Linear(6, G * b * b)
            self.to_x = torch.nn.Linear(6, G * b)

        def forward(self, u):
            B, T, _ = u.shape
            A = torch.tanh(self.to_A(u)).view(B, T, G, b, b) / b
            return linrec.block_diagonal_scan(A, self.to_x(u).view(B, T, G, b), backend="torch").sum()

    model = Model()
    u = torch.randn(2, 30, 6)
    assert_compiled_matches_eager(model, u)


# --- bad input: each raises a clear error naming the argument -------------------------------------

def _good():
    return torch.rand(2, 10, 3, 4, 4), torch.randn(2, 10, 3, 4)


@pytest.mark.parametrize("case, exc, match", [
    (lambda A, x: linrec.block_diagonal_scan(A, x[0]), ValueError, "x must have 4 dimensions"),
    (lambda A, x: linrec.block_diagonal_scan(A, x.long()), TypeError, "x must have dtype"),
    (lambda A, x: linrec.block_diagonal_scan(A, x.to(torch.complex64)), TypeError, "x must have dtype"),
    (lambda A, x: linrec.block_diagonal_scan(A.numpy(), x), TypeError, "A must be a torch.Tensor"),
    (lambda A, x: linrec.block_diagonal_scan(A.int(), x), TypeError, "A must have dtype"),
    (lambda A, x: linrec.block_diagonal_scan(A[..., :3], x), ValueError, "blocks must be square"),
    (lambda A, x: linrec.block_diagonal_scan(A[..., :3, :3], x), ValueError, "block size must match"),
    (lambda A, x: linrec.block_diagonal_scan(A[:, :, :2], x), ValueError, r"A must have shape \(B, T, G, b, b\)"),
    (lambda A, x: linrec.block_diagonal_scan(A[:, :5], x), ValueError, r"A must have shape \(B, T, G, b, b\)"),
    (lambda A, x: linrec.block_diagonal_scan(A[None], x), ValueError, "A must have 2 to 5 dimensions"),
    (lambda A, x: linrec.block_diagonal_scan(A[0, 0, 0, 0], x), ValueError, "A must have 2 to 5 dimensions"),
    (lambda A, x: linrec.block_diagonal_scan(torch.rand(65, 65), torch.randn(1, 2, 1, 65)), ValueError,
     "block size b"),
    (lambda A, x: linrec.block_diagonal_scan(A, x, torch.zeros(3, 3, 4)), ValueError, "initial_state must have shape"),
    (lambda A, x: linrec.block_diagonal_scan(A, x, torch.zeros(2, 12)), ValueError, "initial_state must have 3"),
    (lambda A, x: linrec.block_diagonal_scan(A, x, torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError,
     "initial_state"),
    (lambda A, x: linrec.block_diagonal_scan(A, x, reverse=1), TypeError, "reverse must be a bool"),
    (lambda A, x: linrec.block_diagonal_scan(A[:1], x[:1], torch.zeros(1, 3, 4),
                                             cu_seqlens=torch.tensor([0, 4, 10])),
     ValueError, "initial_state must have shape"),
])
def test_bad_input(case, exc, match):
    A, x = _good()
    with pytest.raises(exc, match=match):
        case(A, x)



@pytest.mark.parametrize("b", [2, 16])
@pytest.mark.parametrize("scale, reset_at", [(1000.0, None), (1e6, 5), (10.0, 50)])
def test_triton_lookback_growth_then_reset(b, scale, reset_at):
    # Chunk products of growing blocks overflow fp32 (1000^32 per 32-step chunk); saturated, they
    # meet the zero states as the sequential loop does (exact zeros, no inf * 0 = NaN), with the
    # look-back composing every aggregate (force_aggregates) and with the fast path.
    from linrec.kernels.block_diagonal import block_diagonal_scan_forward

    T, G = 96, 2
    A = (torch.eye(b) * scale).expand(1, T, G, b, b).contiguous()
    x = torch.zeros(1, T, G, b)
    if reset_at is not None:
        A[:, reset_at] = 0.0
        A[:, reset_at + 1:] = torch.eye(b) * 0.5
        x[:, -30:] = torch.randn(1, 30, G, b, generator=torch.Generator().manual_seed(0))
    ref = block_diagonal_scan_reference(A.double(), x.double())
    for force_aggregates in (False, True):
        h = block_diagonal_scan_forward(A.to(DEVICE), x.to(DEVICE), None, cu_seqlens=None, reverse=False,
                                        chunk_len=32, force_aggregates=force_aggregates).cpu()
        assert torch.isfinite(h).all()
        if reset_at is None:
            assert torch.equal(h, torch.zeros_like(h))
        else:
            assert rel_rms(h, ref) < 1e-5
