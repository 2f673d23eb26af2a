"""The compiled CPU backend (``linrec._cpp``, csrc/cpu/): its launchers called directly, against
the float64 sequential references (outputs and gradients through autograd of the loop).

The extension is built once per session (JIT, cached by PyTorch); the module is skipped only when
no C++ compiler exists. Tolerances are relative RMS errors: 1e-5 for fp32 / complex64, 1e-2 for
bf16 / fp16 (inputs are rounded first, so the reference sees the same values).
"""

import pytest
import torch

from linrec import _cpp
from linrec.block_diagonal import block_diagonal_scan_reference
from linrec.diagonal import diagonal_scan_reference
from linrec.householder import householder_scan_reference

from conftest import rel_rms

if _cpp._compiler() is None:  # the only reason to skip: a CPU without a C++ toolchain
    pytest.skip(f"no C++ compiler: {_cpp.cpp_backend_unavailable_reason()}", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def extension():
    return _cpp.load_extension()  # fails (not skips) when a compiler exists but the build breaks


def _wide(t):
    return None if t is None else t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def _coefficients(shape, dtype, g):
    """Diagonal coefficients of |a| in [0.5, 0.99], both signs (real) or any phase (complex)."""
    mag = 0.5 + 0.49 * torch.rand(shape, generator=g)
    if dtype.is_complex:
        return torch.polar(mag, torch.rand(shape, generator=g) * 6.283).to(dtype)
    sign = torch.where(torch.rand(shape, generator=g) < 0.2, -1.0, 1.0)
    return (mag * sign).to(dtype)


def _randn(shape, dtype, g):
    if dtype.is_complex:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def _check_diagonal(a, x, h0=None, cu=None, reverse=False, tol=None, grad_h=None):
    """Forward and backward of the cpp launchers against autograd through the float64 loop."""
    tol = tol or TOL[x.dtype]
    g = torch.Generator().manual_seed(7)
    h = _cpp.diagonal_scan_forward(a, x, h0, cu_seqlens=cu, reverse=reverse)
    assert h.dtype == x.dtype and h.shape == x.shape
    leaves = [t.requires_grad_() for t in (_wide(a), _wide(x), _wide(h0)) if t is not None]
    ref = diagonal_scan_reference(leaves[0], leaves[1], leaves[2] if h0 is not None else None,
                                  cu_seqlens=cu, reverse=reverse)
    assert rel_rms(h, ref) < tol
    if grad_h is None:
        grad_h = _randn(x.shape, x.dtype, g)
    ref.backward(_wide(grad_h))
    grad_a, grad_x, grad_h0 = _cpp.diagonal_scan_backward(a, h, grad_h, h0, cu_seqlens=cu, reverse=reverse)
    assert grad_a.shape == a.shape and grad_x.shape == x.shape
    assert grad_x.dtype == x.dtype
    assert rel_rms(grad_x, leaves[1].grad) < tol
    assert rel_rms(grad_a, leaves[0].grad) < tol
    N = x.shape[0] if cu is None else cu.numel() - 1
    assert grad_h0.shape == (N, x.shape[2])
    if h0 is not None:
        assert rel_rms(grad_h0, leaves[2].grad) < tol
    else:
        assert torch.count_nonzero(grad_h0) == 0
    return h


# ---------------------------------------------------------------------------------------------
# The loader (linrec._jit, shared with linrec._cuda)
# ---------------------------------------------------------------------------------------------

def test_loaded_extension_skips_the_probes(monkeypatch, extension):
    """Once loaded, the availability question asks neither the compiler nor ninja (a subprocess):
    backend='auto' on the CPU asks it on every op call. The disable flag still wins."""
    import torch.utils.cpp_extension as cpp_extension

    def probe_called(*args, **kwargs):
        raise AssertionError("a probe ran after the extension was loaded")

    monkeypatch.setattr(_cpp, "_compiler", probe_called)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", probe_called)
    assert _cpp.cpp_backend_unavailable_reason() is None
    assert _cpp.load_extension() is extension
    monkeypatch.setenv("LINREC_DISABLE_CPP", "1")
    assert _cpp.cpp_backend_unavailable_reason() == "LINREC_DISABLE_CPP is set"


def test_loader_announces_an_uncached_build_once(monkeypatch, capsys):
    """A build that finds nothing cached prints one line naming the target; a failed build is
    remembered and named (first line) by the availability question, without building again."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("c++: error: stand-in failure\nmore compiler output")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(_cpp._JIT, "module", None)
    monkeypatch.setattr(_cpp._JIT, "build_error", None)
    monkeypatch.setattr(_cpp, "cpu_capability", lambda: "stand_in_never_built")
    with pytest.raises(RuntimeError, match=r"building linrec's CPU extension failed: c\+\+: error: stand-in"):
        _cpp.load_extension()
    assert len(calls) == 1 and calls[0]["name"] == "linrec_cpu_stand_in_never_built"
    assert calls[0]["verbose"] is False
    err = capsys.readouterr().err
    assert err.count("linrec: compiling the CPU kernels (stand_in_never_built; once") == 1, err
    assert _cpp.cpp_backend_unavailable_reason() == ("building the CPU extension failed earlier in this process: "
                                                     "c++: error: stand-in failure")
    with pytest.raises(RuntimeError, match="failed earlier in this process"):
        _cpp.load_extension()
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Diagonal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_diagonal_matches_reference(dtype, reverse, with_h0):
    g = torch.Generator().manual_seed(0)
    B, T, D = 3, 37, 45  # D is not a multiple of the tile width: a partial tile every step
    a = _coefficients((B, T, D), dtype, g)
    x = _randn((B, T, D), dtype, g)
    h0 = _randn((B, D), torch.complex64 if dtype.is_complex else torch.float32, g) if with_h0 else None
    _check_diagonal(a, x, h0, reverse=reverse)


@pytest.mark.parametrize("a_shape", [(45,), (1, 37, 45), (3, 1, 45), (37, 1), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_broadcast_coefficients(a_shape, dtype, reverse):
    g = torch.Generator().manual_seed(1)
    a = _coefficients(a_shape, dtype, g)
    x = _randn((3, 37, 45), dtype, g)
    h0 = _randn((3, 45), torch.complex64 if dtype.is_complex else torch.float32, g)
    _check_diagonal(a, x, h0, reverse=reverse)


@pytest.mark.parametrize("a_time_invariant", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_diagonal_packed_sequences_with_empty_ones(a_time_invariant, reverse, dtype):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 5, 5, 17, 18, 30, 30], dtype=torch.int32)
    T, D = 30, 20
    a = _coefficients((D,) if a_time_invariant else (1, T, D), dtype, g)
    x = _randn((1, T, D), dtype, g)
    h0 = _randn((6, D), torch.complex64 if dtype.is_complex else torch.float32, g)
    _check_diagonal(a, x, h0, cu=cu, reverse=reverse)
    _check_diagonal(a, x, None, cu=cu, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_diagonal_single_step_and_empty(dtype):
    g = torch.Generator().manual_seed(3)
    a, x = _coefficients((2, 1, 9), dtype, g), _randn((2, 1, 9), dtype, g)
    h0 = _randn((2, 9), torch.complex64 if dtype.is_complex else torch.float32, g)
    for reverse in (False, True):
        _check_diagonal(a, x, h0, reverse=reverse)
    empty = _cpp.diagonal_scan_forward(a[:, :0], x[:, :0], None, cu_seqlens=None, reverse=False)
    assert empty.shape == (2, 0, 9)
    grad_a, grad_x, grad_h0 = _cpp.diagonal_scan_backward(a[0, 0], empty, empty, h0, cu_seqlens=None, reverse=False)
    assert grad_a.shape == (9,) and torch.count_nonzero(grad_a) == 0 and grad_x.shape == (2, 0, 9)
    assert torch.count_nonzero(grad_h0) == 0


def test_diagonal_many_blocks_and_threads():
    """Several channel blocks per row (D > one block) and more tasks than threads."""
    g = torch.Generator().manual_seed(4)
    a, x = _coefficients((2, 50, 1100), torch.float32, g), _randn((2, 50, 1100), torch.float32, g)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _check_diagonal(a, x, reverse=False)
            _check_diagonal(a[0, 0], x, reverse=True)  # (D,): partial sums per partition
    finally:
        torch.set_num_threads(threads)


def test_diagonal_mixed_dtypes_strides_and_stride0_grad():
    g = torch.Generator().manual_seed(5)
    B, T, D = 2, 21, 33
    x = _randn((B, D, T), torch.bfloat16, g).transpose(1, 2)  # non-contiguous x
    a = _coefficients((B, T, D), torch.float32, g)             # fp32 a with bf16 x
    _check_diagonal(a, x, grad_h=torch.ones(()).to(torch.bfloat16).expand(B, T, D))
    grad_a, _, _ = _cpp.diagonal_scan_backward(a, x, x, None, cu_seqlens=None, reverse=False)
    assert grad_a.dtype == torch.float32


@pytest.mark.parametrize("which", ["a", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_nonfinite_is_causal(which, bad, reverse):
    g = torch.Generator().manual_seed(6)
    T, t0 = 150, 97
    a, x = torch.rand(1, T, 3, generator=g) * 0.9, torch.randn(1, T, 3, generator=g)
    clean = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=None, reverse=reverse)
    (a if which == "a" else x)[0, t0, 1] = bad
    x[0, t0, 1] = 1.0 if which == "a" else x[0, t0, 1]
    out = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=None, reverse=reverse)
    before = slice(t0 + 1, None) if reverse else slice(0, t0)
    assert torch.equal(out[:, before], clean[:, before])
    assert not torch.isfinite(out[0, t0, 1])
    assert torch.equal(out[..., [0, 2]], clean[..., [0, 2]])


def test_diagonal_nonfinite_stays_in_its_packed_sequence():
    g = torch.Generator().manual_seed(7)
    cu = torch.tensor([0, 70, 71, 71, 150])
    a, x = torch.rand(1, 150, 3, generator=g), torch.randn(1, 150, 3, generator=g)
    clean = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=cu, reverse=False)
    x[0, 40] = float("nan")
    out = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=cu, reverse=False)
    assert torch.equal(out[:, :40], clean[:, :40]) and torch.isnan(out[:, 40:70]).all()
    assert torch.equal(out[:, 70:], clean[:, 70:])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diagonal_growth_then_reset_gives_exact_zeros(reverse, dtype):
    """a = 1000 for 60 steps on a zero state, then a reset: zeros stay exact, nothing is NaN."""
    T, D = 100, 5
    a = torch.full((1, T, D), 1000.0)
    a[:, 60] = 0.0
    a[:, 61:] = 0.5
    x = torch.zeros(1, T, D)
    x[:, 70:] = torch.randn(1, 30, D, generator=torch.Generator().manual_seed(8))
    if reverse:
        a, x = a.flip(1), x.flip(1)
    a, x = a.to(dtype), x.to(dtype)
    h = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=None, reverse=reverse)
    assert torch.isfinite(h).all()
    zero_part = slice(30, None) if reverse else slice(0, 70)
    assert torch.count_nonzero(h[:, zero_part]) == 0
    ref = diagonal_scan_reference(_wide(a), _wide(x), reverse=reverse)
    assert rel_rms(h, ref) < TOL[dtype]


def test_diagonal_rejects_bad_input():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        _cpp.diagonal_scan_forward(torch.rand(3, dtype=torch.float64), x, None, cu_seqlens=None, reverse=False)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        _cpp.diagonal_scan_forward(torch.rand(3), x.float(), None, cu_seqlens=torch.tensor([0, 3, 2, 4]), reverse=False)


# ---------------------------------------------------------------------------------------------
# Block-diagonal
# ---------------------------------------------------------------------------------------------
def _transitions(shape, dtype, g):
    b = shape[-1]
    return (torch.randn(shape, generator=g) * (0.9 / b ** 0.5)).to(dtype)


def _check_block(A, x, h0=None, cu=None, reverse=False, tol=None):
    tol = tol or TOL[x.dtype]
    g = torch.Generator().manual_seed(9)
    h = _cpp.block_diagonal_scan_forward(A, x, h0, cu_seqlens=cu, reverse=reverse)
    assert h.dtype == x.dtype and h.shape == x.shape
    A64, x64 = _wide(A).requires_grad_(), _wide(x).requires_grad_()
    h064 = None if h0 is None else _wide(h0).requires_grad_()
    ref = block_diagonal_scan_reference(A64, x64, h064, cu_seqlens=cu, reverse=reverse)
    assert rel_rms(h, ref) < tol
    grad_h = _randn(x.shape, x.dtype, g)
    ref.backward(_wide(grad_h))
    grad_A, grad_x, grad_h0 = _cpp.block_diagonal_scan_backward(A, h, grad_h, h0, cu_seqlens=cu, reverse=reverse)
    assert grad_A.shape == A.shape and grad_x.shape == x.shape and grad_x.dtype == x.dtype
    assert rel_rms(grad_x, x64.grad) < tol
    assert rel_rms(grad_A, A64.grad) < tol
    if h0 is not None:
        assert rel_rms(grad_h0, h064.grad) < tol
    return h


@pytest.mark.parametrize("b", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_diagonal_matches_reference(b, reverse):
    g = torch.Generator().manual_seed(10)
    B, T, G = 2, 23, 5
    A = _transitions((B, T, G, b, b), torch.float32, g)
    x = torch.randn(B, T, G, b, generator=g)
    _check_block(A, x, torch.randn(B, G, b, generator=g), reverse=reverse)
    _check_block(A, x, None, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a_fp32", [False, True])
def test_block_diagonal_reduced_precision(dtype, a_fp32):
    g = torch.Generator().manual_seed(11)
    A = _transitions((2, 30, 3, 4, 4), torch.float32 if a_fp32 else dtype, g)
    x = torch.randn(2, 30, 3, 4, generator=g).to(dtype)
    _check_block(A, x, torch.randn(2, 3, 4, generator=g), reverse=False)


@pytest.mark.parametrize("A_shape", [(3, 4, 4), (1, 30, 3, 4, 4), (2, 1, 1, 4, 4), (30, 1, 4, 4)])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_diagonal_broadcast_transitions(A_shape, reverse):
    g = torch.Generator().manual_seed(12)
    A = _transitions(A_shape, torch.float32, g)
    x = torch.randn(2, 30, 3, 4, generator=g)
    _check_block(A, x, torch.randn(2, 3, 4, generator=g), reverse=reverse)


@pytest.mark.parametrize("time_invariant", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_diagonal_packed_sequences_with_empty_ones(time_invariant, reverse):
    g = torch.Generator().manual_seed(13)
    cu = torch.tensor([0, 5, 5, 17, 18, 30, 30])
    A = _transitions((3, 3, 3) if time_invariant else (1, 30, 3, 3, 3), torch.float32, g)
    x = torch.randn(1, 30, 3, 3, generator=g)
    _check_block(A, x, torch.randn(6, 3, 3, generator=g), cu=cu, reverse=reverse)
    if time_invariant:  # T = 1, one sequence
        _check_block(A, x[:, :1], None, cu=torch.tensor([0, 1]), reverse=reverse)


@pytest.mark.parametrize("A_shape", [(2, 30, 9, 4, 4), (9, 4, 4), (4, 4), (1, 30, 9, 4, 4), (2, 1, 1, 4, 4)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_block_diagonal_four_groups_at_a_time(A_shape, reverse, with_h0):
    """b = 4 fp32 with G = 9: two register quads of groups and one group left over, for a full A
    (streaming stores of dL/dA) and A broadcast over batch, time and groups (dL/dA summed, the four
    groups of a quad adding into one block when A is shared by all groups); packed sequences too."""
    g = torch.Generator().manual_seed(16)
    A = _transitions(A_shape, torch.float32, g)
    x = torch.randn(2, 30, 9, 4, generator=g)
    _check_block(A, x, torch.randn(2, 9, 4, generator=g) if with_h0 else None, reverse=reverse)
    if A_shape[0] != 2:
        cu = torch.tensor([0, 7, 7, 20, 30])
        _check_block(A, x[:1], torch.randn(4, 9, 4, generator=g) if with_h0 else None, cu=cu, reverse=reverse)


@pytest.mark.parametrize("scale, reset_at", [(1000.0, None), (1000.0, 60), (1e6, 5)])
def test_block_diagonal_growth_then_reset(scale, reset_at):
    T, G, b = 120, 2, 2
    A = (torch.eye(b) * scale).expand(1, T, G, b, b).contiguous()
    x = torch.zeros(1, T, G, b)
    if reset_at is not None:
        A[:, reset_at] = 0.0
        A[:, reset_at + 1:] = torch.eye(b) * 0.5
        x[:, -30:] = torch.randn(1, 30, G, b, generator=torch.Generator().manual_seed(14))
    h = _cpp.block_diagonal_scan_forward(A, x, None, cu_seqlens=None, reverse=False)
    assert torch.isfinite(h).all()
    assert torch.count_nonzero(h[:, : T - 30]) == 0
    ref = block_diagonal_scan_reference(_wide(A), _wide(x))
    assert rel_rms(h, ref) < 1e-5


def test_block_diagonal_nonfinite_is_causal():
    g = torch.Generator().manual_seed(15)
    T, t0 = 150, 90
    A, x = torch.randn(1, T, 2, 3, 3, generator=g) * 0.4, torch.randn(1, T, 2, 3, generator=g)
    clean = _cpp.block_diagonal_scan_forward(A, x, None, cu_seqlens=None, reverse=False)
    A[0, t0, 1, 0, 0] = float("inf")
    out = _cpp.block_diagonal_scan_forward(A, x, None, cu_seqlens=None, reverse=False)
    assert torch.equal(out[:, :t0], clean[:, :t0]) and not torch.isfinite(out[0, t0, 1]).all()
    assert torch.equal(out[:, :, 0], clean[:, :, 0])


def test_block_diagonal_rejects_large_blocks():
    with pytest.raises(ValueError, match="b <= 16"):
        _cpp.block_diagonal_scan_forward(torch.eye(17), torch.randn(1, 2, 1, 17), None, cu_seqlens=None, reverse=False)


# ---------------------------------------------------------------------------------------------
# Householder (step by step: the decoding path)
# ---------------------------------------------------------------------------------------------
def _householder_inputs(B, T, n, H, K, V, dtype, g, *, gate=True, h0_rows=None, unit_keys=True):
    """q, k, v in dtype (keys unit-norm unless unit_keys is False), beta in [0, 2] (negative
    eigenvalues included), log-gates in [-1, 0] (float32), an fp32 initial state of h0_rows rows."""
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, n, H, K, generator=g)
    if unit_keys:
        k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, n, H, V, generator=g)
    beta = 2.0 * torch.rand(B, T, n, H, generator=g)
    log_gate = -torch.rand(B, T, H, generator=g) if gate else None
    h0 = None if h0_rows is None else torch.randn(h0_rows, H, K, V, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), beta, log_gate, h0


def _check_householder(q, k, v, beta, log_gate, h0, cu=None, scale=0.3, with_grad_final=True, tol=None):
    """Outputs, final state and all six gradients of the cpp launchers against autograd through
    the float64 sequential reference."""
    tol = tol or TOL[q.dtype]
    g = torch.Generator().manual_seed(21)
    o, final = _cpp.householder_scan_forward(q, k, v, beta, log_gate, h0, cu_seqlens=cu, scale=scale)
    assert o.dtype == q.dtype and o.shape == q.shape[:3] + (v.shape[-1],)
    assert final.dtype == torch.float32
    inputs = [_wide(t) for t in (q, k, v, beta, log_gate, h0)]
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    wq, wk, wv, wbeta, wgate, wh0 = inputs  # the reference takes the n axis spelled out
    if k.dim() == 4:
        wk, wv, wbeta = wk.unsqueeze(2), wv.unsqueeze(2), wbeta.unsqueeze(2)
    ref_o, ref_final = householder_scan_reference(wq, wk, wv, wbeta, wgate, wh0, cu_seqlens=cu, scale=scale)
    assert rel_rms(o, ref_o) < tol
    assert rel_rms(final, ref_final) < tol
    grad_o = torch.randn(o.shape, generator=g).to(q.dtype)
    grad_final = torch.randn(final.shape, generator=g) if with_grad_final else None
    loss = (ref_o * _wide(grad_o)).sum() + ((ref_final * _wide(grad_final)).sum() if with_grad_final else 0)
    loss.backward()
    grads = _cpp.householder_scan_backward(q, k, v, beta, log_gate, h0, grad_o, grad_final, cu_seqlens=cu,
                                           scale=scale)
    assert len(grads) == 6
    for name, grad, t, ref in zip(("q", "k", "v", "beta", "log_gate", "initial_state"), grads,
                                  (q, k, v, beta, log_gate, h0), inputs):
        if t is None:
            assert grad is None, name
            continue
        assert grad.shape == t.shape and grad.dtype == t.dtype, name
        assert rel_rms(grad, ref.grad) < tol, (name, rel_rms(grad, ref.grad))
    return o, final


@pytest.mark.parametrize("T", [1, 2, 5, 8])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("gate, with_h0", [(True, True), (False, False), (True, False)])
def test_householder_matches_reference(T, n, gate, with_h0):
    g = torch.Generator().manual_seed(20 + T + 10 * n)
    B, H, K, V = 2, 3, 20, 19  # K, V not multiples of the vector width: partial vectors every row
    q, k, v, beta, log_gate, h0 = _householder_inputs(B, T, n, H, K, V, torch.float32, g, gate=gate,
                                                      h0_rows=B if with_h0 else None)
    _check_householder(q, k, v, beta, log_gate, h0, with_grad_final=with_h0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_householder_reduced_precision(dtype):
    g = torch.Generator().manual_seed(22)
    q, k, v, beta, log_gate, h0 = _householder_inputs(2, 6, 2, 2, 32, 48, dtype, g, h0_rows=2)
    _check_householder(q, k, v, beta.to(dtype), log_gate.to(dtype), h0, scale=32 ** -0.5)


def test_householder_n1_four_dimensional_inputs_and_unnormalised_keys():
    """k / v as (B, T, H, K) / (B, T, H, V) and beta (B, T, H) (n = 1): gradients in those shapes."""
    g = torch.Generator().manual_seed(23)
    q, k, v, beta, log_gate, h0 = _householder_inputs(3, 4, 1, 2, 16, 16, torch.float32, g, h0_rows=3,
                                                      unit_keys=False)
    k, v, beta = 0.5 * k[:, :, 0], v[:, :, 0], 0.5 * beta[:, :, 0]
    _check_householder(q, k, v, beta, log_gate, h0)


@pytest.mark.parametrize("with_h0", [False, True])
def test_householder_packed_sequences_with_empty_ones(with_h0):
    g = torch.Generator().manual_seed(24)
    cu = torch.tensor([0, 3, 3, 4, 8, 8], dtype=torch.int32)
    q, k, v, beta, log_gate, h0 = _householder_inputs(1, 8, 2, 2, 24, 8, torch.float32, g,
                                                      h0_rows=5 if with_h0 else None)
    o, final = _check_householder(q, k, v, beta, log_gate, h0, cu=cu)
    if not with_h0:  # empty sequences: the initial state (zeros) is the final state
        assert torch.count_nonzero(final[1]) == 0 and torch.count_nonzero(final[4]) == 0


def test_householder_long_sequences_replay_segments():
    """T = 70 > one backward segment: the states are replayed from checkpoints (threads 1 and 2)."""
    g = torch.Generator().manual_seed(25)
    q, k, v, beta, log_gate, h0 = _householder_inputs(2, 70, 2, 2, 8, 12, torch.float32, g, h0_rows=2)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            _check_householder(q, k, v, beta, log_gate, h0)
    finally:
        torch.set_num_threads(threads)


def test_householder_hard_reset_gate():
    """log_gate = -inf (a saturated gate) resets the state: finite outputs, zero gate gradient there,
    nothing before the reset reaching the outputs after it."""
    g = torch.Generator().manual_seed(26)
    q, k, v, beta, log_gate, h0 = _householder_inputs(1, 6, 1, 2, 8, 8, torch.float32, g, h0_rows=1)
    log_gate[:, 3] = float("-inf")
    o, final = _cpp.householder_scan_forward(q, k, v, beta, log_gate, h0, cu_seqlens=None, scale=1.0)
    h0_other = h0 + 1.0
    o2, final2 = _cpp.householder_scan_forward(q, k, v, beta, log_gate, h0_other, cu_seqlens=None, scale=1.0)
    assert torch.isfinite(o).all() and torch.equal(o[:, 3:], o2[:, 3:]) and torch.equal(final, final2)
    grads = _cpp.householder_scan_backward(q, k, v, beta, log_gate, h0, torch.ones_like(o), None, cu_seqlens=None,
                                           scale=1.0)
    assert all(torch.isfinite(t).all() for t in grads)
    assert torch.count_nonzero(grads[4][:, 3]) == 0
    assert torch.count_nonzero(grads[5]) > 0  # the steps before the reset still see h0


def test_householder_supports():
    q = torch.randn(1, 8, 2, 16)
    assert _cpp.householder_supports(q, None, torch.randn(1, 8, 2))
    assert _cpp.householder_supports(torch.randn(1, 4096, 2, 64))      # small heads at any length
    assert not _cpp.householder_supports(torch.randn(1, 9, 2, 65))     # large heads beyond decoding
    assert _cpp.householder_supports(torch.randn(1, 8, 2, 256))
    assert not _cpp.householder_supports(q.double())


def test_householder_through_the_op():
    """linrec.householder_scan(backend="cpp"): the op's autograd wiring hands every gradient back in
    its input's shape and dtype, and they match the float64 reference."""
    import linrec
    g = torch.Generator().manual_seed(27)
    cu = torch.tensor([0, 2, 7])
    q, k, v, beta, log_gate, h0 = _householder_inputs(1, 7, 2, 2, 16, 8, torch.float32, g, h0_rows=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, log_gate, h0)]
    o, final = linrec.householder_scan(*leaves, scale=0.25, output_final_state=True, cu_seqlens=cu, backend="cpp")
    grad_o, grad_final = torch.randn(o.shape, generator=g), torch.randn(final.shape, generator=g)
    torch.autograd.backward((o, final), (grad_o, grad_final))
    refs = [_wide(t).requires_grad_() for t in (q, k, v, beta, log_gate, h0)]
    ref_o, ref_final = householder_scan_reference(*refs, cu_seqlens=cu, scale=0.25)
    torch.autograd.backward((ref_o, ref_final), (_wide(grad_o), _wide(grad_final)))
    assert rel_rms(o, ref_o) < 1e-5 and rel_rms(final, ref_final) < 1e-5
    for leaf, ref in zip(leaves, refs):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
        assert rel_rms(leaf.grad, ref.grad) < 1e-5


