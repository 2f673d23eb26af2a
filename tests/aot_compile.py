"""Compiles every Triton kernel specialisation of one ``linrec.kernels`` module for real GPU targets.

Run as ``python tests/aot_compile.py linrec.kernels.diagonal 80 90``. It needs no GPU:
Triton lowers to PTX and ptxas (shipped with Triton) assembles a cubin for each
target. The Triton interpreter accepts kernels the GPU compiler rejects, so this
is the check that the kernels CI tests on CPU also build for sm_80 and sm_90a, within the
shared memory a thread block may use there.
It must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``).
With ``PYTHONPATH`` pointing at another Triton install it checks the kernels against that
version (``tests/test_aot_compile.py`` does so for the GPU machines' Triton).

A module's ``aot_specs()`` yields ``(kernel, signature, constexprs, num_warps)`` or
``(kernel, signature, constexprs, num_warps, options)``; ``options`` (a dict) may hold
``divisible_by_16``: names of the arguments the GPU launch plan passes divisible by 16 (pointers
16-byte aligned, as every torch allocation is; integers such as a channel count of 1024), which
Triton's JIT would specialise on at launch and which let loads and stores vectorise;
``compile_options``: further launch options the launcher passes (e.g. ``{"maxnreg": 255}``); and
``budget``: False to leave that specialisation out of the static budget below, or a dict whose
fields replace those of its kernel's ``STATIC_BUDGET`` entry for that specialisation alone (e.g.
``{"vector_of": None}``: no vector check where the layout makes vector accesses impossible; the
module should say why beside it).

``--spills`` also runs ``ptxas -v`` on every PTX and prints, per kernel and target, the most
bytes of spill stores and loads ptxas reports for a specialisation (register spills to local
memory: a performance check, not a pass/fail one).

``--budget`` checks the **static budget** of the module's streaming kernels at sm_90a (the GPU
machines' target), for every specialisation of the kernels the module names in its
``STATIC_BUDGET`` dict::

    STATIC_BUDGET = {"my_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr"}}

* no register spills (``ptxas -v``: 0 bytes of spill stores and loads);
* ``programs_per_sm`` programs fit on one SM at once: registers per thread (rounded up to the
  allocation unit of 8) x threads x programs <= 65536 registers, and shared memory x programs
  within an SM's 228 KB (1 KB reserved per block);
* vector global loads and stores in the streaming loops (PTX basic blocks that LLVM marks as
  inside a loop): at least ``min_vector_loads`` loads (default 1) and ``min_vector_stores`` stores
  (default 1) of at least 128 bits when the element type of the pointer argument ``vector_of``
  is 32 or 64 bits wide, at least 64 bits when it is 16 bits wide (``cp.async`` copies of 16
  bytes count as 128-bit loads). Without ``vector_of`` the vector check is left out.

The run prints one line per budgeted specialisation (with the fields a specialisation overrides)
and exits with status 1 if any breaks it.
"""

import importlib
import multiprocessing
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
# Per SM at sm_90a: 64 K 32-bit registers, 228 KB shared memory of which each resident block
# reserves 1 KB for the system.
REGISTERS_PER_SM = 65536
SHARED_MEMORY_PER_SM = 228 * 1024
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
REGISTER_ALLOCATION_UNIT = 8  # registers per thread are allocated in multiples of 8
BUDGET_ARCH = 90


