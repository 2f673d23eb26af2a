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
    """Relative RMS error ||actual - expected|| / ||expected|| in float64 (DESIGN.md §4)."""
    actual = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64)
    expected = expected.detach().to(actual.dtype)
    denom = expected.abs().pow(2).mean().sqrt().item()
    err = (actual - expected).abs().pow(2).mean().sqrt().item()
    return err / max(denom, 1e-30)


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
