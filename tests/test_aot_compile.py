"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90a (H100), without a GPU."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import linrec.kernels

KERNEL_MODULES = sorted(f"linrec.kernels.{m.name}" for m in pkgutil.iter_modules(linrec.kernels.__path__))


def test_every_kernel_module_lists_its_specialisations():
    import importlib

    assert KERNEL_MODULES, "no kernel modules found"
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "aot_specs"), f"{name} has no aot_specs()"


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_for_sm80_and_sm90a(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), module, "80", "90"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "compiled" in result.stdout
