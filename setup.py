"""Installs the ``linrec`` package.

The source tree keeps the three layers apart (docs/design.md §3, Layout): ``python/linrec``
is the package, ``kernels/`` holds the Triton kernels and ``csrc/`` the CUDA
sources. Installed, they become ``linrec``, ``linrec.kernels`` and the package
data ``linrec/csrc``, so that ``pip install .`` and ``pip install -e .`` give
the same import paths.

No extension is compiled here: the optional CUDA backend is JIT-compiled on
first use (see ``linrec._cuda``), so a CPU-only PyTorch never attempts it.

Supported versions are the ones in use, not the oldest the APIs would allow: PyTorch >= 2.11
(CI runs 2.13, the GPU machines have 2.11; ``torch.library.custom_op`` with ``register_fake``
and ``register_autograd`` dates from 2.4, but nothing older than 2.11 has been tried), hence
Python >= 3.10 (PyTorch 2.11 has no wheel for 3.9), and Triton >= 3.6 (CI runs 3.9 and compiles
every kernel with 3.6, the GPU machines' version).
"""

from setuptools import setup

setup(
    name="linrec",
    version="0.1.0",
    description="Kernels for linear recurrences: diagonal, Householder-product and block-diagonal scans",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=["linrec", "linrec.diagonal", "linrec.block_diagonal", "linrec.householder", "linrec.selective", "linrec.nn",
              "linrec.kernels", "linrec.csrc"],
    package_dir={
        "linrec": "python/linrec",
        "linrec.kernels": "kernels",
        "linrec.csrc": "csrc",
    },
    package_data={"linrec": ["py.typed"], "linrec.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh", "cpu/*.cpp", "cpu/*.h"]},
    install_requires=["torch>=2.11", "einops", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        # the bench and task tests run tqdm and matplotlib; pytest-xdist: ``pytest -n N``
        "test": ["triton>=3.6", "pytest", "pytest-xdist", "ninja", "tqdm", "matplotlib"],
        "bench": ["triton>=3.6", "tqdm", "matplotlib"],
    },
)
