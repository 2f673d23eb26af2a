"""Kernels that ``tests/test_aot_compile.py`` compiles to check the static-budget checker of
``tests/aot_compile.py`` itself: one within the budget, two that break it in known ways, and one
that keeps it only because its budget option drops the vector check."""

import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = x for n fp32 elements (x, y: (n,)), one program walking BLOCK-element tiles: with
    16-byte aligned pointers and n a multiple of 16, 128-bit loads and stores in the loop."""
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit
def cumsum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = running sums of x (n,) fp32 over one BLOCK-element tile per loop step: at BLOCK = 8192
    on one warp (256 elements a thread, and their scan) the registers run out."""
    carry = 0.0
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        sums = tl.cumsum(tl.load(x_ptr + offsets, mask=mask, other=0.0), 0) + carry
        tl.store(y_ptr + offsets, sums, mask=mask)
        carry = tl.sum(tl.where(offsets == start + BLOCK - 1, sums, 0.0), 0)


STATIC_BUDGET = {
    "copy_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr"},
    "cumsum_kernel": {"programs_per_sm": 2, "vector_of": "x_ptr"},
}

_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
_ALIGNED = {"divisible_by_16": ["x_ptr", "y_ptr", "n"]}


def aot_specs():
    """(kernel, signature, constexprs, num_warps, options): an aligned copy (within budget), the
    same copy without alignment (scalar accesses), a scan too big for one warp's registers, a
    spec left out of the budget, and the unaligned copy again with a budget option that drops the
    vector check for it (within that budget: no spills, 2 programs per SM)."""
    yield copy_kernel, _SIG, {"BLOCK": 1024}, 4, _ALIGNED
    yield copy_kernel, _SIG, {"BLOCK": 512}, 4
    yield cumsum_kernel, _SIG, {"BLOCK": 8192}, 1, _ALIGNED
    yield cumsum_kernel, _SIG, {"BLOCK": 4096}, 1, {**_ALIGNED, "budget": False}
    yield copy_kernel, _SIG, {"BLOCK": 256}, 4, {"budget": {"vector_of": None}}
