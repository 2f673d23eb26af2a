"""LINREC_<FAMILY>_CONFIG: launch settings (tiles, warps) set from the environment for GPU tuning.

The settings change how the work is cut, never the result: each op run through its Triton
kernels with an override still matches the torch backend (here under the interpreter).
"""

import pytest
import torch

import linrec
from linrec.kernels import config_override, config_overrides_in_use

from conftest import DEVICE


def _diagonal(backend):
    torch.manual_seed(0)
    a, x = torch.rand(2, 37, 24, device=DEVICE), torch.randn(2, 37, 24, device=DEVICE)
    return linrec.diagonal_scan(a, x, backend=backend)


def _householder(backend):
    torch.manual_seed(0)
    q = torch.randn(1, 20, 2, 40, device=DEVICE)
    k = torch.nn.functional.normalize(torch.randn(1, 20, 2, 2, 40, device=DEVICE), dim=-1)
    v, beta = torch.randn(1, 20, 2, 2, 24, device=DEVICE), torch.rand(1, 20, 2, 2, device=DEVICE) * 2
    return linrec.householder_scan(q, k, v, beta, backend=backend)[0]


def _block_diagonal(backend):
    torch.manual_seed(0)
    A, x = torch.rand(2, 30, 6, 2, 2, device=DEVICE) * 0.5, torch.randn(2, 30, 6, 2, device=DEVICE)
    return linrec.block_diagonal_scan(A, x, backend=backend)


CASES = {
    "DIAGONAL": (_diagonal, "BLOCK_T=8,BLOCK_D=32,num_warps=2"),
    "HOUSEHOLDER": (_householder, "BK=16,BV=16,num_warps=2"),
    "BLOCK_DIAGONAL": (_block_diagonal, "BLOCK_G=2,num_warps=2"),
}


def _launcher_config(family):
    """The settings each family's launcher would use here (interpreter) for the CASES shapes."""
    import linrec.kernels.block_diagonal as bd
    import linrec.kernels.diagonal as dg
    import linrec.kernels.householder as hh
    return {"DIAGONAL": lambda: dg._config(torch.float32, True, 24),
            "HOUSEHOLDER": lambda: hh._config(2, 40, 24, torch.float32, True),
            "BLOCK_DIAGONAL": lambda: bd._config(2, True)}[family]()


@pytest.mark.parametrize("family", CASES)
def test_overridden_launch_settings_give_the_same_result(family, monkeypatch):
    run, setting = CASES[family]
    expected = run("torch")
    monkeypatch.setenv(f"LINREC_{family}_CONFIG", setting)
    assert f"LINREC_{family}_CONFIG={setting}" in config_overrides_in_use()
    cfg = _launcher_config(family)
    assert all(cfg[key] == int(value) for key, value in (item.split("=") for item in setting.split(",")))
    torch.testing.assert_close(run("triton"), expected, atol=1e-5, rtol=1e-5)


def test_override_replaces_only_the_named_tunable_settings(monkeypatch):
    cfg = dict(BLOCK_T=32, BLOCK_D=64, num_warps=4)
    assert config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps")) == cfg
    monkeypatch.setenv("LINREC_DIAGONAL_CONFIG", " BLOCK_T = 16 , num_warps=8")
    assert config_override("diagonal", cfg, ("BLOCK_T", "BLOCK_D", "num_warps")) == \
        dict(BLOCK_T=16, BLOCK_D=64, num_warps=8)
    assert cfg == dict(BLOCK_T=32, BLOCK_D=64, num_warps=4)          # the launcher's dict is not modified


@pytest.mark.parametrize("text", ["BLOCK_X=16", "num_warps", "CT=8"])
def test_bad_override_names_the_variable(text, monkeypatch):
    monkeypatch.setenv("LINREC_HOUSEHOLDER_CONFIG", text)
    with pytest.raises(ValueError, match="LINREC_HOUSEHOLDER_CONFIG"):
        config_override("householder", dict(CT=64, BK=32, BV=32, num_warps=8), ("BK", "BV", "num_warps"))


