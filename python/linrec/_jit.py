"""The lazily built C++/CUDA extensions: one loader that ``linrec._cpp`` and ``linrec._cuda`` share.

Each compiled backend is a ``torch.utils.cpp_extension.load`` build (ninja) made the first time the
backend is used in a process, never at import, and cached in PyTorch's extension directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) across processes. What the two
backends share lives here, in ``JitExtension``:

* the availability question (``unavailable_reason``): the backend's ``LINREC_DISABLE_*`` flag,
  then its own probes (a compiler, a CUDA device, ...), then ninja, then an earlier failed build.
  Once the module is loaded the probes are skipped: ``is_ninja_available`` runs a subprocess, and
  ``backend="auto"`` on the CPU asks this question on every op call;
* the build itself (``load``): at most one build per process (a lock, then the cached module), an
  optional one-line message on stderr when no cached build exists, and a failure remembered, so
  that later calls say why at once instead of compiling again.

The backend module keeps what is its own: its probes, sources, flags and the words of its messages.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than empty / 0 / false / no / off."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a compiler's error is many lines), or its repr."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else repr(error)


def find_sources(subdir: str, marker: str, what: str) -> Path:
    """The folder ``csrc/<subdir>`` of the sources: inside the installed package (``linrec/csrc``,
    shipped as package data) or, in a source checkout, at the repository root.

    Args:
        subdir: "" for ``csrc/`` itself, else a folder under it (``"cpu"``).
        marker: a file that must be in the folder (one of the build's sources).
        what: how the error names the sources, e.g. ``"C++ sources (csrc/cpu/)"``.
    """
    try:
        spec = importlib.util.find_spec("linrec.csrc")
    except (ImportError, ValueError):
        spec = None
    candidates = [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")  # python/linrec/_jit.py -> repo root
    for csrc in candidates:
        if (csrc / subdir / marker).is_file():
            return csrc / subdir
    raise RuntimeError(f"linrec's {what} were not found next to the package; reinstall linrec")


@dataclass
class BuildSpec:
    """One build of an extension: what ``torch.utils.cpp_extension.load`` gets, and what to say.

    Attributes:
        load_kwargs: keyword arguments of ``cpp_extension.load`` (``name``, ``sources``, flags, ...),
            without ``verbose`` (the loader sets it from the backend's ``*_VERBOSE`` variable).
        failed: the RuntimeError's text when the build fails; ``{error}`` stands for the exception.
        announce: the one-line message printed on stderr before a build that finds nothing cached,
            with ``{where}`` for the build folder; None prints nothing.
    """

    load_kwargs: Dict[str, Any]
    failed: str
    announce: Optional[str] = None


def _cached_build(name: str) -> Tuple[Optional[Path], bool]:
    """(build folder, whether a built module of that name is in it); (None, False) when unknown."""
    from torch.utils import cpp_extension

    try:  # a private helper of torch: it only decides whether to print the message
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        return build_dir, any(build_dir.glob(f"{name}*.so")) or any(build_dir.glob(f"{name}*.pyd"))
    except Exception:
        return None, False


class JitExtension:
    """The state of one lazily built extension in this process: the module once loaded, the error
    of a failed build, and the lock that makes concurrent first calls build once.

    Args:
        label: what the messages call it, e.g. ``"CPU extension"``.
        disable_env: the variable that turns the backend off (``LINREC_DISABLE_CPP``).
        verbose_env: the variable that shows the compiler's output (``LINREC_CPP_VERBOSE``).
    """

    def __init__(self, label: str, *, disable_env: str, verbose_env: str):
        self.label = label
        self.disable_env = disable_env
        self.verbose_env = verbose_env
        self.module = None
        self.build_error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def unavailable_reason(self, probe: Callable[[], Optional[str]]) -> Optional[str]:
        """Why the backend cannot run in this process (one line), or None when it can.

        ``probe`` is the backend's own check (compiler, toolkit, device), returning a reason or
        None; it runs only while nothing is loaded. Cheap and side-effect free: it builds nothing.
        """
        if env_flag(self.disable_env):
            return f"{self.disable_env} is set"
        if self.module is not None:  # built or loaded already: skip the probes (ninja's is a subprocess)
            return None
        reason = probe()
        if reason is not None:
            return reason
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja is not installed (pip install ninja), which the JIT build needs"
        if self.build_error is not None:
            return f"building the {self.label} failed earlier in this process: {first_line(self.build_error)}"
        return None

    def load(self, unavailable_reason: Callable[[], Optional[str]], unavailable: str,
             spec: Callable[[], BuildSpec]):
        """Builds (first use) or loads (cached) the extension and returns the module.

        Args:
            unavailable_reason: the backend's availability check (looked up by the caller at call
                time, so a test may stand one in).
            unavailable: the RuntimeError's text when it gives a reason; ``{reason}`` stands for it.
            spec: makes the ``BuildSpec``; called under the lock, only when a build is needed.

        Raises RuntimeError saying why when the backend is unavailable or the build fails.
        """
        if self.module is not None:
            return self.module
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(unavailable.format(reason=reason))
        with self._lock:
            if self.module is not None:  # another thread built it while this one waited
                return self.module
            from torch.utils import cpp_extension

            build = spec()
            if build.announce is not None:
                where, cached = _cached_build(build.load_kwargs["name"])
                if not cached:
                    print(build.announce.format(where=where or "the torch extension dir"), file=sys.stderr,
                          flush=True)
            try:
                self.module = cpp_extension.load(**build.load_kwargs, verbose=env_flag(self.verbose_env))
            except Exception as exc:  # the compiler's output is in the exception / the verbose log
                self.build_error = exc
                raise RuntimeError(build.failed.format(error=exc)) from exc
        return self.module
