"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90a (H100), without a GPU,
with the installed Triton and with the Triton of the project's GPU machines (3.6), which
rejected a kernel that 3.9 accepts (a tf32 product on sm_90, see kernels/householder.py).

The Triton 3.6 check needs ``triton==3.6.0`` beside the installed Triton: on first use pip
downloads its wheel (about 642 MB) into ``~/.cache/linrec/triton-3.6.0`` (or
``$LINREC_GPU_TRITON_DIR``), and the run says so on the terminal and in the warnings summary.
``LINREC_SKIP_TRITON36=1`` skips that check (and the download) with a reason."""

import contextlib
import os
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import linrec.kernels

GPU_MACHINE_TRITON = "3.6.0"
GPU_MACHINE_TRITON_WHEEL = "about 642 MB"  # triton-3.6.0 manylinux x86_64 wheel
SKIP_GPU_MACHINE_TRITON = "LINREC_SKIP_TRITON36"

KERNEL_MODULES = sorted(f"linrec.kernels.{m.name}" for m in pkgutil.iter_modules(linrec.kernels.__path__)
                        if not m.name.startswith("_"))  # _shared: helpers, no kernels of its own


def test_every_kernel_module_lists_its_specialisations():
    import importlib

    assert KERNEL_MODULES, "no kernel modules found"
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "aot_specs"), f"{name} has no aot_specs()"


def _announce(config, message: str) -> None:
    """Tells the user now (one terminal line, past output capture) and in the warnings summary
    (which pytest-xdist workers forward too)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and not hasattr(config, "workerinput"):
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"linrec: {message}")
    warnings.warn(message, UserWarning, stacklevel=2)


@pytest.fixture(scope="session")
def gpu_machine_triton(request) -> Path:
    """A Triton GPU_MACHINE_TRITON install (pip --target, cached under ~/.cache/linrec)."""
    if os.environ.get(SKIP_GPU_MACHINE_TRITON, "").strip() not in ("", "0"):
        pytest.skip(f"{SKIP_GPU_MACHINE_TRITON} is set: not compiling the kernels with triton=={GPU_MACHINE_TRITON} "
                    "(the GPU machines' Triton), which would need its wheel")
    target = Path(os.environ.get("LINREC_GPU_TRITON_DIR",
                                 Path.home() / ".cache" / "linrec" / f"triton-{GPU_MACHINE_TRITON}"))
    installed = target / "triton" / "__init__.py"
    if not installed.exists():
        with _install_lock(target):  # pytest-xdist workers: one installs, the others wait for it
            if not installed.exists():
                _announce(request.config,
                          f"pip is installing triton=={GPU_MACHINE_TRITON} ({GPU_MACHINE_TRITON_WHEEL} download) "
                          f"into {target} to compile the kernels with the GPU machines' Triton, once; "
                          f"{SKIP_GPU_MACHINE_TRITON}=1 skips this")
                result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                         str(target), f"triton=={GPU_MACHINE_TRITON}"],
                                        capture_output=True, text=True, timeout=900)
                if result.returncode != 0:
                    pytest.skip(f"pip could not install triton=={GPU_MACHINE_TRITON} to compile against: "
                                f"{result.stderr.strip()[-300:]}")
    return target