def test_householder_override_keeps_the_chunk_state_blocks(monkeypatch):
    """The chunk-local backward reads the chunk states in the blocks of BVS columns the state passes
    write: an override that makes its V blocks (BV) differ is refused, naming both."""
    pytest.importorskip("triton")
    from linrec.kernels.householder import _config

    assert _config(1, 128, 128, torch.bfloat16, interpret=True)["BV"] == 16
    for text in ("BV=32", "BVS=32"):
        monkeypatch.setenv("LINREC_HOUSEHOLDER_CONFIG", text)
        with pytest.raises(ValueError, match="BV .* BVS"):
            _config(1, 128, 128, torch.bfloat16, interpret=True)
    monkeypatch.setenv("LINREC_HOUSEHOLDER_CONFIG", "BV=32,BVS=32")
    assert _config(1, 128, 128, torch.bfloat16, interpret=True)["BVS"] == 32


# ---------------------------------------------------------------------------------------------
# LINREC_DEVICE_MODEL: the interpreter runs the launch plan of a named GPU
# ---------------------------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from linrec.kernels import DEVICE_MODELS, device_model  # noqa: E402


def _fake_cuda_properties(sm_count, smem_per_block, smem_per_sm, capability):
    """What torch.cuda.get_device_properties reports for such a GPU."""
    return SimpleNamespace(name="fake GPU", multi_processor_count=sm_count, shared_memory_per_block_optin=smem_per_block,
                           shared_memory_per_multiprocessor=smem_per_sm, L2_cache_size=50 * 2**20,
                           major=capability[0], minor=capability[1])


@pytest.mark.parametrize("name", ["h100", "h200", "H100 "])
def test_device_model_names_a_gpu(name, monkeypatch):
    monkeypatch.setenv("LINREC_DEVICE_MODEL", name)
    model = device_model(torch.device("cpu"))
    assert model == DEVICE_MODELS[name.strip().lower()]
    assert (model.sm_count, model.smem_per_block, model.capability) == (132, 227 * 1024, (9, 0))


def test_device_model_unset_or_unknown(monkeypatch):
    monkeypatch.delenv("LINREC_DEVICE_MODEL", raising=False)
    if DEVICE == "cpu":
        assert device_model(torch.device("cpu")) is None and device_model() is None
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h900")
    with pytest.raises(ValueError, match="LINREC_DEVICE_MODEL='h900'.*h100"):
        device_model()


@pytest.mark.parametrize("name", ["h100", "a100"])
def test_model_plans_as_a_gpu_with_those_properties(name, monkeypatch):
    """The plan a CUDA device with the model's properties gets (its properties faked) is the plan
    the model gives: tiles and warps (the GPU configs compiled ahead of time) and chunk counts."""
    import linrec.kernels.diagonal as dg
    auto = dg._auto_num_chunks  # time split of a sequence
    spec = DEVICE_MODELS[name]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _fake_cuda_properties(
        spec.sm_count, spec.smem_per_block, spec.smem_per_sm, spec.capability))
    on_gpu = device_model(torch.device("cuda"))
    monkeypatch.setenv("LINREC_DEVICE_MODEL", name)
    modelled = device_model(torch.device("cpu"))
    assert (on_gpu.sm_count, on_gpu.smem_per_block, on_gpu.smem_per_sm, on_gpu.capability) == \
        (modelled.sm_count, modelled.smem_per_block, modelled.smem_per_sm, modelled.capability)
    for dtype in (torch.float32, torch.bfloat16, torch.complex64):
        cfg = dg._config(dtype, False, 1024)
        for N, D, T in ((8, 1024, 8192), (1, 64, 65536), (4, 4096, 2048), (2, 64, 100)):
            assert auto(N, D, T, None, cfg, modelled) == \
                auto(N, D, T, None, cfg, on_gpu)
    if name == "h100":  # the GPU goals' shapes: 128 fp32 (64 bf16) programs < 4 x 132 -> 128-step chunks
        assert auto(8, 1024, 8192, None, dg._config(torch.float32, False), modelled) == 64
        assert auto(8, 1024, 8192, None, dg._config(torch.bfloat16, False), modelled) == 64
        assert auto(1, 64, 65536, None, dg._config(torch.float32, False), modelled) == 512
        assert auto(1, 64, 65536, None, dg._config(torch.complex64, False), modelled) == 1024  # 64-step chunks
        assert auto(64, 4096, 8192, None, dg._config(torch.float32, False), modelled) == 1  # 4096 programs walk
    assert auto(1, 64, 65536, None, dg._config(torch.float32, True), None) == 1


def _traffic_module():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bench.traffic
    return bench.traffic


