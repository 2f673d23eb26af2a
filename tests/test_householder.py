"""householder_scan: every backend against the float64 reference, outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

import linrec
from linrec.householder import householder_scan_chunked, householder_scan_recurrent, householder_scan_reference

from conftest import (DEVICE, HAS_CUDA, TOL, assert_close_to_reference, assert_compiled_matches_eager, rel_rms,
                      run_with_grads, to64)

BACKENDS = ["triton", "torch"]
NAMES = ("q", "k", "v", "beta", "log_gate", "initial_state")


def _inputs(B, T, H, K, V, n, *, gate=True, h0=True, N=None, beta_kind="mixed", normalize=True, seed=0,
            dtype=torch.float32):
    """Random (q, k, v, beta, log_gate, initial_state); beta spans [0, 2] including both ends."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.randn(B, T, n, H, K, generator=g)
    if normalize:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, n, H, V, generator=g)
    beta = torch.rand(B, T, n, H, generator=g) * 2
    if beta_kind == "mixed":
        flat = beta.view(-1)
        flat[::7] = 0.0
        flat[3::11] = 2.0
    elif beta_kind == "two":
        beta.fill_(2.0)
    elif beta_kind == "zero":
        beta.zero_()
    log_gate = -torch.rand(B, T, H, generator=g) * 0.5 if gate else None
    if gate:
        log_gate.view(-1)[::5] = 0.0
    state = torch.randn(N if N is not None else B, H, K, V, generator=g) if h0 else None
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(q), cast(k), cast(v), beta, log_gate, state


def _run(backend, inputs, cu_seqlens=None, use_final=True):
    """Forward + backward of random projections of o and final_state; returns (o, final, grads)."""
    cu = cu_seqlens.to(DEVICE) if cu_seqlens is not None else None

    def scan(*t):
        o, final = linrec.householder_scan(*t, output_final_state=True, cu_seqlens=cu, backend=backend)
        scan.final = final
        return (o, final) if use_final else o

    outs, grads = run_with_grads(scan, inputs)
    return outs[0], scan.final, grads


def _to64(inputs):
    return [to64(t) for t in inputs]


def _check(backend, inputs, tol, cu_seqlens=None, use_final=True):
    o, final, grads = _run(backend, inputs, cu_seqlens, use_final)
    o_ref, final_ref, grads_ref = _run("reference", _to64(inputs), cu_seqlens, use_final)
    assert o.dtype == inputs[0].dtype and final.dtype == torch.float32
    assert_close_to_reference([o, final], [o_ref, final_ref], grads, grads_ref, inputs, NAMES, tol)


def _small(backend):
    """Interpreter-friendly sizes for Triton on the CPU, larger ones elsewhere."""
    return backend == "triton" and not HAS_CUDA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("gate", [False, True])