def ptxas_report(ptx: str, arch: int) -> dict:
    """``ptxas -v`` on ``ptx``: {"spill_bytes": spill stores + loads, "registers": per thread}
    (worst function of the module)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    registers = re.findall(r"Used (\d+) registers", result.stderr)
    return {"spill_bytes": max((int(stores) + int(loads) for stores, loads in spills), default=0),
            "registers": max((int(r) for r in registers), default=0)}


def spill_bytes(ptx: str, arch: int) -> int:
    """Bytes of spill stores + spill loads that ``ptxas -v`` reports for ``ptx`` (worst function)."""
    return ptxas_report(ptx, arch)["spill_bytes"]


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global\.(?:[a-z0-9]+\.)*?(?:v(\d)\.)?[bfsu](\d+)\b")
# cp.async.cg.shared.global [dst], [src], 0x10[, src-size];  (Triton's pipelined loads)
_ASYNC_COPY = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def loop_global_accesses(ptx: str) -> dict:
    """Global memory instructions of ``ptx`` inside loops, by kind and width in bits:
    {("ld" | "st", bits): count}. A line is inside a loop when its basic block's label carries
    LLVM's loop comment (``=>This Loop Header`` or ``in Loop: Header=...``)."""
    counts = {}
    in_loop = False
    label_comment = False  # reading the comment lines that follow a block label
    for line in ptx.splitlines():
        stripped = line.strip()
        if re.match(r"\$L__BB\d+_\d+:", stripped):
            in_loop = "Loop" in stripped
            label_comment = True
            continue
        if label_comment and stripped.startswith("//"):
            in_loop = in_loop or "Loop" in stripped
            continue
        label_comment = False
        if not in_loop or stripped.startswith("//"):
            continue
        access = _GLOBAL_ACCESS.search(stripped)
        if access is not None and "atom" not in stripped:
            kind, lanes, bits = access.group(1), int(access.group(2) or 1), int(access.group(3))
            key = (kind, lanes * bits)
            counts[key] = counts.get(key, 0) + 1
        copy = _ASYNC_COPY.search(stripped)
        if copy is not None:
            key = ("ld", 8 * int(copy.group(1), 0))
            counts[key] = counts.get(key, 0) + 1
    return counts


_ELEMENT_BITS = {"fp64": 64, "i64": 64, "u64": 64, "fp32": 32, "i32": 32, "u32": 32, "bf16": 16, "fp16": 16,
                 "i16": 16, "fp8e4nv": 8, "fp8e5": 8, "i8": 8}


def required_vector_bits(element: str) -> int:
    """Widest access a streaming loop must use for elements of Triton type ``element`` ("fp32")."""
    return 128 if _ELEMENT_BITS[element] >= 32 else 64


BUDGET_FIELDS = ("programs_per_sm", "vector_of", "min_vector_loads", "min_vector_stores")


def spec_budget(kernel_budget, option):
    """The budget one specialisation is held to: None when its kernel has none (``kernel_budget``
    None) or its ``budget`` option is False; else the kernel's ``STATIC_BUDGET`` entry with the
    fields of ``option`` (a dict) replacing its own (True / absent: the entry as it is). A field
    not among ``BUDGET_FIELDS`` raises ValueError (a misspelt override would check nothing)."""
    if kernel_budget is None or option is False:
        return None
    if option is True:
        return dict(kernel_budget)
    if not isinstance(option, dict):
        raise ValueError(f"a specialisation's budget option must be True, False or a dict, not {option!r}")
    unknown = sorted(set(option) - set(BUDGET_FIELDS))
    if unknown:
        raise ValueError(f"unknown static-budget fields {unknown}; known: {list(BUDGET_FIELDS)}")
    return {**kernel_budget, **option}