def _fast_scan():
    """The interpreter's associative_scan run a row at a time (the same sequential fold, same results):
    GPU tiles (32 x 64) cost the element-by-element interpreter scan seconds each."""
    import contextlib
    return _traffic_module().rowwise_interpreter_scan() if DEVICE == "cpu" else contextlib.nullcontext()


def _launches(run):
    """(kernel name, grid, launch keywords) of every kernel launch of ``run()``, under the interpreter."""
    traffic, result = _traffic_module().measure(run)
    return [(launch.kernel, launch.grid, launch.meta) for launch in traffic.launches], result


needs_interpreter = pytest.mark.skipif(DEVICE != "cpu", reason="launch plans are observed under the interpreter")


def _plan_for(model, monkeypatch):
    """Launchers plan for GPU ``model`` (None: the interpreter's own plan); seeds the inputs."""
    if model:
        monkeypatch.setenv("LINREC_DEVICE_MODEL", model)
    else:
        monkeypatch.delenv("LINREC_DEVICE_MODEL", raising=False)
    torch.manual_seed(0)


@needs_interpreter
@pytest.mark.parametrize("model", [None, "h100", "h200"])
def test_diagonal_launch_plan(model, monkeypatch):
    _plan_for(model, monkeypatch)
    a, x = torch.rand(1, 600, 40) * 0.5 + 0.5, torch.randn(1, 600, 40)
    launches, h = _launches(lambda: linrec.diagonal_scan(a, x, backend="triton"))
    torch.testing.assert_close(h, linrec.diagonal_scan(a, x, backend="torch"), atol=1e-5, rtol=1e-5)
    if model is None:  # the interpreter's plan: 16 x 16 tiles, one program per channel block, one pass
        assert [(grid, meta["BLOCK_T"], meta["BLOCK_D"]) for _, grid, meta in launches] == [((3, 1, 1), 16, 16)]
    else:  # as on an H100/H200: 1 sequence x 3 channel blocks < 4 x 132 programs, so one launch of
        # 3 x cdiv(600, 128) = 15 one-tile chunks (128 x 16, 4 warps) joined by look-back
        assert [(grid, meta["BLOCK_T"], meta["BLOCK_D"], meta["num_warps"], meta["LOOKBACK"])
                for _, grid, meta in launches] == [((15, 1, 1), 128, 16, 4, True)]


@needs_interpreter
@pytest.mark.parametrize("model", [None, "h100"])
def test_block_diagonal_launch_plan(model, monkeypatch):
    _plan_for(model, monkeypatch)
    A, x = torch.rand(1, 200, 8, 4, 4) * 0.4, torch.randn(1, 200, 8, 4)
    launches, h = _launches(lambda: linrec.block_diagonal_scan(A, x, backend="triton"))
    torch.testing.assert_close(h, linrec.block_diagonal_scan(A, x, backend="torch"), atol=1e-5, rtol=1e-5)
    plan = [(name, grid, meta.get("BLOCK_G"), meta.get("BS"), meta.get("num_warps")) for name, grid, meta in launches]
    if model is None:  # the interpreter's plan: all 8 blocks in one program, one sequential sweep
        assert plan == [("block_diagonal_scan_kernel", (1, 1, 1), 8, 4, 1)]
    else:  # as on an H100: 16 blocks of 4 x 4 per program (here 8) on 2 warps; 1 program < 4 x 132 ->
        # cdiv(200, 32) = 7 chunks of 32 steps, one program each, joined by look-back in the same launch
        assert plan == [("block_diagonal_scan_kernel", (7, 1, 1), 8, 4, 2)]


@pytest.mark.parametrize("b", [1, 2, 4, 8, 16])
def test_block_diagonal_target_plans_fill_the_gpu(b):
    """At the GPU targets (B = 8, T = 4096, G * b = 256) the H100 plan is one launch of look-back
    chunks with at least one program per SM; the words bench.traffic prints say so."""
    from linrec.kernels import DEVICE_MODELS
    from linrec.kernels.block_diagonal import _plan, plan_description

    model = DEVICE_MODELS["h100"]
    G = 256 // b
    cfg, BLOCK_G, n_groups, S, steps = _plan(8, 4096, G, b, model)
    programs = 8 * n_groups * S
    assert programs >= model.sm_count and S > 1 and S * steps >= 4096
    assert plan_description(8, 4096, G, b, model) == f"{programs} programs ({8 * n_groups} x {S} time chunks), one pass"
    # The interpreter's own plan walks every sequence in one program per block group.
    walk = plan_description(8, 4096, G, b, None)
    assert walk.endswith(" programs, one pass") and "chunks" not in walk