def test_householder_auto_takes_cpp_for_decoding_and_small_heads(monkeypatch):
    """backend="auto" on the CPU runs the cpp kernels forward and backward for T <= 8 or K <= 64,
    the torch form otherwise; cpp rejects float64 by name."""
    import linrec
    from linrec.householder import op as householder_op
    calls = []
    for table in ("FORWARD", "BACKWARD"):
        launcher = getattr(householder_op, table)["cpp"]
        monkeypatch.setitem(getattr(householder_op, table), "cpp",
                            lambda *a, _f=launcher, _t=table, **kw: calls.append(_t) or _f(*a, **kw))
    g = torch.Generator().manual_seed(29)
    for T, K, expected in ((8, 128, ["FORWARD", "BACKWARD"]), (20, 32, ["FORWARD", "BACKWARD"]), (20, 128, [])):
        calls.clear()
        q, k, v, beta, log_gate, _ = _householder_inputs(1, T, 1, 2, K, 4, torch.float32, g, h0_rows=1)
        q.requires_grad_()
        linrec.householder_scan(q, k, v, beta, log_gate)[0].sum().backward()
        assert calls == expected, (T, K, calls)
    with pytest.raises(ValueError, match="backend='cpp' supports float32"):
        linrec.householder_scan(q.detach().double(), k.double(), v.double(), beta, log_gate, backend="cpp")


