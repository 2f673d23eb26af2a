"""linrec.distributed (context parallelism) and the layers under DDP / FSDP2, on spawned gloo processes.

Every test spawns ``world`` processes running this file as a script (``python test_distributed.py
SCENARIO RANK WORLD PORT``) on a free port of 127.0.0.1; each process builds the same inputs from
one seed, runs the single-device op on the whole sequence and the distributed op on its slice, and
asserts that its slice of the outputs and every gradient agree (gradients of inputs that are the
same on every rank: their sum over the ranks). Many checks share one spawned run (spawning costs
seconds). The parent bounds the time of every run (init_process_group has a timeout, the join a
deadline after which every process is killed) and removes the processes it started.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 150
TOL = {"float32": 1e-5, "complex64": 1e-5, "bfloat16": 1e-2}


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, world: int, timeout: float = TIMEOUT_S) -> list:
    """Runs ``scenario`` on ``world`` processes; returns every rank's JSON report, or fails with their output."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if scenario != "nccl":  # the CPU scenarios run Triton under its interpreter; NCCL runs it on the GPU
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), scenario, str(r), str(world), str(port),
                                   os.path.join(tmp, f"rank{r}.json")],
                                  stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=HERE)
                 for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = [r for r, p in enumerate(procs) if p.poll() is None]
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if timed_out or failed:
            detail = "\n".join(f"--- rank {r} (rc {procs[r].returncode}) ---\n{outputs[r][-4000:]}" for r in range(world))
            pytest.fail(f"{scenario} on {world} processes: timed out {timed_out}, failed {failed}\n{detail}")
        reports = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                reports.append(json.load(f))
    return reports


@pytest.mark.parametrize("world", [2, 4])
def test_ops_match_single_device(world):
    reports = _spawn("ops", world)
    checked = reports[0]["checked"]
    assert checked >= 60, checked   # outputs, final states and gradients of every case
    for rep in reports:
        assert rep["checked"] == checked
        assert rep["worst"] <= 1.0, rep  # every error / its tolerance


@pytest.mark.parametrize("world", [2, 4])
def test_selective_and_reverse_final_states(world):
    reports = _spawn("selective", world)
    checked = reports[0]["checked"]
    assert checked >= 100, checked   # outputs, final states and the gradients of all nine inputs, per case
    for rep in reports:
        assert rep["checked"] == checked
        assert rep["worst"] <= 1.0, rep


def test_bad_input_raises_on_every_rank():
    reports = _spawn("bad", 2)
    for rep in reports:
        assert rep["raised"] == rep["cases"] and rep["cases"] >= 6, rep


@pytest.mark.parametrize("world", [2, 4])
def test_layers_with_and_without_group(world):
    reports = _spawn("layers", world)
    for rep in reports:
        assert rep["layers"] == ["LRU", "RGLRU", "DeltaProduct", "BlockDiagonalRNN", "Mamba"], rep
        assert rep["worst"] <= 1.0, rep


def test_ddp_and_fsdp2_step_equals_single_process():
    reports = _spawn("data_parallel", 2)
    for rep in reports:
        assert rep["ddp"] == rep["fsdp"] == 5, rep
        assert rep["worst"] <= 1.0, rep