def test_fp32_matches_reference(backend, n, gate):
    T = 45 if _small(backend) else 150
    inputs = _inputs(2, T, 2, 16, 8, n, gate=gate)
    _check(backend, inputs, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, K, V", [(1, 5, 3), (7, 13, 9), (67, 7, 33), (20, 40, 70)])
def test_odd_lengths_and_head_dims(backend, T, K, V):
    inputs = _inputs(1, T, 3, K, V, 2, gate=True)
    _check(backend, inputs, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_sequence_passes_the_state_through(backend):
    q, k, v, beta, log_gate, h0 = _inputs(2, 0, 2, 4, 5, 3)
    h0 = h0.to(DEVICE).requires_grad_()
    o, final = linrec.householder_scan(*(t.to(DEVICE) for t in (q, k, v, beta, log_gate)), h0,
                                       output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 5) and torch.equal(final, h0) and final.data_ptr() != h0.data_ptr()
    (final * 3).sum().backward()
    assert torch.equal(h0.grad, torch.full_like(h0, 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dims_256_and_many_factors(backend):
    """K = V = 256 (several K and V blocks in the kernels), and n = 5 (12 tokens = 60 of 64 chunk rows)."""
    _check(backend, _inputs(1, 9, 1, 256, 256, 2), 1e-5)
    _check(backend, _inputs(1, 30, 2, 8, 8, 5), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_kind", ["zero", "two"])
def test_beta_extremes(backend, beta_kind):
    inputs = _inputs(1, 40, 2, 8, 8, 2, beta_kind=beta_kind)
    _check(backend, inputs, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_extremes_and_unnormalised_keys(backend):
    q, k, v, beta, log_gate, h0 = _inputs(1, 50, 2, 8, 8, 2, normalize=False)
    # Unnormalised keys: short ones (norms in [0.2, 1]) and long ones (norm 3, with beta scaled so
    # that beta ||k||^2 stays in [0, 2] and the reference stays bounded).
    k = F.normalize(k, dim=-1) * (0.2 + 0.8 * torch.rand(k.shape[:-1] + (1,), generator=torch.Generator().manual_seed(4)))
    k[:, 25:] = F.normalize(k[:, 25:], dim=-1) * 3.0
    beta = beta.clone()
    beta[:, 25:] /= 9.0
    log_gate = log_gate.clone()
    log_gate[:, 10:13] = -1e4   # a hard reset (alpha = 0)
    log_gate[:, 30:] = 0.0      # no decay at all
    _check(backend, (q, k, v, beta, log_gate, h0), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_final", [False, True])
def test_without_initial_state_or_final_state_grad(backend, use_final):
    inputs = _inputs(2, 20, 2, 8, 4, 1, h0=False)
    _check(backend, inputs, 1e-5, use_final=use_final)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    q, k, v, beta, log_gate, h0 = _inputs(1, 40, 2, 16, 16, 2, dtype=dtype)
    o, final, grads = _run(backend, (q, k, v, beta.to(dtype), log_gate, h0))
    o_ref, final_ref, grads_ref = _run("reference", _to64((q, k, v, beta, log_gate, h0)))
    assert o.dtype == dtype and final.dtype == torch.float32
    assert rel_rms(o, o_ref) < 1e-2 and rel_rms(final, final_ref) < 1e-2
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert rel_rms(got, want) < 1e-2, f"grad of {name} error {rel_rms(got, want)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_separate_sequences(backend):
    lengths = [5, 0, 23, 1, 17]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    inputs = _inputs(1, int(cu[-1]), 2, 8, 6, 2, N=len(lengths))
    _check(backend, inputs, 1e-5, cu_seqlens=cu)
    o, final, _ = _run(backend, inputs, cu_seqlens=cu)
    q, k, v, beta, log_gate, h0 = inputs
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, f_i = linrec.householder_scan(
            *(t[:, s:e].to(DEVICE) for t in (q, k, v, beta, log_gate)), h0[i : i + 1].to(DEVICE),
            output_final_state=True, backend=backend)
        torch.testing.assert_close(o[:, s:e].detach(), o_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[i : i + 1].detach(), f_i, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_n1_is_deltanet_and_4d_inputs(backend):
    """n = 1 with 4-D k, v and 3-D beta is the (gated) delta rule, written out here."""
    q, k, v, beta, log_gate, h0 = _inputs(2, 12, 2, 6, 5, 1)
    o, final = linrec.householder_scan(*(t.to(DEVICE) for t in (q, k[:, :, 0], v[:, :, 0], beta[:, :, 0],
                                                                  log_gate, h0)),
                                       output_final_state=True, backend=backend)
    S, outs = h0.double(), []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t, 0].double(), v[:, t, 0].double(), beta[:, t, 0].double()
        S = log_gate[:, t].double().exp()[..., None, None] * S
        S = S + bt[..., None, None] * kt[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))[..., None, :]
        outs.append(6 ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, q[:, t].double()))
    assert rel_rms(o.cpu(), torch.stack(outs, 1)) < 1e-5 and rel_rms(final.cpu(), S) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3])
def test_n_factors_equal_interleaved_n1(backend, n):
    """n factors per token = n = 1 on the (B, T * n) sequence, gated on each token's first sub-step."""
    q, k, v, beta, log_gate, h0 = _inputs(1, 14, 2, 8, 4, n)
    B, T, H, K = q.shape
    o, final = linrec.householder_scan(*(t.to(DEVICE) for t in (q, k, v, beta, log_gate, h0)),
                                       output_final_state=True, backend=backend)
    q_il = torch.zeros(B, T, n, H, K)
    q_il[:, :, -1] = q                                   # read after each token's last factor
    gate_il = torch.zeros(B, T, n, H)
    gate_il[:, :, 0] = log_gate                          # decay before each token's first factor
    o_il, final_il = linrec.householder_scan(
        *(t.flatten(1, 2).to(DEVICE) for t in (q_il, k, v, beta, gate_il)), h0.to(DEVICE),
        output_final_state=True, backend=backend)
    torch.testing.assert_close(o, o_il.unflatten(1, (T, n))[:, :, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_il, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_recurrent_matches_chunked(n):
    inputs = _inputs(2, 6, 2, 8, 4, n)
    o_r, f_r = householder_scan_recurrent(*inputs)
    o_c, f_c = householder_scan_chunked(*inputs)
    torch.testing.assert_close(o_r, o_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_r, f_c, rtol=1e-5, atol=1e-5)
    # Decoding token by token from the chunked prefill's state gives the chunked outputs.
    q, k, v, beta, log_gate, h0 = _inputs(1, 70, 2, 8, 4, n, seed=3)
    o_full, f_full = householder_scan_chunked(q, k, v, beta, log_gate, h0)
    o_pre, state = householder_scan_chunked(q[:, :64], k[:, :64], v[:, :64], beta[:, :64], log_gate[:, :64], h0)
    steps = []
    for t in range(64, 70):
        o_t, state = householder_scan_recurrent(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], beta[:, t:t + 1],
                                                log_gate[:, t:t + 1], state)
        steps.append(o_t)
    torch.testing.assert_close(torch.cat([o_pre] + steps, 1), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, f_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, gate, varlen", [(1, False, False), (3, True, True)])
def test_triton_recurrent_matches_triton_chunked(n, gate, varlen):
    """The decoding kernel (used for T <= 8) and the chunked kernels give the same outputs and states."""
    from linrec.kernels.householder import householder_scan_forward, householder_scan_recurrent_forward
    cu = torch.tensor([0, 2, 2, 7], device=DEVICE) if varlen else None
    q, k, v, beta, log_gate, h0 = (t.to(DEVICE) if t is not None else None
                                   for t in _inputs(1 if varlen else 2, 7, 2, 12, 20, n, gate=gate,
                                                    N=3 if varlen else None))
    o_r, f_r = householder_scan_recurrent_forward(q, k, v, beta, log_gate, h0, cu_seqlens=cu, scale=0.3)
    o_c, f_c = householder_scan_forward(q, k, v, beta, log_gate, h0, cu_seqlens=cu, scale=0.3)
    torch.testing.assert_close(o_r, o_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_r, f_c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_fp32_accuracy(backend):
    """T = 16k tokens with beta across [0, 2] and gates up to 1: no NaN, fp32 within 1e-5 of float64."""
    T = 16384 if not _small(backend) or HAS_CUDA else 2048
    q, k, v, beta, log_gate, h0 = _inputs(1, T, 1, 4, 4, 1, seed=5)
    log_gate = log_gate * 0.02  # long memory
    o, final = linrec.householder_scan(*(t.to(DEVICE) for t in (q, k, v, beta, log_gate, h0)),
                                       output_final_state=True, backend=backend)
    o_ref, final_ref = householder_scan_chunked(*_to64((q, k, v, beta, log_gate, h0)))
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert rel_rms(o.cpu(), o_ref) < 1e-5 and rel_rms(final.cpu(), final_ref) < 1e-5


def test_chunked_float64_matches_reference_on_long_sequence():
    """The float64 chunked form used as the long-sequence oracle above agrees with the loop."""
    q, k, v, beta, log_gate, h0 = _to64(_inputs(1, 3000, 1, 4, 4, 1, seed=5))
    o_c, f_c = householder_scan_chunked(q, k, v, beta, log_gate * 0.02, h0)
    o_r, f_r = householder_scan_reference(q, k, v, beta, log_gate * 0.02, h0)
    assert rel_rms(o_c, o_r) < 1e-10 and rel_rms(f_c, f_r) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_stride0_grads_no_mutation(backend):
    q, k, v, beta, log_gate, h0 = _inputs(2, 30, 2, 8, 6, 2)
    # Non-contiguous views of the same values.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    h0 = h0.transpose(-1, -2).contiguous().transpose(-1, -2)
    log_gate = torch.stack([log_gate, log_gate], -1)[..., 0]
    inputs = [t.to(DEVICE) for t in (q, k, v, beta, log_gate, h0)]
    snapshot = [t.clone() for t in inputs]
    leaves = [t.clone().requires_grad_() for t in inputs]
    o, final = linrec.householder_scan(*leaves, output_final_state=True, backend=backend)
    (o.sum() + final.sum()).backward()  # stride-0 incoming gradients
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    o_r, f_r = householder_scan_reference(*ref_leaves)
    (o_r.sum() + f_r.sum()).backward()
    for name, got, want in zip(NAMES, leaves, ref_leaves):
        assert rel_rms(got.grad.cpu(), want.grad) < 1e-5, name
    for before, after in zip(snapshot, inputs):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_float64(backend):
    inputs = [t.double().requires_grad_() for t in _inputs(1, 5, 1, 3, 2, 2)]
    assert torch.autograd.gradcheck(
        lambda *a: linrec.householder_scan(*a, output_final_state=True, backend=backend), inputs)


def test_auto_backend_on_cpu_is_torch():
    inputs = _inputs(1, 20, 1, 4, 4, 2)
    o, _ = linrec.householder_scan(*inputs)
    torch.testing.assert_close(o, linrec.householder_scan(*inputs, backend="torch")[0])


def test_opcheck():
    q, k, v, beta, log_gate, h0 = [t.requires_grad_() for t in _inputs(1, 12, 2, 4, 3, 2)]
    for backend in ("torch", "reference"):
        torch.library.opcheck(torch.ops.linrec.householder_scan.default,
                              (q, k, v, beta, log_gate, h0, None, 0.5, backend))
        torch.library.opcheck(torch.ops.linrec.householder_scan.default,
                              (q, k, v, beta, None, None, None, 0.5, backend))
    cu = torch.tensor([0, 5, 12])
    h0_2 = torch.randn(2, 2, 4, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.linrec.householder_scan.default,
                          (q, k, v, beta, log_gate, h0_2, cu, 0.5, "torch"))


def test_opcheck_triton():
    q, k, v, beta, log_gate, h0 = [t.to(DEVICE).requires_grad_() for t in _inputs(1, 6, 1, 4, 3, 2)]
    torch.library.opcheck(torch.ops.linrec.householder_scan.default,
                          (q, k, v, beta, log_gate, h0, None, 0.5, "triton"))


def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self, d=8, H=2, K=4, n=2):
            super().__init__()
            self.H, self.K, self.n = H, K, n
            self.proj = torch.nn.Linear(d, H * K * (1 + 2 * n) + H * n + H)

        def forward(self, x):
            B, T, _ = x.shape
            H, K, n = self.H, self.K, self.n
            q, k, v, b, g = self.proj(x).split([H * K, H * K * n, H * K * n, H * n, H], dim=-1)
            k = F.normalize(k.view(B, T, n, H, K), dim=-1)
            o, state = linrec.householder_scan(q.view(B, T, H, K), k, v.view(B, T, n, H, K),
                                               2 * b.view(B, T, n, H).sigmoid(), F.logsigmoid(g),
                                               output_final_state=True, backend="torch")
            return o.sum() + state.square().sum()

    model = Model()
    x = torch.randn(2, 20, 8)
    assert_compiled_matches_eager(model, x)


# --- bad input: each raises a clear error naming the argument -------------------------------------

def _good(n=2):
    q, k, v, beta, log_gate, h0 = _inputs(2, 10, 3, 4, 5, n)
    return q, k, v, beta, log_gate, h0


@pytest.mark.parametrize("case, exc, match", [
    (lambda q, k, v, b, g, h: linrec.householder_scan(q[0], k, v, b), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q.long(), k, v, b), TypeError, "q must have dtype"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k.double(), v, b), TypeError, "k must have dtype"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k[..., :3], v, b), ValueError, r"k must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k[0], v, b), ValueError, r"k must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k.numpy(), v, b), TypeError, "k must be a torch.Tensor"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v[:, :, :1], b), ValueError, "v has n = 1"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v[:, :, 0], b), ValueError, "v is 4-D"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v[:, :5], b), ValueError, "v must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b[:, :, :1]), ValueError, "beta has n = 1"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b[:, :, 0]), ValueError, "beta is 3-D"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b[..., :2]), ValueError, "beta must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b.long()), TypeError, "beta must have dtype"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g[:, :, :2]), ValueError,
     "log_gate must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g[..., None]), ValueError,
     "log_gate must have 3 dimensions"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g, h[..., :4]), ValueError,
     r"initial_state must have shape \(N, H, K, V\) = \(2, 3, 4, 5\)"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g, h[:, :, :3]), ValueError,
     "initial_state must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g, h[:1]), ValueError,
     "initial_state must have shape"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, g, h.long()), TypeError, "initial_state"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, scale="big"), TypeError, "scale must be"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q, k, v, b, output_final_state=1), TypeError,
     "output_final_state must be a bool"),
    (lambda q, k, v, b, g, h: linrec.householder_scan(q[:1], k[:1], v[:1], b[:1], g[:1], h,
                                                      cu_seqlens=torch.tensor([0, 3, 6, 10])),
     ValueError, "initial_state must have shape"),
])
def test_bad_input(case, exc, match):
    with pytest.raises(exc, match=match):
        case(*_good())