def test_householder_tiny_heads_and_empty_sequences():
    """K = V = 1 (vector tails only) against the reference; T = 0: the initial state is the final
    state and dL/dh0 = dL/dfinal."""
    g = torch.Generator().manual_seed(28)
    _check_householder(*_householder_inputs(2, 3, 2, 1, 1, 1, torch.float32, g, h0_rows=2, unit_keys=False))
    q, k, v, beta, log_gate, h0 = _householder_inputs(2, 0, 1, 3, 5, 2, torch.float32, g, h0_rows=2)
    o, final = _cpp.householder_scan_forward(q, k, v, beta, log_gate, h0, cu_seqlens=None, scale=1.0)
    assert o.shape == (2, 0, 3, 2) and torch.equal(final, h0)
    grad_final = torch.randn(final.shape, generator=g)
    grads = _cpp.householder_scan_backward(q, k, v, beta, log_gate, h0, torch.zeros(o.shape), grad_final,
                                           cu_seqlens=None, scale=1.0)
    assert torch.equal(grads[5], grad_final) and grads[0].shape == q.shape and grads[4].shape == log_gate.shape


# ---------------------------------------------------------------------------------------------
# The output cache (csrc/cpu/common.h, OutputCache): outputs of 8 MiB or more
# ---------------------------------------------------------------------------------------------