def test_nccl_on_cuda():
    """The ops through NCCL on CUDA tensors (backend="auto": Triton / CUDA kernels), on as many
    GPUs as there are up to 2; one GPU still runs every collective through a one-rank NCCL group."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (NCCL)")
    world = min(torch.cuda.device_count(), 2)
    reports = _spawn("nccl", world)
    for rep in reports:
        assert rep["checked"] >= 60 and rep["worst"] <= 1.0, rep


def test_triton_interpreter_backend():
    pytest.importorskip("triton")
    reports = _spawn("triton", 2)
    for rep in reports:
        assert rep["checked"] >= 5 and rep["worst"] <= 1.0, rep


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------
class _Checker:
    """Collects relative-RMS errors against their tolerances; fails at the end with every violation."""

    def __init__(self):
        self.checked, self.worst, self.bad = 0, 0.0, []

    def close(self, name, actual, expected, tol):
        import torch
        actual, expected = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64), \
            expected.detach().to(torch.complex128 if expected.is_complex() else torch.float64)
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        denom = expected.abs().pow(2).sum().sqrt().item()
        err = (actual - expected).abs().pow(2).sum().sqrt().item() / max(denom, 1e-30)
        if not torch.isfinite(actual).all() or not err <= tol:
            self.bad.append(f"{name}: rel_rms {err:.3g} > {tol}")
        self.checked += 1
        self.worst = max(self.worst, err / tol if err == err else float("inf"))

    def finish(self):
        assert not self.bad, "\n".join(self.bad)


def _slices(T, world, rank, lengths):
    start = sum(lengths[:rank])
    return start, start + lengths[rank]


LENGTHS = {1: [13], 2: [7, 6], 4: [4, 0, 3, 6]}           # T = 13: not divisible, an empty slice, spans of 3 ranks
CU = [0, 2, 2, 10, 13]                             # an empty sequence; [2, 10) spans ranks 0, 2, 3 of 4


def _compare_op(chk, name, single, dist_fn, inputs, time_axis, replicated, lengths, rank, world, tol,
                final_weights=None):
    """Runs the single-device ``single(*inputs)`` on the whole sequence and ``dist_fn(*slices)`` on this
    rank's slice; compares outputs, final state (if any) and every gradient.

    inputs: list of tensors (or None); time_axis[i]: the time axis of input i (None: same on every
    rank). The loss is <out, g> (+ <final, sum_r w_r> single-device, <final, w_rank> per rank).
    """
    import torch
    import torch.distributed as dist
    start, end = _slices(None, world, rank, lengths)
    gen = torch.Generator().manual_seed(1234)
    full = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex())
            for t in inputs]
    out = single(*full)
    o, fin = out if isinstance(out, tuple) else (out, None)
    g = torch.randn(o.shape, generator=gen, dtype=torch.float64, device="cpu").to(o.device, o.dtype) \
        if not o.is_complex() else \
        torch.randn(o.shape, generator=gen, dtype=torch.complex128, device="cpu").to(o.device, o.dtype)
    loss = (o.float() * g.float()).sum() if not o.is_complex() else (o * g.conj()).real.sum()
    ws = None
    if fin is not None:
        ws = [torch.randn(fin.shape, generator=gen, dtype=torch.float32, device="cpu").to(fin.device)
              for _ in range(world)]
        loss = loss + (fin * sum(ws)).sum()
    loss.backward()

    local = []
    for t, ax in zip(inputs, time_axis):
        if t is None:
            local.append(None)
            continue
        piece = t.detach() if ax is None else t.detach().narrow(ax, start, end - start)
        local.append(piece.clone().requires_grad_(t.is_floating_point() or t.is_complex()))
    out_d = dist_fn(*local)
    o_d, fin_d = out_d if isinstance(out_d, tuple) else (out_d, None)
    g_d = g.narrow(1, start, end - start)
    loss_d = (o_d.float() * g_d.float()).sum() if not o_d.is_complex() else (o_d * g_d.conj()).real.sum()
    if fin_d is not None:
        loss_d = loss_d + (fin_d * ws[rank]).sum()
    loss_d.backward()

    chk.close(f"{name} out", o_d, o.narrow(1, start, end - start), tol)
    if fin is not None:
        chk.close(f"{name} final_state", fin_d, fin, tol)
    for i, (t, tl, ax) in enumerate(zip(full, local, time_axis)):
        if t is None or t.grad is None:
            continue
        gd = tl.grad if tl.grad is not None else torch.zeros_like(tl)
        if ax is None:      # the same input on every rank: the ranks' parts sum to the gradient
            gd = gd.clone()
            if gd.is_complex():
                gr = torch.view_as_real(gd).contiguous()
                dist.all_reduce(gr)
                gd = torch.view_as_complex(gr)
            else:
                dist.all_reduce(gd)
            chk.close(f"{name} grad[{i}] (summed)", gd, t.grad, tol)
        else:
            chk.close(f"{name} grad[{i}]", gd, t.grad.narrow(ax, start, end - start), tol)


def _scenario_ops(rank, world, backend="torch", quick=False):
    import torch
    import linrec
    import linrec.distributed as lrd
    chk = _Checker()
    lengths = LENGTHS[world]
    T = sum(lengths)
    torch.manual_seed(0)
    cu = torch.tensor(CU)
    N = len(CU) - 1
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]

    for dtype in dtypes:
        tol = TOL[str(dtype).replace("torch.", "")]
        B, D = 2, 3
        a = (torch.rand(B, T, D) * 1.6 - 0.8).to(dtype)
        x = torch.randn(B, T, D).to(dtype)
        h0 = torch.randn(B, D)
        for reverse in (False, True):
            _compare_op(chk, f"diagonal {dtype} reverse={reverse}",
                        lambda a, x, h: linrec.diagonal_scan(a, x, h, reverse=reverse, backend=backend),
                        lambda a, x, h: lrd.diagonal_scan(a, x, h, reverse=reverse, backend=backend),
                        [a, x, h0], [1, 1, None], None, lengths, rank, world, tol)
        if quick:
            break
        a_inv = torch.rand(D) * 0.9 + 0.05                                      # broadcast a: (D,)
        _compare_op(chk, f"diagonal {dtype} a=(D,)",
                    lambda a, x: linrec.diagonal_scan(a, x, backend=backend),
                    lambda a, x: lrd.diagonal_scan(a, x, backend=backend),
                    [a_inv, x], [None, 1], None, lengths, rank, world, tol)
        a_bt = (torch.rand(1, T, D) * 1.6 - 0.8).to(dtype)                       # broadcast over the batch
        _compare_op(chk, f"diagonal {dtype} a=(1,T,D)",
                    lambda a, x, h: linrec.diagonal_scan(a, x, h, backend=backend),
                    lambda a, x, h: lrd.diagonal_scan(a, x, h, backend=backend),
                    [a_bt, x, h0], [1, 1, None], None, lengths, rank, world, tol)
        for reverse in (False, True):
            _compare_op(chk, f"diagonal {dtype} varlen reverse={reverse}",
                        lambda a, x, h: linrec.diagonal_scan(a, x, h, reverse=reverse, cu_seqlens=cu, backend=backend),
                        lambda a, x, h: lrd.diagonal_scan(a, x, h, reverse=reverse, cu_seqlens=cu, backend=backend),
                        [a[:1], x[:1], torch.randn(N, D)], [1, 1, None], None, lengths, rank, world, tol)

        G, b = 2, 3
        A = (torch.randn(B, T, G, b, b) * 0.5).to(dtype)
        xb = torch.randn(B, T, G, b).to(dtype)
        hb = torch.randn(B, G, b)
        for reverse in (False, True):
            _compare_op(chk, f"block {dtype} reverse={reverse}",
                        lambda A, x, h: linrec.block_diagonal_scan(A, x, h, reverse=reverse, backend=backend),
                        lambda A, x, h: lrd.block_diagonal_scan(A, x, h, reverse=reverse, backend=backend),
                        [A, xb, hb], [1, 1, None], None, lengths, rank, world, tol)
        A_inv = torch.randn(G, b, b) * 0.4
        _compare_op(chk, f"block {dtype} A=(G,b,b)",
                    lambda A, x: linrec.block_diagonal_scan(A, x, backend=backend),
                    lambda A, x: lrd.block_diagonal_scan(A, x, backend=backend),
                    [A_inv, xb], [None, 1], None, lengths, rank, world, tol)
        _compare_op(chk, f"block {dtype} varlen reverse",
                    lambda A, x, h: linrec.block_diagonal_scan(A, x, h, reverse=True, cu_seqlens=cu, backend=backend),
                    lambda A, x, h: lrd.block_diagonal_scan(A, x, h, reverse=True, cu_seqlens=cu, backend=backend),
                    [A[:1], xb[:1], torch.randn(N, G, b)], [1, 1, None], None, lengths, rank, world, tol)
        _compare_op(chk, f"block {dtype} varlen",
                    lambda A, x: linrec.block_diagonal_scan(A, x, cu_seqlens=cu, backend=backend),
                    lambda A, x: lrd.block_diagonal_scan(A, x, cu_seqlens=cu, backend=backend),
                    [A[:1], xb[:1]], [1, 1], None, lengths, rank, world, tol)

        H, K, V, n = 2, 4, 3, 2
        q = torch.randn(B, T, H, K).to(dtype)
        k = torch.nn.functional.normalize(torch.randn(B, T, n, H, K), dim=-1).to(dtype)
        v = torch.randn(B, T, n, H, V).to(dtype)
        beta = torch.rand(B, T, n, H) * 2
        lg = -torch.rand(B, T, H) * 0.5
        S0 = torch.randn(B, H, K, V)
        _compare_op(chk, f"householder {dtype} n=2 gate h0",
                    lambda *t: linrec.householder_scan(*t, output_final_state=True, backend=backend),
                    lambda *t: lrd.householder_scan(*t, output_final_state=True, backend=backend),
                    [q, k, v, beta, lg, S0], [1, 1, 1, 1, 1, None], None, lengths, rank, world, tol)
        _compare_op(chk, f"householder {dtype} n=1 4-D no gate",
                    lambda q, k, v, b: linrec.householder_scan(q, k, v, b, backend=backend)[0],
                    lambda q, k, v, b: lrd.householder_scan(q, k, v, b, backend=backend)[0],
                    [q, k[:, :, 0], v[:, :, 0], beta[:, :, 0]], [1, 1, 1, 1], None, lengths, rank, world, tol)
        _compare_op(chk, f"householder {dtype} varlen",
                    lambda *t: linrec.householder_scan(*t, output_final_state=True, cu_seqlens=cu, backend=backend),
                    lambda *t: lrd.householder_scan(*t, output_final_state=True, cu_seqlens=cu, backend=backend),
                    [q[:1], k[:1], v[:1], beta[:1], lg[:1], torch.randn(N, H, K, V)], [1, 1, 1, 1, 1, None],
                    None, lengths, rank, world, tol)
    if not quick:  # complex LRU-style coefficients
        a_c = torch.polar(torch.rand(3) * 0.5 + 0.45, torch.rand(3) * 6.28)
        x_c = torch.randn(2, T, 3, dtype=torch.complex64)
        _compare_op(chk, "diagonal complex64 a=(D,)",
                    lambda a, x, h: linrec.diagonal_scan(a, x, h, backend=backend),
                    lambda a, x, h: lrd.diagonal_scan(a, x, h, backend=backend),
                    [a_c, x_c, torch.randn(2, 3, dtype=torch.complex64)], [None, 1, None], None,
                    lengths, rank, world, TOL["complex64"])
    chk.finish()
    return {"checked": chk.checked, "worst": chk.worst}


def _scenario_nccl(rank, world):
    """The ops scenario (every family, fp32 and bf16) on CUDA tensors through an NCCL group."""
    import torch
    torch.set_default_device(f"cuda:{rank}")
    return _scenario_ops(rank, world, backend="auto")


def _first_states(h, cu, h0):
    """A reverse scan's final states from its states h (B, T, *S): h[:, 0], or per packed sequence
    its first position's state (h0[n] for an empty sequence)."""
    import torch
    if cu is None:
        return h[:, 0]
    c = cu.tolist()
    return torch.stack([h0[n].to(h.dtype) if c[n] == c[n + 1] else h[0, c[n]] for n in range(len(c) - 1)])


