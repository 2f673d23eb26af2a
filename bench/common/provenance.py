"""Where a measurement was made: device, driver, versions, git SHA and time.

:func:`environment` gives the columns written into every CSV row; :func:`git_sha` is the one
helper that names the checkout's commit (the task benchmarks record it too); :func:`device_slug`
makes the device part of result file names.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from typing import Dict

import torch

from linrec.kernels import config_overrides_in_use

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_sha() -> str:
    """The checkout's commit (12 hex digits), with ``-dirty`` when tracked files have uncommitted
    changes; ``"unknown"`` outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        if not sha:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cuda_driver() -> str:
    """The NVIDIA driver version from ``nvidia-smi``, or ``"unknown"``."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    """Device name, driver, versions, git SHA, UTC time, the ``LINREC_*_CONFIG`` launch-setting
    overrides of this run (empty: the launchers' defaults) and, on the CPU, whether the cpp
    backend's outputs use huge pages (:func:`cpp_hugepages`) and come from its output cache
    (:func:`cpp_output_cache`), written into every CSV row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = cuda_driver()
        cuda = torch.version.cuda or ""
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        driver, cuda = "", ""
    return {
        "device": name,
        "driver": driver,
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel_config": config_overrides_in_use(),
        "cpp_hugepages": "" if device.type == "cuda" else cpp_hugepages(),
        "cpp_output_cache": "" if device.type == "cuda" else cpp_output_cache(),
    }


def cpp_hugepages() -> str:
    """How the cpp backend allocates its large outputs in this process: ``"on"`` (outputs of
    8 MiB or more ask for transparent huge pages, ``empty_output`` in csrc/cpu/common.h: the
    default) or ``"off"`` (``LINREC_CPP_HUGEPAGES=0``: 4 KiB pages, like PyTorch's own
    tensors). Read the way the C++ side reads it."""
    value = os.environ.get("LINREC_CPP_HUGEPAGES")
    return "off" if value in ("0", "false", "off", "no") else "on"


def cpp_output_cache() -> str:
    """Whether the cpp backend recycles its large outputs in this process: ``"on"`` (freed outputs
    of 8 MiB or more are kept and handed out again, ``OutputCache`` in csrc/cpu/common.h: the
    default) or ``"off"`` (``LINREC_CPP_CACHE_MB=0``: every large output is a fresh mapping, as
    PyTorch's own large tensors are). Read the way the C++ side reads it (an unparsable value
    leaves the cache on)."""
    value = os.environ.get("LINREC_CPP_CACHE_MB", "").strip()
    return "off" if value.isdigit() and int(value) == 0 else "on"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device label, e.g. ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}"[:60]