@contextlib.contextmanager
def _install_lock(target: Path):
    """An exclusive lock file beside ``target`` for the duration of the block (POSIX; elsewhere none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Triton's GPU compiler runs on Linux
        yield
        return
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_aot_compile(module: str, *args: str, pythonpath=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [p for p in [env.get("PYTHONPATH")] if p])
    script = Path(__file__).with_name("aot_compile.py")
    return subprocess.run([sys.executable, str(script), module, *args], env=env,
                          capture_output=True, text=True, timeout=1800)


def _compile(module: str, pythonpath=None) -> str:
    """Compiles ``module`` for sm_80 and sm_90a and checks its STATIC_BUDGET at sm_90a (one
    compile serves both checks)."""
    result = _run_aot_compile(module, "80", "90", "--budget", pythonpath=pythonpath)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result.stdout


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90a(module):
    """Every specialisation builds; the module's streaming kernels (``STATIC_BUDGET``) keep the
    static budget at sm_90a: no spills, 2 programs per SM, vector loads and stores in their loops."""
    out = _compile(module)
    assert "compiled" in out
    import importlib
    budgeted = getattr(importlib.import_module(module), "STATIC_BUDGET", {})
    if budgeted:
        lines = [line for line in out.splitlines() if line.strip().startswith("budget ")]
        assert {line.split()[1] for line in lines} == set(budgeted), out[-3000:]
        assert all(line.endswith("within budget") for line in lines), out[-3000:]


def test_static_budget_checker_finds_what_breaks_it():
    """The checker on known kernels (tests/aot_budget_fixture.py): an aligned fp32 copy is within
    budget; the same copy without 16-byte alignment has only 32-bit accesses in its loop; a
    8192-element scan on one warp spills; a spec marked ``budget: False`` is not checked; the
    unaligned copy with ``budget: {"vector_of": None}`` is held to the rest of the budget only."""
    result = _run_aot_compile("aot_budget_fixture", "90", "--budget")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith("budget ")]
    assert len(lines) == 4, result.stdout
    aligned, unaligned, scan, no_vector = lines
    assert "[BLOCK=1024]" in aligned and aligned.endswith("within budget")
    assert "[BLOCK=512]" in unaligned and "0 global ld of >= 128 bits in loops" in unaligned
    assert "0 global st of >= 128 bits in loops" in unaligned
    assert "[BLOCK=8192]" in scan and "bytes of spill stores + loads" in scan
    assert "[BLOCK=256; budget vector_of=None]" in no_vector and no_vector.endswith("within budget")
    assert "4 streaming specialisations checked, 2 over budget" in result.stdout


def test_a_specialisation_budget_overrides_its_kernels_fields():
    """``spec_budget``: a dict option replaces fields of the kernel's entry for that specialisation
    alone; True keeps the entry, False or a kernel without one checks nothing, and a field the
    checker does not know is an error rather than a silently unchecked budget."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from aot_compile import budget_violations, spec_budget
    finally:
        sys.path.pop(0)
    entry = {"programs_per_sm": 2, "vector_of": "x_ptr"}
    assert spec_budget(entry, True) == entry
    assert spec_budget(entry, {"vector_of": None}) == {"programs_per_sm": 2, "vector_of": None}
    assert entry == {"programs_per_sm": 2, "vector_of": "x_ptr"}  # the kernel's entry is not changed
    assert spec_budget(entry, False) is None and spec_budget(None, True) is None
    with pytest.raises(ValueError, match="vector_off"):
        spec_budget(entry, {"vector_off": None})
    # Scalar accesses only: over the kernel's budget, within the overridden one; spills break both.
    scalar_only = {("ld", 32): 4, ("st", 32): 1}
    clean = {"spill_bytes": 0, "registers": 40}
    args = ({"x_ptr": "*fp32"}, 4, 0)
    assert len(budget_violations(spec_budget(entry, True), *args, clean, scalar_only)) == 2
    assert budget_violations(spec_budget(entry, {"vector_of": None}), *args, clean, scalar_only) == []
    assert budget_violations(spec_budget(entry, {"vector_of": None}), *args, {"spill_bytes": 8, "registers": 255},
                             scalar_only) == ["8 bytes of spill stores + loads"]