def _scenario_selective(rank, world):
    """The selective scan (forward, reverse, negative eigenvalues, grouped B / C, varlen spanning
    ranks, an empty slice, bf16) and the final states of reverse diagonal / block-diagonal scans."""
    import torch
    import torch.distributed as dist
    import linrec
    import linrec.distributed as lrd
    chk = _Checker()
    lengths = LENGTHS[world]
    T = sum(lengths)
    cu = torch.tensor(CU)
    Nq = len(CU) - 1
    be = "torch"
    torch.manual_seed(1)
    Bsz, D, N = 2, 4, 3
    x = torch.randn(Bsz, T, D)
    delta = torch.randn(Bsz, T, D) * 0.5
    A = -torch.rand(D, N) * 2 - 0.1
    Bm, Cm = torch.randn(Bsz, T, N), torch.randn(Bsz, T, N)
    Bg, Cg = torch.randn(Bsz, T, 2, N), torch.randn(Bsz, T, 2, N)                # G = 2 groups of channels
    Dskip, z, bias = torch.randn(D), torch.randn(Bsz, T, D), torch.randn(D) * 0.3
    h0 = torch.randn(Bsz, D, N)
    axes = [1, 1, None, 1, 1, None, 1, None, None]          # x, delta, A, B, C, D, z, delta_bias, initial_state

    def case(name, inputs, lens=lengths, tol=TOL["float32"], **kw):
        def single(x, delta, A, B, C, D, z, bias, h):
            return linrec.selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, initial_state=h, backend=be, **kw)

        def distributed(x, delta, A, B, C, D, z, bias, h):
            return lrd.selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, initial_state=h, backend=be, **kw)
        _compare_op(chk, f"selective {name}", single, distributed, inputs, axes, None, lens, rank, world, tol)

    full = [x, delta, A, Bm, Cm, Dskip, z, bias, h0]
    for reverse in (False, True):
        for neg in (False, True):
            case(f"reverse={reverse} neg={neg}", full, delta_softplus=True, output_final_state=True,
                 reverse=reverse, negative_eigenvalues=neg)
    case("grouped B, C, no D / z / bias / h0", [x, delta.abs(), A, Bg, Cg, None, None, None, None],
         output_final_state=True)
    packed = [x[:1], delta[:1], A, Bm[:1], Cm[:1], Dskip, z[:1], bias, torch.randn(Nq, D, N)]
    for reverse in (False, True):
        case(f"varlen reverse={reverse}", packed, delta_softplus=True, output_final_state=True, reverse=reverse,
             negative_eigenvalues=reverse, cu_seqlens=cu)
    empty_last = [T] + [0] * (world - 1)                     # every rank but rank 0 holds nothing
    case("all of time on rank 0", full, lens=empty_last, delta_softplus=True, output_final_state=True)
    case("bf16", [t if t is None or i in (2, 8) else t.to(torch.bfloat16) for i, t in enumerate(full)],
         tol=TOL["bfloat16"], delta_softplus=True, output_final_state=True)

    # The final state of a reverse scan (the state at t = 0), as the layers' private entry points return it.
    group = dist.group.WORLD
    a = torch.rand(Bsz, T, D) * 1.6 - 0.8
    xd = torch.randn(Bsz, T, D)
    Ab, xb = torch.randn(Bsz, T, 2, 3, 3) * 0.5, torch.randn(Bsz, T, 2, 3)
    for packed_case in (False, True):
        c = cu if packed_case else None
        rows = slice(0, 1) if packed_case else slice(None)
        hd = torch.randn(Nq if packed_case else Bsz, D)
        _compare_op(chk, f"diagonal reverse final packed={packed_case}",
                    lambda a, x, h: (lambda o: (o, _first_states(o, c, h)))(
                        linrec.diagonal_scan(a, x, h, reverse=True, cu_seqlens=c, backend=be)),
                    lambda a, x, h: lrd._diagonal(a, x, h, group, True, c, be, True),
                    [a[rows], xd[rows], hd], [1, 1, None], None, lengths, rank, world, TOL["float32"])
        hb = torch.randn(Nq if packed_case else Bsz, 2, 3)
        _compare_op(chk, f"block reverse final packed={packed_case}",
                    lambda A, x, h: (lambda o: (o, _first_states(o, c, h)))(
                        linrec.block_diagonal_scan(A, x, h, reverse=True, cu_seqlens=c, backend=be)),
                    lambda A, x, h: lrd._block_diagonal(A, x, h, group, True, c, be, True),
                    [Ab[rows], xb[rows], hb], [1, 1, None], None, lengths, rank, world, TOL["float32"])
    chk.finish()
    return {"checked": chk.checked, "worst": chk.worst}


