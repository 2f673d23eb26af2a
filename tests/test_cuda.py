"""The CUDA backend (csrc/): compile checks everywhere, numerics where a GPU is present.

On machines without a GPU (CI), nvcc still compiles every ``csrc/*_kernel.cu`` for
sm_80 and sm_90a and ptxas must report no register spills; the loader and the
public op must refuse ``backend="cuda"`` with an error that says why. With a CUDA
device, the kernels are built through the real JIT path and checked against the
float64 reference, forward and backward, like tests/test_diagonal.py does.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linrec
from linrec import _cuda
from linrec.diagonal import diagonal_scan_reference

from conftest import HAS_CUDA, rel_rms

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL_FILES = sorted(CSRC.glob("*_kernel.cu"))
ARCHS = ["80", "90a"]
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)

CUDA_REASON = _cuda.cuda_backend_unavailable_reason() if HAS_CUDA else "no CUDA device"
needs_cuda_backend = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA backend unavailable: {CUDA_REASON}")


# --- compile checks (no GPU needed) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """Compiles every kernel file for every arch (in parallel) and returns {(file, arch): (rc, log)}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out_dir = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for src in KERNEL_FILES:
        for arch in ARCHS:
            obj = out_dir / f"{src.stem}_sm{arch}.o"
            cmd = [NVCC, *_cuda.nvcc_flags([arch]), "-Xptxas", "-v", "-I", str(CSRC), "-c", str(src), "-o", str(obj)]
            procs[(src.name, arch)] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True), obj)
    reports = {}
    for key, (proc, obj) in procs.items():
        log, _ = proc.communicate(timeout=300)
        reports[key] = (proc.returncode, log, obj)
    return reports


def test_kernel_files_exist():
    assert [p.name for p in KERNEL_FILES] == ["diagonal_scan_kernel.cu"]
    for name in _cuda.SOURCES + ("diagonal_scan.h",):
        assert (CSRC / name).is_file()


def test_kernel_files_have_no_torch_headers():
    for src in KERNEL_FILES:
        text = src.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), src.name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in KERNEL_FILES])
def test_nvcc_compiles_without_spills(ptxas_reports, src, arch):
    rc, log, obj = ptxas_reports[(src, arch)]
    assert rc == 0, log
    assert obj.is_file() and obj.stat().st_size > 0
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\w+)'", log)
    assert entries and all(a == arch for _, a in entries), log
    # Every entry function: fp32 / bf16 / fp16 / complex64 x forward / backward x vectorised or not.
    assert len(entries) >= 16, log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) >= len(entries), log
    assert all(st == "0" and ld == "0" for st, ld in spills), log
    assert "0 bytes spill stores" in log and "0 bytes spill loads" in log
    assert "error" not in log.lower(), log


# Entry functions of diagonal_scan_kernel.cu: diagonal_scan_kernel<S, kBackward, kVectorized>.
_ENTRY = re.compile(r"diagonal_scan_kernelI(?P<dtype>f|13__nv_bfloat16|6__half|NS0_6cfloatE)Lb(?P<backward>[01])"
                    r"ELb(?P<vectorized>[01])E")
_DTYPE_OF = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16", "NS0_6cfloatE": "complex64"}
# Per thread and chunk, kSteps = 4 time steps of one vector of channels (16 bytes for fp32 and
# complex64, 8 bytes for bf16 and fp16).
_STEPS = 4
# Threads per block (8 data warps and the look-back warp) and blocks per SM the kernel is built for.
_BLOCK_THREADS, _BLOCKS_PER_SM = 288, 2


def _split_entries(text: str, marker: str) -> dict:
    """{(dtype, backward, vectorized): body} of every diagonal_scan_kernel entry in a PTX or SASS dump."""
    entries = {}
    for part in text.split(marker)[1:]:
        match = _ENTRY.search(part.split("\n", 1)[0])
        if match:
            key = (_DTYPE_OF[match["dtype"]], match["backward"] == "1", match["vectorized"] == "1")
            entries[key] = part
    return entries