# ---------------------------------------------------------------------------------------------
# Triton path internals: the chunk inverse by 16 x 16 blocks merged by products.
# ---------------------------------------------------------------------------------------------
try:  # a one-program Triton kernel: t = _unit_lower_inverse(a) for a (BL, BL) fp32 matrix
    import triton
    import triton.language as tl

    from linrec.kernels.householder import _unit_lower_inverse

    @triton.jit
    def _invert_kernel(a_ptr, t_ptr, BL: tl.constexpr):
        r = tl.arange(0, BL)
        A = tl.load(a_ptr + r[:, None] * BL + r[None, :])
        tl.store(t_ptr + r[:, None] * BL + r[None, :], _unit_lower_inverse(A, BL, "ieee"))
except ImportError:  # no Triton: the Triton tests are skipped
    _invert_kernel = None


@pytest.mark.parametrize("BL", [64, 128])
@pytest.mark.parametrize("kind", ["random", "resets", "householder"])
def test_triton_blocked_unit_lower_inverse(BL, kind):
    """_unit_lower_inverse(A) = (I + A)^{-1} for strictly lower A, against torch.linalg.inv in float64."""
    if _invert_kernel is None:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(BL)
    if kind == "householder":  # the chunk's A: beta_i k_i . k_m, unit keys, beta in [0, 2]
        k = F.normalize(torch.randn(BL, 8, generator=g, dtype=torch.float64), dim=-1)
        A = (torch.rand(BL, 1, generator=g, dtype=torch.float64) * 2) * (k @ k.T)
    else:
        A = torch.randn(BL, BL, generator=g, dtype=torch.float64) * 0.3
    if kind == "resets":  # hard resets: A[i, m] = 0 whenever a reset lies in (m, i], across block borders
        seg = torch.cumsum(torch.isin(torch.arange(BL), torch.tensor([5, 16, 17, 40, 63])), 0)
        A = torch.where(seg[:, None] == seg[None, :], A, 0.0)
    A = torch.tril(A, -1)
    T = torch.empty(BL, BL, dtype=torch.float32, device=DEVICE)
    _invert_kernel[(1,)](A.float().to(DEVICE), T, BL=BL)
    want = torch.linalg.inv(torch.eye(BL, dtype=torch.float64) + A)
    assert rel_rms(T.cpu().double(), want) < 1e-5
    assert torch.equal(T.cpu().triu(1), torch.zeros(BL, BL))          # exactly lower triangular
    if kind == "resets":                                                # exact zeros across a reset
        assert torch.equal(T.cpu()[want == 0], torch.zeros_like(T.cpu()[want == 0]))