def budget_violations(budget: dict, signature: dict, num_warps: int, shared: int, report: dict,
                      accesses: dict) -> list:
    """What one specialisation breaks of its kernel's ``budget`` (an empty list: nothing)."""
    broken = []
    if report["spill_bytes"] > 0:
        broken.append(f"{report['spill_bytes']} bytes of spill stores + loads")
    programs = budget.get("programs_per_sm", 1)
    threads = 32 * num_warps
    registers = -(-report["registers"] // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    if registers * threads * programs > REGISTERS_PER_SM:
        broken.append(f"{report['registers']} registers x {threads} threads x {programs} programs > {REGISTERS_PER_SM}")
    if (shared + SHARED_MEMORY_RESERVED_PER_BLOCK) * programs > SHARED_MEMORY_PER_SM:
        broken.append(f"{shared} bytes of shared memory x {programs} programs > {SHARED_MEMORY_PER_SM}")
    if budget.get("vector_of") is not None:
        element = signature[budget["vector_of"]].lstrip("*")
        bits = required_vector_bits(element)
        for kind, minimum in (("ld", budget.get("min_vector_loads", 1)), ("st", budget.get("min_vector_stores", 1))):
            wide = sum(n for (k, width), n in accesses.items() if k == kind and width >= bits)
            if wide < minimum:
                broken.append(f"{wide} global {kind} of >= {bits} bits in loops (needs {minimum}; "
                              f"in loops: {sorted((w, n) for (k, w), n in accesses.items() if k == kind)})")
    return broken


def _spec_parts(spec):
    kernel, signature, constexprs, num_warps, *rest = spec
    return kernel, signature, constexprs, num_warps, (rest[0] if rest else {})


def _compile_job(job):
    """One (specialisation, arch) compile in a worker; returns (kernel name, arch, spill bytes or None,
    budget entry or None), the entry as (kernel, constexprs described, num_warps, registers, violations)."""
    module_name, index, arch, want_spills, want_budget = job
    module = importlib.import_module(module_name)
    budgets = getattr(module, "STATIC_BUDGET", {})
    kernel, signature, constexprs, num_warps, options = _spec_parts(list(module.aot_specs())[index])
    # Constexpr arguments appear in the signature as "constexpr".
    full_signature = dict(signature)
    for name in constexprs:
        full_signature[name] = "constexpr"
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in options.get("divisible_by_16", ())}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, **options.get("compile_options", {})})
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{kernel.__name__} {constexprs} produced no cubin for sm_{arch}")
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
        raise RuntimeError(f"{kernel.__name__} {constexprs} needs {compiled.metadata.shared} bytes of shared "
                           f"memory on sm_{arch}, more than the {SHARED_MEMORY_LIMIT[arch]} a block may use")
    budget = None
    if want_budget and arch == BUDGET_ARCH:
        budget = spec_budget(budgets.get(kernel.__name__), options.get("budget", True))
    report = ptxas_report(compiled.asm["ptx"], arch) if want_spills or budget is not None else None
    entry = None
    if budget is not None:
        violations = budget_violations(budget, signature, num_warps, compiled.metadata.shared,
                                       report, loop_global_accesses(compiled.asm["ptx"]))
        described = _describe(constexprs)
        if isinstance(options.get("budget"), dict):  # the fields this specialisation overrides
            described += "; budget " + _describe(options["budget"])
        entry = (kernel.__name__, described, num_warps, report["registers"], violations)
    return kernel.__name__, arch, report["spill_bytes"] if want_spills else None, entry


def compile_module(module_name: str, archs, spills: dict = None, budget: list = None) -> int:
    """Compiles every specialisation of ``module_name`` for ``archs``; returns how many.

    The compiles run in ``LINREC_AOT_JOBS`` worker processes (default: one per CPU core; each
    compile is single-threaded Python and ptxas work). With ``spills`` (a dict), also records
    there the worst spill bytes per (kernel, arch). With ``budget`` (a list), checks the module's
    ``STATIC_BUDGET`` at sm_90a (when 90 is among ``archs``) and appends one (kernel name,
    constexprs described, num_warps, registers, violations) per budgeted specialisation.
    """
    module = importlib.import_module(module_name)
    jobs = [(module_name, index, arch, spills is not None, budget is not None)
            for index in range(len(list(module.aot_specs()))) for arch in archs]
    workers = max(1, min(len(jobs), int(os.environ.get("LINREC_AOT_JOBS", os.cpu_count() or 1))))
    if workers == 1:
        results = [_compile_job(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_compile_job, jobs, chunksize=1)
    for kernel_name, arch, spill_bytes, entry in results:
        if spills is not None:
            key = (kernel_name, arch)
            spills[key] = max(spills.get(key, 0), spill_bytes)
        if budget is not None and entry is not None:
            budget.append(entry)
    return len(results)


def _describe(constexprs: dict) -> str:
    return ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("--spills", "--budget")]
    spills = {} if "--spills" in sys.argv else None
    budget = [] if "--budget" in sys.argv else None
    name, *arch_args = args
    n = compile_module(name, [int(a) for a in arch_args], spills, budget)
    print(f"compiled {n} kernel specialisations of {name} for {arch_args} with triton {triton.__version__}")
    for (kernel, arch), nbytes in sorted((spills or {}).items()):
        print(f"  {kernel} sm_{arch}: up to {nbytes} bytes of spill stores + loads")
    if budget is not None:
        failed = [entry for entry in budget if entry[4]]
        print(f"static budget at sm_90a: {len(budget)} streaming specialisations checked, {len(failed)} over budget")
        for kernel, constexprs, num_warps, registers, violations in budget:
            verdict = "over budget: " + "; ".join(violations) if violations else "within budget"
            print(f"  budget {kernel} [{constexprs}] {num_warps} warps, {registers} registers: {verdict}")
        if failed:
            sys.exit(1)