@pytest.mark.parametrize("b", [17, 32, 33, 64])
def test_block_diagonal_large_blocks_walk_without_lookback_code(b):
    """At b > 16 (BLOCK_B 32, 64) the H100 plan compiles the kernel without its look-back code and
    walks every (sequence, block) in one program however few there are (B x G programs at the
    targets' B = 8, G * b = 256); a forced chunk length still plans chunks (tests)."""
    from linrec.kernels import DEVICE_MODELS
    from linrec.kernels.block_diagonal import _config, _plan, plan_description

    model = DEVICE_MODELS["h100"]
    G = 256 // b
    cfg, BLOCK_G, n_groups, S, steps = _plan(8, 4096, G, b, model)
    assert not cfg["LOOKBACK"] and BLOCK_G == 1 and S == 1 and steps == 4096
    assert plan_description(8, 4096, G, b, model) == f"{8 * G} programs, one pass"
    assert _plan(8, 4096, G, b, model, chunk_len=64)[3] == 64
    assert _config(16, False)["LOOKBACK"]  # b <= 16 keeps the look-back plan (see the test above)


@needs_interpreter
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_block_diagonal_lookback_plan_measures_its_minimum(mode, b, monkeypatch):
    """The H100 plan at a small shape: one launch of look-back chunks; A and x (backward: A, h and
    dL/dh) read once, h (dL/dx, dL/dA) written once; the published inclusive states, the flags and
    the ticket add under 5%."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    bench_traffic = _traffic_module()
    row = bench_traffic.run_case(bench_traffic.Case("block_diagonal", mode, "fp32", dict(B=1, T=128, G=32 // b, b=b)))
    chunks = 128 // 32  # 32-step chunks; b = 16: one block per program, so 2 block groups
    assert row["launches"] == 1 and row["programs"] == chunks * (2 if b == 16 else 1), row["grids"]
    assert row["min_bytes"] < row["measured_bytes"] < 1.05 * row["min_bytes"], row["detail"]
    assert "ws_ptr" in row["detail"]  # the chunks' inclusive states


def _diagonal_case(dtype, reverse, varlen, broadcast):
    torch.manual_seed(0)
    B, T, D = (1, 600, 6) if varlen else (2, 600, 6)
    x = torch.randn(B, T, D, dtype=dtype)
    shape = (D,) if broadcast else (B, T, D)
    a = (torch.polar(0.6 + 0.4 * torch.rand(shape), torch.rand(shape)) if dtype.is_complex
         else (0.6 + 0.4 * torch.rand(shape)).to(dtype))
    h0 = torch.randn(3 if varlen else B, D, dtype=dtype)
    cu = torch.tensor([0, 290, 300, 600]) if varlen else None
    leaves = [t.requires_grad_() for t in (a, x, h0)]
    return leaves, dict(reverse=reverse, cu_seqlens=cu)


@pytest.mark.parametrize("dtype,reverse,varlen,broadcast", [
    (torch.float32, False, False, False), (torch.float32, True, True, False), (torch.complex64, False, False, False),
    (torch.complex64, True, False, True), (torch.bfloat16, False, True, False)])
def test_diagonal_results_hold_under_the_gpu_plan(dtype, reverse, varlen, broadcast, monkeypatch):
    """Chunked (5 chunks of 128 steps joined by look-back), as the H100 plan runs it: forward and
    gradients match the torch backend."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    (a, x, h0), kw = _diagonal_case(dtype, reverse, varlen, broadcast)
    results = []
    for backend in ("triton", "torch"):
        with _fast_scan():
            h = linrec.diagonal_scan(a, x, h0, backend=backend, **kw)
            weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
            grads = torch.autograd.grad((h * weights).real.sum(), (a, x, h0))
        results.append((h, *grads))
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("b,reverse,varlen", [(2, False, False), (4, True, True), (16, False, False),
                                               (64, True, False)])
