"""Compiles every Triton kernel specialisation of one ``linrec.kernels`` module for real GPU targets.

Run as ``python tests/aot_compile.py linrec.kernels.diagonal 80 90``. It needs no GPU:
Triton lowers to PTX and ptxas (shipped with Triton) assembles a cubin for each
target. The Triton interpreter accepts kernels the GPU compiler rejects, so this
is the check that the kernels CI tests on CPU also build for sm_80 and sm_90a, within the
shared memory a thread block may use there.
It must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``).
With ``PYTHONPATH`` pointing at another Triton install it checks the kernels against that
version (``tests/test_aot_compile.py`` does so for the GPU machines' Triton).

``--spills`` also runs ``ptxas -v`` on every PTX and prints, per kernel and target, the most
bytes of spill stores and loads ptxas reports for a specialisation (register spills to local
memory: a performance check, not a pass/fail one).
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


# Shared memory one thread block may use (opt-in maximum), bytes: a kernel compiled above it
# would fail to launch with "out of resources".
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes of spill stores + spill loads that ``ptxas -v`` reports for ``ptx`` (worst function)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return max((int(stores) + int(loads) for stores, loads in found), default=0)


def compile_module(module_name: str, archs, spills: dict = None) -> int:
    """Compiles every specialisation of ``module_name`` for ``archs``; returns how many.

    With ``spills`` (a dict), also records there the worst spill bytes per (kernel, arch).
    """
    module = importlib.import_module(module_name)
    count = 0
    for kernel, signature, constexprs, num_warps in module.aot_specs():
        # Constexpr arguments appear in the signature as "constexpr".
        full_signature = dict(signature)
        for name in constexprs:
            full_signature[name] = "constexpr"
        for arch in archs:
            source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            if "cubin" not in compiled.asm:
                raise RuntimeError(f"{kernel.__name__} {constexprs} produced no cubin for sm_{arch}")
            if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
                raise RuntimeError(f"{kernel.__name__} {constexprs} needs {compiled.metadata.shared} bytes of shared "
                                   f"memory on sm_{arch}, more than the {SHARED_MEMORY_LIMIT[arch]} a block may use")
            if spills is not None:
                key = (kernel.__name__, arch)
                spills[key] = max(spills.get(key, 0), spill_bytes(compiled.asm["ptx"], arch))
            count += 1
    return count


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--spills"]
    spills = {} if "--spills" in sys.argv else None
    name, *arch_args = args
    n = compile_module(name, [int(a) for a in arch_args], spills)
    print(f"compiled {n} kernel specialisations of {name} for {arch_args} with triton {triton.__version__}")
    for (kernel, arch), nbytes in sorted((spills or {}).items()):
        print(f"  {kernel} sm_{arch}: up to {nbytes} bytes of spill stores + loads")