LARGE_OUTPUT = 8 << 20  # bytes: the smallest output the cache serves


@pytest.fixture
def output_cache():
    """An empty output cache with a 256 MiB limit for the test; the limit is restored after."""
    old = _cpp.set_output_cache_limit(256)
    _cpp.empty_output_cache()
    yield
    _cpp.set_output_cache_limit(old)


def _poison_cache(shape, count):
    """Leaves `count` freed outputs of `shape` (fp32) in the cache, every element NaN."""
    junk = [_cpp.diagonal_scan_forward(torch.zeros(shape[-1]), torch.zeros(shape), None, cu_seqlens=None,
                                       reverse=False) for _ in range(count)]
    ptrs = []
    for out in junk:
        assert out.data_ptr() % (2 << 20) == 0  # 2 MiB-aligned blocks: huge pages from the first touch
        out.fill_(float("nan"))
        ptrs.append(out.data_ptr())
    del out
    while junk:  # freed in order: ptrs[0] is the oldest block in the cache, ptrs[-1] the newest
        junk.pop(0)
    return ptrs


def test_output_cache_recycles_blocks_and_kernels_write_every_element(output_cache):
    """Freed large outputs are handed out again (most recent first), and every kernel writes all
    of a recycled block: blocks left full of NaN by earlier outputs give the reference's results,
    forward and backward, with packed sequences (empty ones included) and reversed."""
    shape = (1, 64, 32768)  # 8 MiB in fp32
    ptrs = _poison_cache(shape, 3)
    info = _cpp.output_cache_info()
    assert info["cached_blocks"] == 3 and info["cached_bytes"] == 3 * LARGE_OUTPUT, info
    g = torch.Generator().manual_seed(21)
    a, x = _coefficients(shape, torch.float32, g), torch.randn(shape, generator=g)
    hits = info["hits"]
    h = _check_diagonal(a, x, cu=torch.tensor([0, 0, 20, 20, 64]), reverse=True)  # h, dL/dx, dL/da: 3 blocks
    assert _cpp.output_cache_info()["hits"] == hits + 3
    assert h.data_ptr() == ptrs[-1]
    del h
    # block-diagonal, b = 4: x and h 8 MiB, dL/dA 32 MiB (a block of another size: newly mapped)
    _poison_cache(shape, 3)
    A = _transitions((1, 64, 2048, 4, 4), torch.float32, g)
    _check_block(A, torch.randn(1, 64, 2048, 4, generator=g), torch.randn(1, 2048, 4, generator=g), reverse=False)


