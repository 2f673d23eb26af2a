"""Packaging: ``pip install .`` ships the Triton kernels, CUDA sources, ``py.typed`` and the licence
inside the installed package; ``import linrec`` gives ``linrec.nn``; README and setup.py state the
same supported versions, and the running ones meet them."""

import re
import subprocess
import sys
from pathlib import Path

import torch

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
    # PEP 561 marker, the licence file and the licence in the metadata.
    assert (target / "linrec" / "py.typed").is_file()
    (dist_info,) = target.glob("linrec-*.dist-info")
    licences = list(dist_info.rglob("LICENSE"))
    assert licences and licences[0].read_text() == (ROOT / "LICENSE").read_text()
    metadata = (dist_info / "METADATA").read_text()
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", metadata, re.M), metadata[:2000]


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright the linrec authors")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_import_linrec_gives_linrec_nn():
    """As ``import torch`` gives ``torch.nn``; in a fresh process, so nothing imported it before."""
    probe = ("import importlib, torch, linrec\n"
             "layer = linrec.nn.LRU(4, 3)\n"
             "y = layer(torch.randn(2, 5, 4))\n"
             "print(tuple(y.shape), linrec.nn is importlib.import_module('linrec.nn'), 'nn' in linrec.__all__)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "(2, 5, 4) True True", out.stdout


def test_importing_linrec_nn_first_has_no_cycle():
    probe = "import linrec.nn as lnn, linrec; print(lnn is linrec.nn, callable(linrec.diagonal_scan))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "True True", out.stdout


def _version(text: str) -> tuple:
    return tuple(int(p) for p in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def test_readme_and_setup_state_the_same_supported_versions():
    setup = (ROOT / "setup.py").read_text()
    readme = (ROOT / "README.md").read_text()
    torch_floor = re.search(r'"torch>=([\d.]+)"', setup).group(1)
    python_floor = re.search(r'python_requires=">=([\d.]+)"', setup).group(1)
    triton_floors = set(re.findall(r'"triton>=([\d.]+)"', setup))
    assert len(triton_floors) == 1, triton_floors
    paragraphs = [" ".join(p.split()) for p in readme.split("\n\n")]
    (requirements,) = [p for p in paragraphs if p.startswith("**Requirements:**")]
    assert f"Python >= {python_floor}" in requirements, requirements
    assert f"PyTorch >= {torch_floor}" in requirements, requirements
    assert f"Triton >= {triton_floors.pop()}" in requirements, requirements
    # The floor is a tested one: this run's PyTorch and Python meet it.
    assert _version(torch.__version__) >= _version(torch_floor), (torch.__version__, torch_floor)
    assert sys.version_info[:2] >= _version(python_floor), (sys.version, python_floor)