def test_block_diagonal_results_hold_under_the_gpu_plan(b, reverse, varlen, monkeypatch):
    """As the H100 plan runs it: look-back chunks at b <= 16; at b = 64 one walk per (sequence,
    block), compiled without the look-back code, prefetching one step, dL/dx stored 4 steps at a time."""
    monkeypatch.setenv("LINREC_DEVICE_MODEL", "h100")
    torch.manual_seed(0)
    B, T, G = (1, 200, 2) if varlen else (2, 150, 2)
    A = (torch.randn(B, T, G, b, b) * (0.5 / b ** 0.5)).requires_grad_()
    x = torch.randn(B, T, G, b, requires_grad=True)
    h0 = torch.randn(2 if varlen else B, G, b, requires_grad=True)
    cu = torch.tensor([0, 130, 200]) if varlen else None
    results = []
    for backend in ("triton", "torch"):
        with _fast_scan():
            h = linrec.block_diagonal_scan(A, x, h0, reverse=reverse, cu_seqlens=cu, backend=backend)
            weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
            results.append((h, *torch.autograd.grad((h * weights).sum(), (A, x, h0))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("reverse,varlen,a_shape", [
    (False, False, "full"), (True, False, "full"), (False, True, "full"), (True, True, "(D,)"),
    (False, False, "(D,)"), (False, False, "(1, T, D)")])
def test_diagonal_forced_chunks_match_the_reference(dtype, reverse, varlen, a_shape):
    """A forced multi-chunk plan (look-back between 16-step chunks) against the float64 reference:
    states, dL/da (full-size in a's dtype, or per-program sums for an a broadcast over time),
    dL/dx and dL/dh0; the same launch with one chunk per sequence agrees too."""
    from linrec._common import sum_to_shape
    from linrec.diagonal.chunked import diagonal_scan_chunked_backward
    from linrec.diagonal.reference import diagonal_scan_reference
    from linrec.kernels.diagonal import diagonal_scan_backward, diagonal_scan_forward

    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 37, 100, 101, 170]) if varlen else None
    B, T, D = (1, 170, 5) if varlen else (2, 101, 5)
    N = 5 if varlen else B
    shape = {"full": (B, T, D), "(D,)": (D,), "(1, T, D)": (1, T, D)}[a_shape]
    if dtype.is_complex:
        a = torch.polar(0.6 + 0.4 * torch.rand(shape), torch.rand(shape))
    else:
        a = (0.6 + 0.4 * torch.rand(shape)).to(dtype)
    x, h0, g = (torch.randn(*s, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
                for s in ((B, T, D), (N, D), (B, T, D)))
    wide = torch.complex128 if dtype.is_complex else torch.float64
    a64, x64, h064, g64 = (t.to(wide) for t in (a, x, h0, g))
    ref = diagonal_scan_reference(a64, x64, h064, cu_seqlens=cu, reverse=reverse)
    want = diagonal_scan_chunked_backward(a64.expand(B, T, D), ref, g64, h064, cu_seqlens=cu, reverse=reverse)
    want = (sum_to_shape(want[0], shape), *want[1:])
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    dev = [t.to(DEVICE) for t in (a, x, h0, g)]
    cu_dev = cu.to(DEVICE) if cu is not None else None
    results = {}
    for chunks in (1, 7):  # 7: cdiv(max length, 7) -> 16-step chunks, 7 (varlen: 5) per sequence
        with _fast_scan():
            h = diagonal_scan_forward(dev[0], dev[1], dev[2], cu_seqlens=cu_dev, reverse=reverse, num_chunks=chunks)
            grads = diagonal_scan_backward(dev[0], ref.to(dtype).to(DEVICE), dev[3], dev[2], cu_seqlens=cu_dev,
                                           reverse=reverse, x_dtype=dtype, num_chunks=chunks)
        grad_a = sum_to_shape(grads[0], shape)
        if a_shape == "full":  # written by the kernel in a's dtype, no fp32 buffer
            assert grads[0].dtype == a.dtype and grads[0].shape == (B, T, D)
        elif a_shape == "(D,)":  # summed per program over time, never a (B, T, D) buffer
            assert grads[0].shape[1] == 1
        assert grads[1].dtype == dtype
        got = (h, grad_a, grads[1], grads[2])
        for value, expect in zip(got, (ref, *want)):
            err = (value.cpu().to(wide) - expect).abs().max() / expect.abs().max()
            assert err < tol, (chunks, err)
        results[chunks] = got
    for one, many in zip(results[1], results[7]):
        torch.testing.assert_close(many, one, atol=tol, rtol=tol)