@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 65536), (torch.complex64, 16384)])
def test_large_outputs_of_every_type_match_the_reference(output_cache, dtype, D):
    """Outputs of 8 MiB or more are written with non-temporal stores of whole tiles (a 16-bit tile
    converted into one vector, complex64 as interleaved pairs): forward and backward still match
    the reference, on recycled blocks full of NaN, for D not a multiple of a block (a tail tile)."""
    shape = (1, 64, D + 24)  # a little over 8 MiB: blocks of 10 MiB, as the fp32 junk outputs below
    _poison_cache((1, 64, 40960), 3)
    g = torch.Generator().manual_seed(22)
    a, x = _coefficients(shape, dtype, g), _randn(shape, dtype, g)
    hits = _cpp.output_cache_info()["hits"]
    _check_diagonal(a, x, h0=_randn((1, D + 24), torch.complex64 if dtype.is_complex else torch.float32, g),
                    reverse=False)
    assert _cpp.output_cache_info()["hits"] == hits + 3  # h, dL/dx, dL/da all on poisoned blocks


def test_output_cache_limit_evicts_the_oldest_and_zero_turns_it_off(output_cache):
    """At most the limit stays cached (the oldest blocks are unmapped first); a limit of 0 keeps
    nothing; empty_output_cache() unmaps what is cached; small outputs never touch the cache."""
    _cpp.set_output_cache_limit(16)  # two 8 MiB blocks
    ptrs = _poison_cache((1, 64, 32768), 3)
    info = _cpp.output_cache_info()
    assert info["cached_bytes"] == 2 * LARGE_OUTPUT and info["limit_bytes"] == 2 * LARGE_OUTPUT
    misses = info["misses"]
    small = _cpp.diagonal_scan_forward(torch.zeros(8), torch.zeros(1, 4, 8), None, cu_seqlens=None, reverse=False)
    assert _cpp.output_cache_info()["misses"] == misses and small.shape == (1, 4, 8)
    reused = _poison_cache((1, 64, 32768), 2)
    assert sorted(reused) == sorted(ptrs[1:])  # the oldest (first freed) block was the one unmapped
    _cpp.empty_output_cache()
    assert _cpp.output_cache_info()["cached_blocks"] == 0
    assert _cpp.set_output_cache_limit(0) == 16
    _poison_cache((1, 64, 32768), 2)
    assert _cpp.output_cache_info()["cached_bytes"] == 0
    with pytest.raises(ValueError, match="megabytes"):
        _cpp.set_output_cache_limit(-1)


