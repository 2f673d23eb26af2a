"""The traffic meter (``python -m bench.traffic``): distinct bytes per launch and PyTorch-op bytes.

The meter hooks the Triton interpreter, so these tests run only where the kernels run under it
(no CUDA device). Shapes are tiny: the interpreter costs about a millisecond per program.
"""

import os
import sys

import pytest
import torch

from conftest import HAS_CUDA

if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the traffic meter counts under the Triton interpreter", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.traffic import Case, measure, run_case  # noqa: E402


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=ok), mask=ok)


@triton.jit
def _copy_part_kernel(src_ptr, dst_ptr, n, lo, hi, BLOCK: tl.constexpr):
    """Loads all of src (twice: repeats count once) but stores only dst[lo:hi]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(src_ptr + offs, mask=ok) + tl.load(src_ptr + offs, mask=ok)
    tl.store(dst_ptr + offs, v * 0.5, mask=ok & (offs >= lo) & (offs < hi))


N, BLOCK = 1000, 128  # the last program's lanes past N are masked off and must not count


def test_one_launch_copy_measures_two_units():
    src = torch.randn(N)
    dst = torch.empty(N)
    traffic, _ = measure(lambda: _copy_kernel[(triton.cdiv(N, BLOCK),)](src, dst, N, BLOCK=BLOCK))
    torch.testing.assert_close(dst, src)
    assert traffic.total == 2 * N * 4
    assert [(launch.load_bytes, launch.store_bytes) for launch in traffic.launches] == [(N * 4, N * 4)]
    assert traffic.programs == triton.cdiv(N, BLOCK) and traffic.torch_bytes == 0
    assert traffic.launches[0].by_arg == {"src_ptr": [N * 4, 0], "dst_ptr": [0, N * 4]}


def test_input_read_in_two_launches_measures_three_units():
    src = torch.randn(N)
    dst = torch.empty(N)
    grid = (triton.cdiv(N, BLOCK),)

    def run():
        _copy_part_kernel[grid](src, dst, N, 0, 600, BLOCK=BLOCK)
        _copy_part_kernel[grid](src, dst, N, 600, N, BLOCK=BLOCK)

    traffic, _ = measure(run)
    torch.testing.assert_close(dst, src)
    assert traffic.total == 3 * N * 4
    assert [(launch.load_bytes, launch.store_bytes) for launch in traffic.launches] == \
        [(N * 4, 600 * 4), (N * 4, (N - 600) * 4)]


def test_pytorch_ops_count_reads_and_writes_but_not_views():
    x = torch.randn(64, 8)

    def run():
        y = x.t().reshape(-1)          # a transposed reshape copies: read 512, write 512 elements
        z = y.view(8, 64)[:, :4]       # views: nothing
        w = z.to(torch.bfloat16)       # read 32 fp32, write 32 bf16
        torch.zeros(10).zero_()        # writes only
        return w

    traffic, _ = measure(run)
    assert traffic.launches == []
    assert traffic.torch_bytes == (512 + 512) * 4 + 32 * 4 + 32 * 2 + 10 * 4 * 2


def test_diagonal_forward_one_segment_plan_measures_its_minimum(monkeypatch):
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    # T < 8 x BLOCK_T (256 on the H100 plan): one segment, one launch.
    row = run_case(Case("diagonal", "fwd", "fp32", dict(B=1, T=96, D=24)))
    assert row["launches"] == 1 and row["torch_ops"] == 0
    assert row["measured_bytes"] == row["min_bytes"] == 3 * 96 * 24 * 4
    assert row["ratio"] == 1.0


def test_diagonal_multi_chunk_plan_measures_its_minimum(monkeypatch):
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    # One program per channel block (B x D / CHUNK_D = 1) is far below 4 x 132: the sequence is cut
    # into 128-step chunks, one program each, joined by decoupled look-back in the same launch. a and x
    # are read once; the chunks' published states, the flags and the ticket add well under 1%.
    row = run_case(Case("diagonal", "fwd", "fp32", dict(B=1, T=512, D=16)))
    assert row["launches"] == 1 and row["grids"] == "4x1x1" and row["programs"] == 4
    assert row["min_bytes"] == 3 * 512 * 16 * 4
    assert row["min_bytes"] < row["measured_bytes"] < 1.01 * row["min_bytes"]
    assert "ws_ptr" in row["detail"] and "sync_ptr" in row["detail"]


@pytest.mark.parametrize("mode,variant", [("bwd", ""), ("bwd", "a (D,)")])
def test_diagonal_multi_chunk_backward_measures_its_minimum(mode, variant, monkeypatch):
    """The backward in one launch too: dL/da written once in a's dtype (bf16 here, no fp32 buffer and
    cast), or for a broadcast over time summed per program into an (N, S, D) workspace."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    dtype = "fp32" if variant else "bf16"
    row = run_case(Case("diagonal", mode, dtype, dict(B=1, T=512, D=16), variant=variant))
    assert row["launches"] == 1 and row["grids"] == "4x1x1"
    limit = 1.05 if variant else 1.03
    assert row["min_bytes"] < row["measured_bytes"] < limit * row["min_bytes"], row["detail"]


def test_selective_forward_reads_and_writes_once_plus_checkpoints(monkeypatch):
    """The selective scan's forward in one launch: x, delta, z, B, C (and A, D, delta_bias) read once,
    y and the final state written once, plus the checkpoints it saves for the backward: the state
    entering every 256 steps, (B * cdiv(T, 256), D, N) fp32. Nothing else moves."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    B, T, D, N = 1, 300, 128, 16
    row = run_case(Case("selective", "fwd", "bf16", dict(B=B, T=T, D=D, N=N, G=1)))
    checkpoint_bytes = B * 2 * D * N * 4
    assert row["launches"] == 1 and row["torch_ops"] == 0, row["detail"]
    assert row["measured_bytes"] == row["min_bytes"] + checkpoint_bytes, row["detail"]


def test_selective_backward_in_one_launch_near_its_minimum(monkeypatch):
    """The backward from the forward's checkpoints: one launch reading the inputs and dy once and
    writing dx, ddelta, dz once in their dtypes. Beyond the minimum it moves exactly: the
    checkpoints (read); dB and dC as fp32 sums over channel blocks (zero-fill 4, atomic load and
    store 8, cast to bf16 4 + 2 bytes per element instead of the minimum's 2: 16 more); dA, dD and
    d delta_bias as fp32 sums over sequences (zero-fill and atomic load: 8 more bytes per element).
    At D = 128, N = 16 that is 2.45 units of x over a minimum of 7.5; the dB/dC share falls as D / N
    grows (bench.traffic's selective rows)."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    B, T, D, N = 1, 300, 128, 16
    row = run_case(Case("selective", "bwd", "bf16", dict(B=B, T=T, D=D, N=N, G=1)))
    assert row["launches"] == 1, row["detail"]
    checkpoint_bytes = B * 2 * D * N * 4
    bc_elements = 2 * B * T * N
    parameter_elements = D * N + 2 * D
    extra = row["measured_bytes"] - row["min_bytes"]
    assert extra == checkpoint_bytes + 16 * bc_elements + 8 * parameter_elements, (extra, row["detail"])
