"""Checks every op shares through ``linrec._common``: packed-sequence offsets, backends, devices.

Each op is called through a small adapter that builds valid inputs for a batch of B rows and
T steps; the family test files hold the checks that belong to one op only.
"""

import pytest
import torch

import linrec

from conftest import HAS_CUDA

B, T = 2, 10


def _diagonal(batch, device="cpu", **kwargs):
    a, x = torch.rand(batch, T, 4), torch.randn(batch, T, 4)
    return linrec.diagonal_scan(a, x.to(device), **kwargs)


def _householder(batch, device="cpu", **kwargs):
    q, k, v = torch.randn(batch, T, 3, 4), torch.randn(batch, T, 2, 3, 4), torch.randn(batch, T, 2, 3, 5)
    beta = torch.rand(batch, T, 2, 3)
    return linrec.householder_scan(q.to(device), k, v, beta, **kwargs)


def _block_diagonal(batch, device="cpu", **kwargs):
    A, x = torch.rand(batch, T, 3, 4, 4), torch.randn(batch, T, 3, 4)
    return linrec.block_diagonal_scan(A, x.to(device), **kwargs)


def _selective(batch, device="cpu", **kwargs):
    x, delta = torch.randn(batch, T, 4), torch.rand(batch, T, 4)
    A, Bm, C = -torch.rand(4, 3), torch.randn(batch, T, 3), torch.randn(batch, T, 3)
    return linrec.selective_scan(x.to(device), delta, A, Bm, C, **kwargs)


OPS = {"diagonal": _diagonal, "householder": _householder, "block_diagonal": _block_diagonal,
       "selective": _selective}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch, cu_seqlens, exc, match", [
    (1, torch.tensor([0, 6, 4, 10]), ValueError, "non-decreasing"),
    (1, torch.tensor([1, 10]), ValueError, "start at 0"),
    (1, torch.tensor([0, 9]), ValueError, "end at"),
    (B, torch.tensor([0, 10]), ValueError, "B = 1"),
    (1, torch.tensor([0.0, 10.0]), TypeError, "cu_seqlens must have dtype"),
    (1, torch.tensor([[0, 10]]), ValueError, "cu_seqlens must be 1-D"),
    (1, [0, 10], TypeError, "cu_seqlens must be a torch.Tensor"),
])
def test_malformed_cu_seqlens(op, batch, cu_seqlens, exc, match):
    with pytest.raises(exc, match=match):
        OPS[op](batch, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend, match", [("fast", "backend must be one of"), (None, "backend must be one of")])
def test_unknown_backend(op, backend, match):
    with pytest.raises(ValueError, match=match):
        OPS[op](B, backend=backend)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.skipif(HAS_CUDA, reason="the errors are for machines without CUDA")
def test_gpu_backends_on_cpu_tensors_say_why(op, monkeypatch):
    with pytest.raises(ValueError, match="backend='cuda'"):
        OPS[op](B, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton kernels need a CUDA device"):
        OPS[op](B, backend="triton")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_device_mismatch_is_an_error(op):
    with pytest.raises(ValueError, match="is on"):
        OPS[op](B, device="cuda")