def test_loop_global_accesses_reads_llvm_loop_blocks():
    """Global accesses are counted by width only inside blocks LLVM marks as in a loop."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from aot_compile import loop_global_accesses, required_vector_bits
    finally:
        sys.path.pop(0)
    ptx = "\n".join([
        "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",      # before any loop
        "$L__BB0_2:                              // =>This Loop Header: Depth=1",
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\t@%p1 ld.global.cg.b32 { %r5 }, [ %rd2 + 0 ];",
        "\t@%p1 ld.global.gpu.acquire.b32 %r6, [ %rd3 + 0 ];",
        "\t@%p1 st.global.v2.b32 [ %rd4 + 0 ], { %r1, %r2 };",
        "\tatom.global.gpu.release.exch.b32 %r7, [ %rd5 + 0 ], %r8;",
        "$L__BB0_3:                              // %exit",
        "\tst.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };",
        "$L__BB0_4:                              // %body",
        "                                        //   in Loop: Header=BB0_2 Depth=1",
        "\tst.global.b16 [ %rd4 + 0 ], { %rs1 };",
        "\tcp.async.cg.shared.global [ %r9 + 0 ], [ %rd6 + 0 ], 0x10, %r10;",  # a pipelined 16-byte load
    ])
    assert loop_global_accesses(ptx) == {("ld", 128): 2, ("ld", 32): 2, ("st", 64): 1, ("st", 16): 1}
    assert required_vector_bits("fp32") == 128 and required_vector_bits("bf16") == 64


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_with_the_gpu_machines_triton(module, gpu_machine_triton):
    assert f"with triton {GPU_MACHINE_TRITON}" in _compile(module, gpu_machine_triton)


def _pytest_gpu_machine_triton_tests(env_overrides: dict) -> subprocess.CompletedProcess:
    """Runs only this file's Triton 3.6 tests in a child pytest with ``env_overrides`` set."""
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-k", "gpu_machines_triton", str(Path(__file__))],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)


def test_triton36_check_is_skipped_with_a_reason_when_asked():
    result = _pytest_gpu_machine_triton_tests({SKIP_GPU_MACHINE_TRITON: "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(KERNEL_MODULES)} skipped" in result.stdout, result.stdout[-3000:]
    assert f"{SKIP_GPU_MACHINE_TRITON} is set" in result.stdout, result.stdout[-3000:]
    assert "pip is installing" not in result.stdout


def test_triton36_download_is_announced(tmp_path):
    """With no cached install, the run says what it downloads before pip starts (pip is kept
    offline here, so it fails at once and the check skips with pip's reason)."""
    result = _pytest_gpu_machine_triton_tests({"LINREC_GPU_TRITON_DIR": str(tmp_path / "triton"),
                                               SKIP_GPU_MACHINE_TRITON: "0", "PIP_NO_INDEX": "1",
                                               "PIP_FIND_LINKS": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    terminal_lines = [line for line in result.stdout.splitlines()
                      if line.startswith(f"linrec: pip is installing triton=={GPU_MACHINE_TRITON}")]
    assert len(terminal_lines) == 1, result.stdout[-3000:]
    assert GPU_MACHINE_TRITON_WHEEL in terminal_lines[0] and f"{SKIP_GPU_MACHINE_TRITON}=1" in terminal_lines[0]
    assert "warnings summary" in result.stdout and "UserWarning" in result.stdout, result.stdout[-3000:]
    assert f"{len(KERNEL_MODULES)} skipped" in result.stdout, result.stdout[-3000:]
    assert "pip could not install" in result.stdout, result.stdout[-3000:]


def test_spill_report_reads_ptxas(tmp_path):
    """``aot_compile.py --spills`` prints one line per kernel and target with ptxas' spill bytes
    (on tests/aot_budget_fixture.py: the aligned copy spills nothing, the big scan spills)."""
    result = _run_aot_compile("aot_budget_fixture", "90", "--spills")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "bytes of spill stores + loads" in line]
    spilled = {line.split()[0]: int(line.split("up to ")[1].split()[0]) for line in lines}
    assert set(spilled) == {"copy_kernel", "cumsum_kernel"}, result.stdout
    assert spilled["copy_kernel"] == 0 and spilled["cumsum_kernel"] > 0, result.stdout
