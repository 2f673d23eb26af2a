"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90a (H100), without a GPU,
with the installed Triton and with the Triton of the project's GPU machines (3.6), which
rejected a kernel that 3.9 accepts (a tf32 product on sm_90, see kernels/householder.py)."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import linrec.kernels

GPU_MACHINE_TRITON = "3.6.0"

KERNEL_MODULES = sorted(f"linrec.kernels.{m.name}" for m in pkgutil.iter_modules(linrec.kernels.__path__))


def test_every_kernel_module_lists_its_specialisations():
    import importlib

    assert KERNEL_MODULES, "no kernel modules found"
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "aot_specs"), f"{name} has no aot_specs()"


@pytest.fixture(scope="session")
def gpu_machine_triton() -> Path:
    """A Triton GPU_MACHINE_TRITON install (pip --target, cached under ~/.cache/linrec)."""
    target = Path(os.environ.get("LINREC_GPU_TRITON_DIR",
                                 Path.home() / ".cache" / "linrec" / f"triton-{GPU_MACHINE_TRITON}"))
    if not (target / "triton" / "__init__.py").exists():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                 f"triton=={GPU_MACHINE_TRITON}"], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"pip could not install triton=={GPU_MACHINE_TRITON} to compile against: "
                        f"{result.stderr.strip()[-300:]}")
    return target


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