def test_triton_launch_offsets_and_gradient_dtypes():
    """Offsets computed on the device match the host's; the backward writes every gradient in its input's dtype."""
    from linrec.kernels import householder as hk

    lengths = [5, 0, 130, 64, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE)
    T, CT = sum(lengths), 64
    cu_tok, cu_chunk, max_chunks, total = hk._offsets(1, T, CT, cu, DEVICE)
    chunks = [-(-n // CT) for n in lengths]
    assert cu_tok.tolist() == cu.tolist()
    assert cu_chunk.tolist() == [0] + torch.tensor(chunks).cumsum(0).tolist()
    assert max_chunks >= max(chunks) and total >= sum(chunks)
    cu_tok, cu_chunk, max_chunks, total = hk._offsets(3, 100, CT, None, DEVICE)
    assert cu_tok.tolist() == [0, 100, 200, 300] and cu_chunk.tolist() == [0, 2, 4, 6] and (max_chunks, total) == (2, 6)

    q, k, v, beta, log_gate, h0 = (t.to(DEVICE) for t in _inputs(1, 20, 2, 16, 16, 1, dtype=torch.bfloat16))
    do = torch.randn(1, 20, 2, 16, device=DEVICE).to(torch.bfloat16)
    grads = hk.householder_scan_backward(q, k, v, beta, log_gate, h0, do, None, cu_seqlens=None, scale=0.25)
    for g, t in zip(grads, (q, k, v, beta, log_gate, h0)):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g.float()).all()
    assert hk.householder_scan_backward(q, k, v, beta, None, None, do, None, cu_seqlens=None, scale=0.25)[5] is None


@pytest.mark.parametrize("dtype, n, varlen", [(torch.float32, 1, False), (torch.bfloat16, 3, True)])
def test_triton_backward_from_the_forwards_tinv(dtype, n, varlen):
    """The forward op hands its chunk inverse to the backward op (autograd saves it): the same gradients,
    bit for bit, as the backward that recomputes it; the saved tensor has the fake kernel's shape and
    dtype, and the backends that save nothing give an empty one."""
    from linrec.householder.op import _saved_like

    T = 70
    q, k, v, beta, log_gate, _ = (t.to(DEVICE) if t is not None else None
                                  for t in _inputs(1, T, 2, 16, 8, n, dtype=dtype, h0=False))
    cu = torch.tensor([0, 9, 9, 70], device=DEVICE) if varlen else None
    h0 = torch.randn(3 if varlen else 1, 2, 16, 8, device=DEVICE)
    o, final, saved = torch.ops.linrec.householder_scan(q, k, v, beta, log_gate, h0, cu, 0.5, "triton")
    like = _saved_like(q, n, "triton")
    assert saved.shape == like.shape and saved.dtype == like.dtype
    assert saved.shape == (1, T * n, 2, 64) and saved.dtype == dtype               # (fp32: kept in fp32)
    do = torch.randn(o.shape, device=DEVICE).to(dtype)
    dfinal = torch.randn(final.shape, device=DEVICE)
    inputs, rest = (q, k, v, beta, log_gate, h0), (do, dfinal, cu, 0.5, "triton")
    from_saved = torch.ops.linrec.householder_scan_backward(*inputs, saved, *rest)
    recomputed = torch.ops.linrec.householder_scan_backward(*inputs, None, *rest)
    for a, b in zip(from_saved, recomputed):
        assert torch.equal(a, b)
    assert torch.ops.linrec.householder_scan(q, k, v, beta, log_gate, h0, cu, 0.5, "torch")[2].numel() == 0
    assert _saved_like(q[:, :8], n, "triton").numel() == 0                          # decoding: step by step


# ---------------------------------------------------------------------------------------------
# fp32 products as 3xTF32 ("tf32x3"): the GPU's arithmetic emulated in the interpreter.
# ---------------------------------------------------------------------------------------------
def _round_to_tf32(x):
    """x (numpy float32) rounded to TF32 (8-bit exponent, 10-bit mantissa), to nearest with ties to
    even: add 0xFFF plus the lowest kept mantissa bit to the bit pattern, then clear the 13 dropped
    bits (a carry into the exponent is the correct rounding up). Inf and NaN stay as they are."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    keep_lsb = (bits >> np.uint32(13)) & np.uint32(1)
    rounded = (bits + np.uint32(0xFFF) + keep_lsb) & np.uint32(0xFFFFE000)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    return np.where(finite, rounded, bits).view(np.float32)


def _tf32x3_matmul(a, b):
    """a @ b as the GPU's 3xTF32 product: each fp32 operand split into hi = tf32(x) and lo = tf32(x - hi)
    (x - hi is exact in fp32), the three TF32 products hi hi, hi lo, lo hi (each exact in fp32: 11 x 11
    significant bits) accumulated in fp32; lo lo (about 2^-22 of |a| |b|) is dropped."""
    import numpy as np

    a_hi, b_hi = _round_to_tf32(a), _round_to_tf32(b)
    a_lo, b_lo = _round_to_tf32(a - a_hi), _round_to_tf32(b - b_hi)
    mm = lambda x, y: np.matmul(x, y, dtype=np.float32)  # noqa: E731
    return mm(a_lo, b_hi) + mm(a_hi, b_lo) + mm(a_hi, b_hi)


@pytest.fixture
def tf32x3_interpreter(monkeypatch):
    """The interpreter's ``tl.dot`` (which ignores ``input_precision`` and multiplies fp32 exactly) made
    to compute fp32 x fp32 products requested as "tf32x3" the way the GPU does (``_tf32x3_matmul``).
    Yields the list of the input precisions of every product seen."""
    if HAS_CUDA:
        pytest.skip("the GPU runs real 3xTF32 products; this emulates them in the interpreter")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from triton._C.libtriton import ir
    import triton.language as tl

    original = interpreter.InterpreterBuilder.create_dot
    seen = []

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append(input_precision)
        if input_precision == ir.INPUT_PRECISION.TF32x3 and a.dtype == tl.float32 and b.dtype == tl.float32:
            product = _tf32x3_matmul(a.data, b.data)
            return interpreter.TensorHandle((product + d.data).astype(d.data.dtype), d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    yield seen


def test_tf32x3_emulation_itself():
    """The emulation is what 3xTF32 is: TF32 values (13 low bits clear), rounding to nearest even,
    and products within a few 2^-24 of float64 where a single TF32 product is off by about 2^-11."""
    import numpy as np

    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, -(1 + 2**-10)], dtype=np.float32)
    assert _round_to_tf32(x).tolist() == [1.0, 1 + 2**-9, 1 + 2**-10, -(1 + 2**-10)]   # ties to even
    g = np.random.default_rng(0)
    a = g.standard_normal((64, 64)).astype(np.float32)
    b = g.standard_normal((64, 16)).astype(np.float32)
    assert (_round_to_tf32(a).view(np.uint32) & np.uint32(0x1FFF) == 0).all()
    exact = a.astype(np.float64) @ b.astype(np.float64)
    err = lambda y: np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))  # noqa: E731
    assert err(_tf32x3_matmul(a, b)) < 1e-6
    assert err(np.matmul(_round_to_tf32(a), _round_to_tf32(b))) > 1e-4          # plain TF32, for contrast


def test_triton_fp32_with_emulated_tf32x3_products(tf32x3_interpreter):
    """fp32 inputs: every Triton product is requested as "tf32x3", and with the GPU's 3xTF32 arithmetic
    the forward and backward (gates, n = 2, an initial state) stay within fp32's 1e-5 of float64."""
    from triton._C.libtriton import ir

    inputs = _inputs(2, 45, 2, 32, 16, 2, gate=True, h0=True)
    _check("triton", inputs, 1e-5)
    assert tf32x3_interpreter and set(tf32x3_interpreter) == {ir.INPUT_PRECISION.TF32x3}
