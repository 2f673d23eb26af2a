"""Test set-up: the Triton interpreter on machines without CUDA, and shared helpers.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined,
so it is set here, before the tests import linrec's kernels.
"""

import os

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def rel_rms(actual: "torch.Tensor", expected: "torch.Tensor") -> float:
    """Relative RMS error ||actual - expected|| / ||expected|| in float64 (docs/design.md §8, Numerics)."""
    actual = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64)
    expected = expected.detach().to(actual.dtype)
    denom = expected.abs().pow(2).mean().sqrt().item()
    err = (actual - expected).abs().pow(2).mean().sqrt().item()
    return err / max(denom, 1e-30)


# Accuracy bars against the float64 reference (docs/design.md §8): relative RMS error.
TOL = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def to64(t):
    """float64 (complex128) copy of a tensor, None stays None: the reference's inputs."""
    return None if t is None else t.to(torch.complex128 if t.is_complex() else torch.float64)


def run_with_grads(fn, inputs, *, device=None, seed=1):
    """Runs ``fn(*leaves)`` on fresh leaf copies of ``inputs`` (None stays None) on ``device``
    and back-propagates a fixed random projection of every output (its real part if complex).

    Returns:
        (outputs as a list, gradients of the inputs as a list with None for absent inputs).
    """
    device = device or DEVICE
    leaves = [None if t is None else t.detach().clone().to(device).requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for out in outs:
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
        loss = loss + ((out * w.to(out.dtype)).real.sum() if out.is_complex() else (out.double() * w).sum())
    loss.backward()
    return outs, [None if t is None else t.grad for t in leaves]


def assert_close_to_reference(outs, outs_ref, grads, grads_ref, inputs, names, tol):
    """Outputs and gradients finite, shaped like the reference's, gradients in their input's
    dtype, and all within ``tol`` relative RMS of the float64 reference."""
    for i, (out, ref) in enumerate(zip(outs, outs_ref)):
        assert out.shape == ref.shape
        assert torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all(), f"output {i} not finite"
        err = rel_rms(out.cpu(), ref)
        assert err < tol, f"output {i} error {err}"
    for name, inp, got, want in zip(names, inputs, grads, grads_ref):
        if want is None:
            continue
        assert got.shape == want.shape and got.dtype == inp.dtype, name
        assert torch.isfinite(torch.view_as_real(got) if got.is_complex() else got).all(), f"grad of {name} not finite"
        err = rel_rms(got.cpu(), want)
        assert err < tol, f"grad of {name} error {err}"


def assert_compiled_matches_eager(model: "torch.nn.Module", *inputs: "torch.Tensor") -> None:
    """``torch.compile(model, fullgraph=True)`` (aot_eager: traced forward and backward graphs)
    gives the eager loss and parameter gradients; ``model(*inputs)`` returns a scalar loss."""
    eager = model(*inputs)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.fixture
def device():
    return DEVICE