@pytest.fixture(scope="module")
def ptx_sm90a(tmp_path_factory):
    """The PTX of diagonal_scan_kernel.cu for sm_90a, split by entry function."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("ptx") / "diagonal_scan_kernel.ptx"
    flags = [f for f in _cuda.nvcc_flags([]) if f != "-lineinfo"]
    result = subprocess.run([NVCC, *flags, "-arch=sm_90a", "-I", str(CSRC), "-ptx",
                             str(CSRC / "diagonal_scan_kernel.cu"), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = _split_entries(out.read_text(), ".entry ")
    assert len(entries) == 16, sorted(entries)
    return entries


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "complex64", "bf16", "fp16"])
def test_cuda_diagonal_vector_loads_and_stores(ptx_sm90a, dtype, backward):
    """The vectorised kernel moves a, x (dL/dh), h and dL/da in vectors: 128-bit for fp32 and
    complex64, 64-bit for bf16 and fp16 (dL/da, fp32, in 128-bit words); every state (dL/dx) store
    and every dL/da store of the time walk is one vector store, none a scalar st.global of them."""
    ptx = ptx_sm90a[(dtype, backward, True)]
    wide = "v4" if dtype in ("fp32", "complex64") else "v2"
    stores = re.findall(r"\bst\.global\.(v\d)\.b32\b", ptx)
    loads = re.findall(r"\bld\.global\.nc\.(v\d)\.u32\b", ptx)
    # Forward: kSteps state stores; backward: kSteps dL/dx stores and kSteps dL/da stores of
    # 16-byte words (4 fp32 or 2 complex64 gradients of V channels: 1 word; bf16's 4 fp32: 1 word).
    assert stores.count(wide) >= _STEPS, stores
    if backward:
        assert stores.count("v4") >= (_STEPS if wide == "v4" else 0) + _STEPS, stores
    # Forward: a and x each step; backward: a, dL/dh and h.
    assert loads.count(wide) >= (3 if backward else 2) * _STEPS, loads
    # The data's scalar fallbacks are in the unvectorised entry only: 16-bit scalars never here.
    assert not re.search(r"\b(st|ld)\.global(\.nc)?\.[ubs]16\b", ptx)


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "complex64", "bf16", "fp16"])
def test_cuda_look_back_flags_are_acquire_and_release(ptx_sm90a, dtype, vectorized):
    """Decoupled look-back under the PTX memory model: each lane reads a predecessor's flag with
    its own ld.acquire.gpu (no flag handed between lanes by a shuffle), the warp agrees by a vote,
    and flags are written with st.release.gpu after the payload."""
    for backward in (False, True):
        ptx = ptx_sm90a[(dtype, backward, vectorized)]
        assert re.search(r"\bld\.acquire\.gpu\.global\.b32\b", ptx)
        assert len(re.findall(r"\bst\.release\.gpu\.global\.b32\b", ptx)) >= 2  # aggregate, prefix
        assert "shfl.sync.idx" not in ptx  # the scan itself shuffles only upwards
        assert "vote.sync.all" in ptx
        assert not re.search(r"\bld\.volatile\.global", ptx)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_diagonal_two_blocks_per_sm(ptxas_reports, arch):
    """Registers of every entry let two blocks of 288 threads share an SM (look-back latency hidden
    by the other block): registers x 288 x 2 <= 65536, as __launch_bounds__ asks."""
    rc, log, _ = ptxas_reports[("diagonal_scan_kernel.cu", arch)]
    assert rc == 0, log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert len(registers) >= 16, log
    assert all(-(-r // 8) * 8 * _BLOCK_THREADS * _BLOCKS_PER_SM <= 65536 for r in registers), registers


def _cuobjdump():
    """cuobjdump: the CUDA toolkit's, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found is None and NVCC is not None:
        candidate = Path(NVCC).resolve().parent / "cuobjdump"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        try:
            import triton.backends.nvidia as nvidia_backend
            candidate = Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
            found = str(candidate) if candidate.is_file() else None
        except ImportError:
            found = None
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_diagonal_sass_has_vector_stores(ptxas_reports, arch):
    """The machine code keeps the vector stores ptxas was given: STG.E.128 (fp32, complex64) or
    STG.E.64 (bf16, fp16) for every state store of the vectorised entries."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's) to disassemble with")
    rc, log, obj = ptxas_reports[("diagonal_scan_kernel.cu", arch)]
    assert rc == 0, log
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, timeout=300, check=True).stdout
    entries = _split_entries(sass, "Function : ")
    assert len(entries) == 16, sorted(entries)
    for (dtype, backward, vectorized), code in entries.items():
        if not vectorized:
            continue
        wide = "STG.E.128" if dtype in ("fp32", "complex64") else "STG.E.64"
        assert len(re.findall(re.escape(wide) + r"\b", code)) >= _STEPS, (dtype, backward)
        if backward:
            assert len(re.findall(r"STG\.E\.128\b", code)) >= _STEPS * (2 if wide == "STG.E.128" else 1)


# --- loader and dispatch without a usable CUDA backend ---------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="the error is for machines without CUDA")
def test_loader_says_why_without_cuda():
    reason = _cuda.cuda_backend_unavailable_reason()
    assert reason is not None and ("CUDA" in reason or "cuda" in reason)
    with pytest.raises(RuntimeError, match=r"CUDA backend is unavailable: .*would run instead"):
        _cuda.load_extension()
    assert _cuda._JIT.module is None


def test_disable_env_var(monkeypatch):
    monkeypatch.setenv("LINREC_DISABLE_CUDA", "1")
    assert _cuda.cuda_backend_unavailable_reason() == "LINREC_DISABLE_CUDA is set"
    if _cuda._JIT.module is None:  # nothing built yet in this process: the flag stops the build
        with pytest.raises(RuntimeError, match="LINREC_DISABLE_CUDA"):
            _cuda.load_extension()


@pytest.mark.skipif(HAS_CUDA, reason="the error is for machines without CUDA")
def test_cuda_backend_on_cpu_tensors_raises_value_error():
    a, x = torch.rand(2, 10, 4), torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        linrec.diagonal_scan(a, x, backend="cuda")


def test_cuda_arch_env_parsing(monkeypatch):
    monkeypatch.setenv("LINREC_CUDA_ARCH", "sm_90a, 8.0;compute_86")
    assert _cuda.cuda_archs() == ["90a", "80", "86"]
    flags = _cuda.nvcc_flags(["90a", "80"])
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-gencode=arch=compute_80,code=sm_80" in flags
    monkeypatch.setenv("LINREC_CUDA_ARCH", "ampere")
    with pytest.raises(ValueError, match="LINREC_CUDA_ARCH"):
        _cuda.cuda_archs()


def test_import_builds_nothing():
    code = ("import sys, linrec, linrec.diagonal; from linrec import _cuda; "
            "assert _cuda._JIT.module is None")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_loader_calls_the_jit_build_once(monkeypatch):
    """The build path itself, with torch.utils.cpp_extension.load stood in (no nvcc run here)."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_cuda, "cuda_backend_unavailable_reason", lambda: None)
    monkeypatch.setattr(_cuda._JIT, "module", None)
    monkeypatch.setenv("LINREC_CUDA_ARCH", "90a")
    assert _cuda.load_extension() == "module"
    assert _cuda.load_extension() == "module"  # cached in the process: built once
    assert len(calls) == 1
    kwargs = calls[0]
    assert kwargs["name"] == "linrec_cuda_90a"
    assert [Path(src).name for src in kwargs["sources"]] == list(_cuda.SOURCES)
    assert all(Path(src).is_file() for src in kwargs["sources"])
    assert "-gencode=arch=compute_90a,code=sm_90a" in kwargs["extra_cuda_cflags"]


