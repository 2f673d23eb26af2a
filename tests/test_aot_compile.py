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

KERNEL_MODULES = sorted(f"linrec.kernels.{m.name}" for m in pkgutil.iter_modules(linrec.kernels.__path__))


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


def _compile(module: str, pythonpath=None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [p for p in [env.get("PYTHONPATH")] if p])
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), module, "80", "90"], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90a(module):
    assert "compiled" in _compile(module)


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
    """``aot_compile.py --spills`` prints one line per kernel and target with ptxas' spill bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), "linrec.kernels.block_diagonal", "90", "--spills"], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "bytes of spill stores + loads" in line]
    assert {line.split()[0] for line in lines} == {"block_diagonal_scan_kernel", "block_diagonal_carry_kernel"}
    assert all(int(line.split("up to ")[1].split()[0]) >= 0 for line in lines)
