"""Installs the ``linrec`` package.

The source tree keeps the three layers apart (DESIGN.md §3): ``python/linrec``
is the package, ``kernels/`` holds the Triton kernels and ``csrc/`` the CUDA
sources. Installed, they become ``linrec``, ``linrec.kernels`` and the package
data ``linrec/csrc``, so that ``pip install .`` and ``pip install -e .`` give
the same import paths.

No extension is compiled here: the optional CUDA backend is JIT-compiled on
first use (see ``linrec._cuda``), so a CPU-only PyTorch never attempts it.
"""

from setuptools import setup

setup(
    name="linrec",
    version="0.1.0",
    description="Kernels for linear recurrences: diagonal, Householder-product and block-diagonal scans",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["linrec", "linrec.diagonal", "linrec.block_diagonal", "linrec.householder", "linrec.nn", "linrec.kernels",
              "linrec.csrc"],
    package_dir={
        "linrec": "python/linrec",
        "linrec.kernels": "kernels",
        "linrec.csrc": "csrc",
    },
    package_data={"linrec.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"]},
    install_requires=["torch>=2.4", "einops", "numpy"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["triton>=3.1", "pytest", "ninja", "tqdm", "matplotlib"],  # the bench and task tests run them
        "bench": ["triton>=3.1", "tqdm", "matplotlib"],
    },
)