def test_loader_reports_a_failed_build(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("nvcc: error")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(_cuda, "cuda_backend_unavailable_reason", lambda: None)
    monkeypatch.setattr(_cuda._JIT, "module", None)
    monkeypatch.setattr(_cuda._JIT, "build_error", None)
    monkeypatch.setenv("LINREC_CUDA_ARCH", "80")
    with pytest.raises(RuntimeError, match=r"building linrec's CUDA extension for sm_80 failed: nvcc: error"):
        _cuda.load_extension()


def test_sources_found_by_loader():
    src = _cuda.source_dir()
    for name in _cuda.SOURCES:
        assert (src / name).is_file()


class _StandInExtension:
    """Mimics the compiled module on the CPU: checks the binding's argument contract (as
    csrc/binding.cpp does) and computes with the reference, so the launchers in linrec._cuda and
    the op's "cuda" branches run end to end without a GPU."""

    calls = 0

    def diagonal_scan(self, a, x, h0, cu_seqlens, out, h, grad_a, grad_h0, reverse, backward):
        type(self).calls += 1
        acc = torch.complex64 if x.is_complex() else torch.float32
        assert x.dtype in _cuda.SUPPORTED_DTYPES and x.is_contiguous() and x.dim() == 3
        assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
        assert a.dtype == x.dtype and a.shape == x.shape  # expanded view, any strides
        N = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cu_seqlens is not None:
            assert cu_seqlens.dtype == torch.int64 and x.shape[0] == 1
        if h0 is not None:
            assert h0.dtype == acc and h0.shape == (N, x.shape[2]) and h0.is_contiguous()
        if not backward:
            out.copy_(diagonal_scan_reference(a.to(acc), x.to(acc), h0, cu_seqlens=cu_seqlens, reverse=reverse))
            return
        from linrec.diagonal.chunked import diagonal_scan_chunked_backward
        assert h.dtype == x.dtype and h.is_contiguous() and grad_a.dtype == acc and grad_h0.dtype == acc
        assert grad_a.shape == x.shape and grad_h0.shape == (N, x.shape[2]) and not grad_h0.any()
        ga, gx, gh0 = diagonal_scan_chunked_backward(a.to(acc), h.to(acc), x.to(acc), h0, cu_seqlens=cu_seqlens,
                                                      reverse=reverse)
        grad_a.copy_(ga)
        out.copy_(gx)
        grad_h0.copy_(gh0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("varlen", [False, True])
def test_launchers_and_op_plumbing_with_a_stand_in_extension(monkeypatch, dtype, varlen):
    monkeypatch.setattr(_cuda, "load_extension", lambda: _StandInExtension())
    _StandInExtension.calls = 0
    B, T, D = (1, 40, 6) if varlen else (2, 40, 6)
    cu = torch.tensor([0, 9, 9, 40], dtype=torch.int32) if varlen else None
    N = 3 if varlen else B
    a, x = _inputs(B, T, D, dtype, a_shape=(D,) if dtype == torch.float32 else None)
    h0 = torch.randn(N, D, dtype=torch.complex64 if dtype.is_complex else torch.float32)
    for reverse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
        h = torch.ops.linrec.diagonal_scan(*leaves, cu, reverse, "cuda")
        w = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        ((h * w.to(h.dtype)).real.sum() if h.is_complex() else (h.double() * w).sum()).backward()
        ref = [t.detach().clone().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()
               for t in (a, x, h0)]
        h_ref = diagonal_scan_reference(*ref, cu_seqlens=cu, reverse=reverse)
        ((h_ref * w.to(h_ref.dtype)).real.sum() if h_ref.is_complex() else (h_ref * w).sum()).backward()
        assert h.dtype == x.dtype
        assert rel_rms(h, h_ref) < TOL[dtype]
        for got, want in zip(leaves, ref):
            assert got.grad.shape == want.shape and got.grad.dtype == got.dtype
            assert rel_rms(got.grad, want.grad) < TOL[dtype]
    assert _StandInExtension.calls == 4  # forward and backward, both directions


# --- numerics on a GPU --------------------------------------------------------------------------

# The inputs and tolerances of the diagonal suite, shared so the CUDA backend meets the same bar.
from conftest import TOL, assert_close_to_reference, to64  # noqa: E402
from test_diagonal import _inputs, _run  # noqa: E402


def _check(a, x, h0, reverse, tol, cu_seqlens=None):
    h, grads = _run("cuda", a, x, h0, reverse, cu_seqlens, device="cuda")
    h_ref, grads_ref = _run("reference" if x.shape[1] <= 2000 else "torch", to64(a), to64(x), to64(h0), reverse,
                            cu_seqlens, device="cpu")
    assert h.dtype == x.dtype
    assert_close_to_reference([h], [h_ref], grads, grads_ref, (a, x, h0), ("a", "x", "initial_state"), tol)


@needs_cuda_backend
@pytest.mark.parametrize("D", [19, 64])  # 19: the element-wise path; 64: 16-byte vectors
@pytest.mark.parametrize("T", [1, 7, 100, 257, 1029, 5000])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32_matches_reference(T, D, reverse):
    a, x = _inputs(2, T, D, torch.float32)
    _check(a, x, torch.randn(2, D), reverse, 1e-5)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("D", [24, 64, 13])
@pytest.mark.parametrize("reverse", [False, True])
def test_dtypes_match_reference(dtype, D, reverse):
    a, x = _inputs(2, 777, D, dtype)
    h0 = torch.randn(2, D, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
    _check(a, x, h0, reverse, TOL[dtype])


@needs_cuda_backend
@pytest.mark.parametrize("a_shape", [(64,), (1, 500, 64), (3, 1, 64), (1, 1, 1), (3, 500, 1)])
def test_broadcast_a(a_shape):
    a, x = _inputs(3, 500, 64, torch.float32, a_shape=a_shape, a_kind="decay")
    _check(a, x, None, False, 1e-5)
    _, grads = _run("cuda", a, x, None, False)
    assert grads[0].shape == a.shape


@needs_cuda_backend
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("D", [12, 32])
def test_varlen_equals_separate_sequences(reverse, D):
    # Sequences shorter than, spanning and longer than one chunk (128 steps), and empty ones.
    lengths = [5, 0, 300, 1, 1700, 0, 33, 256]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    a, x = _inputs(1, T, D, torch.float32)
    h0 = torch.randn(len(lengths), D)
    _check(a, x, h0, reverse, 1e-5, cu_seqlens=cu)
    h, _ = _run("cuda", a, x, h0, reverse, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e > s:
            single = linrec.diagonal_scan(a[:, s:e].cuda(), x[:, s:e].cuda(), h0[n: n + 1].cuda(), reverse=reverse,
                                          backend="cuda")
            torch.testing.assert_close(h[:, s:e].detach(), single, rtol=1e-5, atol=1e-5)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_few_channels(dtype):
    # Many chunks per channel tile: the carries cross hundreds of blocks by look-back.
    T, D = 300_000, 16
    a, x = _inputs(1, T, D, dtype, a_kind="decay")
    h = linrec.diagonal_scan(a.cuda(), x.cuda(), backend="cuda")
    ref = linrec.diagonal_scan(a.double(), x.double(), backend="torch")
    assert rel_rms(h.cpu(), ref) < TOL[dtype]
    h_rev = linrec.diagonal_scan(a.cuda(), x.cuda(), reverse=True, backend="cuda")
    ref_rev = linrec.diagonal_scan(a.double(), x.double(), reverse=True, backend="torch")
    assert rel_rms(h_rev.cpu(), ref_rev) < TOL[dtype]


@needs_cuda_backend
def test_matches_triton_on_gpu_sized_shapes():
    pytest.importorskip("triton")
    a, x = _inputs(4, 4096, 1024, torch.bfloat16, a_kind="decay")
    a, x = a.cuda(), x.cuda()
    h0 = torch.randn(4, 1024, device="cuda").bfloat16()
    for reverse in (False, True):
        h_cuda = linrec.diagonal_scan(a, x, h0, reverse=reverse, backend="cuda")
        h_triton = linrec.diagonal_scan(a, x, h0, reverse=reverse, backend="triton")
        assert rel_rms(h_cuda.float(), h_triton.float()) < 1e-2


@needs_cuda_backend
def test_mixed_dtypes_noncontiguous_and_stride0_grads():
    a_big, x_big = _inputs(2, 400, 30, torch.float32)
    a = a_big[:, ::2, ::3].cuda()  # fp32 non-contiguous coefficients
    x = x_big.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2, ::3].cuda()
    h0 = torch.randn(10, 2).t().cuda()  # (2, 10) non-contiguous
    snapshot = [t.clone() for t in (a, x, h0)]
    leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    h = linrec.diagonal_scan(*leaves, backend="cuda")
    h.sum().backward()  # stride-0 incoming gradient
    ref = [t.detach().cpu().double().requires_grad_() for t in (a, x, h0)]
    diagonal_scan_reference(*ref).sum().backward()
    for got, want in zip(leaves, ref):
        assert rel_rms(got.grad.cpu(), want.grad) < 1e-5
    for before, after in zip(snapshot, (a, x, h0)):
        assert torch.equal(before, after)
    # bf16 x with fp32 a: computed in fp32, returned in bf16.
    hb = linrec.diagonal_scan(a, x.bfloat16(), backend="cuda")
    assert hb.dtype == torch.bfloat16
    assert rel_rms(hb.float().cpu(), diagonal_scan_reference(a.double().cpu(), x.bfloat16().double().cpu())) < 1e-2


@needs_cuda_backend
def test_float64_is_refused_with_a_reason():
    a, x = _inputs(1, 10, 4, torch.float64)
    with pytest.raises(ValueError, match="backend='cuda' supports float32"):
        linrec.diagonal_scan(a.cuda(), x.cuda(), backend="cuda")


@needs_cuda_backend
def test_empty_and_tiny_shapes():
    for B, T, D in [(2, 0, 8), (2, 5, 0), (1, 1, 1)]:
        a, x = torch.rand(B, T, D, device="cuda"), torch.randn(B, T, D, device="cuda")
        h = linrec.diagonal_scan(a, x, backend="cuda")
        torch.testing.assert_close(h, linrec.diagonal_scan(a, x, backend="torch"))


@needs_cuda_backend
def test_opcheck_and_torch_compile():
    a, x = _inputs(2, 300, 8, torch.float32)
    a, x, h0 = a.cuda(), x.cuda(), torch.randn(2, 8, device="cuda")
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.linrec.diagonal_scan.default,
                              (a.clone().requires_grad_(), x.clone().requires_grad_(), h0.clone().requires_grad_(),
                               None, reverse, "cuda"))

    def loss(a_, x_):
        return linrec.diagonal_scan(a_.sigmoid(), x_, backend="cuda").square().sum()

    leaves = [t.clone().requires_grad_() for t in (a, x)]
    eager = loss(*leaves)
    eager.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(loss, fullgraph=True)(*leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for t, g in zip(leaves, grads):
        torch.testing.assert_close(t.grad, g)
