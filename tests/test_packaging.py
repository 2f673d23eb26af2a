"""``pip install .`` puts the Triton kernels (and CUDA sources) inside the installed package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_ships_kernels_inside_the_package(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    probe = ("import linrec, linrec.kernels.diagonal as k, linrec.nn; "
             "print(linrec.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True, timeout=300).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out), out
    for kernel_file in (ROOT / "kernels").glob("*.py"):
        assert (target / "linrec" / "kernels" / kernel_file.name).exists(), kernel_file.name
    for source in list((ROOT / "csrc").glob("*.cu")) + list((ROOT / "csrc").glob("*.cpp")):
        assert (target / "linrec" / "csrc" / source.name).exists(), source.name