def test_large_outputs_are_ordinary_tensors(output_cache):
    """An output on a cached block behaves like any CPU tensor: it grows by resize_ (the storage
    reallocates through the extension's allocator, the old block goes back to the cache), moves to
    shared memory, and survives torch.save / torch.load."""
    import io

    a, x = torch.full((1, 64, 32768), 0.5), torch.ones(1, 64, 32768)
    h = _cpp.diagonal_scan_forward(a, x, None, cu_seqlens=None, reverse=False)
    expect = h.clone()
    buf = io.BytesIO()
    torch.save(h, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), expect)
    h.resize_(2, 64, 32768)  # 16 MiB: a new block; the 8 MiB one is freed into the cache
    assert torch.equal(h[0], expect[0]) and _cpp.output_cache_info()["cached_bytes"] == LARGE_OUTPUT
    h.share_memory_()
    assert h.is_shared() and torch.equal(h[0], expect[0])


def test_output_cache_limit_from_the_environment():
    """LINREC_CPP_CACHE_MB sets the limit (read when the cache is first used); a value that is not
    a number warns and leaves the default. Run in fresh processes (the cached build loads)."""
    import os
    import subprocess
    import sys

    code = ("import torch, warnings; from linrec import _cpp; warnings.simplefilter('always');"
            "_cpp.diagonal_scan_forward(torch.zeros(4), torch.zeros(1, 2, 4), None, cu_seqlens=None, reverse=False);"
            "print(_cpp.output_cache_info()['limit_bytes'])")
    out = {}
    for value in ("24", "lots"):
        env = {**os.environ, "LINREC_CPP_CACHE_MB": value}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        out[value] = (int(run.stdout.split()[-1]), run.stderr)
    assert out["24"][0] == 24 << 20
    assert out["lots"][0] > 0 and "LINREC_CPP_CACHE_MB=lots is not a number" in out["lots"][1]