def _scenario_triton(rank, world):
    import torch
    import linrec
    import linrec.distributed as lrd
    report = _scenario_ops(rank, world, backend="triton", quick=True)
    # The selective scan's Triton kernels: forward, reverse with negative eigenvalues (the summary's
    # product then comes from the kernels too), final states.
    chk = _Checker()
    lengths = LENGTHS[world]
    T = sum(lengths)
    torch.manual_seed(2)
    D, N = 4, 8
    inputs = [torch.randn(1, T, D), torch.randn(1, T, D) * 0.5, -torch.rand(D, N) - 0.1, torch.randn(1, T, N),
              torch.randn(1, T, N), torch.randn(D), torch.randn(1, D, N)]
    for reverse in (False, True):
        kw = dict(delta_softplus=True, output_final_state=True, reverse=reverse, negative_eigenvalues=reverse,
                  backend="triton")
        _compare_op(chk, f"selective triton reverse={reverse}",
                    lambda x, dl, A, B, C, Dk, h: linrec.selective_scan(x, dl, A, B, C, Dk, initial_state=h, **kw),
                    lambda x, dl, A, B, C, Dk, h: lrd.selective_scan(x, dl, A, B, C, Dk, initial_state=h, **kw),
                    inputs, [1, 1, None, 1, 1, None, None], None, lengths, rank, world, TOL["float32"])
    chk.finish()
    return {"checked": report["checked"] + chk.checked, "worst": max(report["worst"], chk.worst)}


