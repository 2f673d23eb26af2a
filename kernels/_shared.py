"""Triton helpers that more than one kernel family calls (no kernels of its own, no ``aot_specs``)."""

import triton
import triton.language as tl


@triton.jit
def saturate(product):
    """A product of transition coefficients (or of b x b transitions, entry by entry), clamped to a
    finite range; NaN stays NaN.

    A product that overflows (|a| > 1, or a growing block, over a whole tile or chunk) would meet a
    zero state or a zero input as inf * 0 = NaN, where the sequential loop is exact (0); saturated,
    it gives the loop's zeros. Where the true product is out of range, so is the state."""
    if product.dtype == tl.float64:
        bound = 1e300
    else:
        bound = 3.0e38
    return tl.clamp(product, -bound, bound, propagate_nan=tl.PropagateNan.ALL)