def _scenario_bad(rank, world):
    import torch
    import linrec.distributed as lrd
    T = 4
    cases = []
    x = torch.randn(2, T, 3)
    a = torch.rand(2, T, 3)
    cases.append(("D differs", lambda: lrd.diagonal_scan(a[..., :2], x[..., :2]) if rank == 1
                  else lrd.diagonal_scan(a, x)))
    cases.append(("B differs", lambda: lrd.diagonal_scan(a[:1], x[:1]) if rank == 1 else lrd.diagonal_scan(a, x)))
    cu_good = torch.tensor([0, 3, 2 * T])
    cu_other = torch.tensor([0, 5, 2 * T])
    cases.append(("cu_seqlens differ", lambda: lrd.diagonal_scan(a[:1], x[:1], cu_seqlens=cu_other if rank else cu_good)))
    cases.append(("cu_seqlens end", lambda: lrd.diagonal_scan(a[:1], x[:1], cu_seqlens=torch.tensor([0, 3, 2 * T + 1]))))
    cases.append(("dtype on one rank", lambda: lrd.diagonal_scan(a, x.to(torch.int32) if rank == 1 else x)))
    q = torch.randn(1, T, 2, 4)
    kk = torch.randn(1, T, 2, 4)
    v = torch.randn(1, T, 2, 3)
    bt = torch.rand(1, T, 2)
    cases.append(("K differs", lambda: lrd.householder_scan(q[..., :2], kk[..., :2], v, bt) if rank == 1
                  else lrd.householder_scan(q, kk, v, bt)))
    cases.append(("H differs", lambda: lrd.householder_scan(q[:, :, :1], kk[:, :, :1], v[:, :, :1], bt[..., :1])
                  if rank == 1 else lrd.householder_scan(q, kk, v, bt)))
    xb = torch.randn(2, T, 2, 3)
    Ab = torch.randn(2, T, 2, 3, 3)
    cases.append(("block b differs", lambda: lrd.block_diagonal_scan(Ab[..., :2, :2], xb[..., :2]) if rank == 1
                  else lrd.block_diagonal_scan(Ab, xb)))
    xs, dl = torch.randn(1, T, 3), torch.rand(1, T, 3)
    As, Bs = -torch.rand(3, 2), torch.randn(1, T, 2)
    cases.append(("selective N differs", lambda: lrd.selective_scan(xs, dl, As[:, :1], Bs[..., :1], Bs[..., :1])
                  if rank == 1 else lrd.selective_scan(xs, dl, As, Bs, Bs)))
    cases.append(("selective z on one rank", lambda: lrd.selective_scan(xs, dl, As, Bs, Bs, z=xs if rank else None)))
    cases.append(("selective delta length", lambda: lrd.selective_scan(xs, dl[:, :T - rank], As, Bs, Bs)))
    raised = 0
    for name, fn in cases:
        try:
            fn()
        except (ValueError, TypeError) as e:
            raised += 1
            print(f"rank {rank} {name}: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"rank {rank} {name}: no error", flush=True)
    # The group is still in step: a good call afterwards works.
    h = lrd.diagonal_scan(a, x)
    assert h.shape == x.shape
    return {"raised": raised, "cases": len(cases)}


def _layer_models(seed):
    import torch
    from linrec import nn as lnn
    torch.manual_seed(seed)
    return [
        lnn.LRU(8, 6, backend="torch"),
        lnn.RGLRU(8, 8, conv_size=4, backend="torch"),
        lnn.DeltaProduct(8, num_heads=2, num_householder=2, conv_size=3, backend="torch"),
        lnn.BlockDiagonalRNN(8, block_size=2, num_blocks=3, backend="torch"),
        lnn.Mamba(8, d_state=4, d_conv=3, expand=2, negative_eigenvalues=True, backend="torch"),
    ]


def _scenario_layers(rank, world):
    import copy
    import torch
    import torch.distributed as dist
    chk = _Checker()
    lengths = LENGTHS[world]
    T = sum(lengths)
    start, end = _slices(T, world, rank, lengths)
    cu = torch.tensor(CU)
    names = []
    for model in _layer_models(0):
        name = type(model).__name__
        names.append(name)
        twin = copy.deepcopy(model)
        for packed in (False, True):
            torch.manual_seed(5)
            B = 1 if packed else 2
            x = torch.randn(B, T, 8)
            kw = {"cu_seqlens": cu} if packed else {}
            # Without a group: the plain call.
            y_plain = model(x, **kw)
            y_none = model(x, group=None, **kw)
            chk.close(f"{name} group=None", y_none, y_plain, 0.0 + 1e-12)
            # With a group: the slice; its output, final state, input gradient and summed parameter gradients.
            xf = x.clone().requires_grad_(True)
            y, st = model(xf, return_state=True, **kw)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
            flat = [t for t in _flatten(st)]
            ws = [torch.randn(t.shape, generator=torch.Generator().manual_seed(11 + i)) for i, t in enumerate(flat)]
            loss = (y * g).sum() + sum((t.float() * w).sum() for t, w in zip(flat, ws))
            model.zero_grad()
            loss.backward()
            xs = x[:, start:end].clone().requires_grad_(True)
            y_d, st_d = twin(xs, return_state=True, group=dist.group.WORLD, **kw)
            flat_d = [t for t in _flatten(st_d)]
            # The final state is used in one rank's loss only (rank 0): the others backpropagate y alone.
            loss_d = (y_d * g[:, start:end]).sum()
            if rank == 0:
                loss_d = loss_d + sum((t.float() * w).sum() for t, w in zip(flat_d, ws))
            twin.zero_grad()
            loss_d.backward()
            tag = f"{name} packed={packed}"
            chk.close(f"{tag} y", y_d, y[:, start:end], 1e-5)
            for i, (t, td) in enumerate(zip(flat, flat_d)):
                chk.close(f"{tag} state[{i}]", td, t, 1e-5)
            dx = xs.grad if xs.grad is not None else torch.zeros_like(xs)   # an empty slice: no gradient
            chk.close(f"{tag} dx", dx, xf.grad[:, start:end], 1e-5)
            for (pn, p), pd in zip(model.named_parameters(), twin.parameters()):
                gd = pd.grad.clone() if pd.grad is not None else torch.zeros_like(pd)
                dist.all_reduce(gd)
                chk.close(f"{tag} d{pn}", gd, p.grad if p.grad is not None else torch.zeros_like(p), 1e-5)
    chk.finish()
    return {"layers": names, "worst": chk.worst}


def _flatten(state):
    import torch
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [torch.view_as_real(state) if state.is_complex() else state]
    return [t for s in state for t in _flatten(s)]


def _scenario_data_parallel(rank, world):
    import copy
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    chk = _Checker()
    B, T = 4, 6
    torch.manual_seed(3)
    x = torch.randn(B, T, 8)
    target = torch.randn(B, T, 8)
    per = B // world
    mesh = init_device_mesh("cpu", (world,))
    counts = {"ddp": 0, "fsdp": 0}
    for model in _layer_models(1):
        name = type(model).__name__
        # One SGD step on one process with the whole batch.
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        torch.nn.functional.mse_loss(ref(x), target).backward()
        opt.step()
        expected = {n: p.detach().clone() for n, p in ref.named_parameters()}
        mine = slice(rank * per, (rank + 1) * per)
        for kind in ("ddp", "fsdp"):
            m = copy.deepcopy(model)
            if kind == "ddp":
                wrapped = DDP(m)
            else:
                fully_shard(m, mesh=mesh)
                wrapped = m
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            torch.nn.functional.mse_loss(wrapped(x[mine]), target[mine]).backward()
            opt.step()
            for n, p in m.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                chk.close(f"{name} {kind} {n}", full.detach(), expected[n], 1e-5)
            counts[kind] += 1
            dist.barrier()
    chk.finish()
    return {**counts, "worst": chk.worst}


def _worker_main(argv):
    scenario, rank, world, port, report = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    sys.path.insert(0, HERE)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    if scenario == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if scenario == "nccl" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[f"_scenario_{scenario}"](rank, world)
        with open(report, "w") as f:
            json.dump(result, f)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)   # do not wait in the group's teardown for ranks that may be stuck
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
