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


# Decoupled look-back bookkeeping, shared by the diagonal and block-diagonal scans. A launch of
# ``n_blocks x N x S`` programs (channel or block groups x sequences x chunks) owns one int32 flag
# per (chunk, sequence, group), laid out chunk-major, followed by a ticket counter, all zeroed
# before the launch. Flag values: 0 nothing published, 1 the chunk's aggregate map, 2 its inclusive
# state (the true state at the chunk's end).


@triton.jit
def lookback_ticket(sync_ptr, n_blocks, N, lookback):
    """This program's (group, sequence, chunk) coordinates.

    With ``lookback`` (a constexpr or a runtime flag) a program takes the next ticket from the
    atomic counter after the flags (``sync_ptr + num_programs``) and owns the chunk that ticket
    names; otherwise its program id names it. Tickets are chunk-major, (chunk, sequence, group), so
    every predecessor of a chunk (the earlier chunks of its sequence and group) holds a lower
    ticket: a program that waits only on predecessors waits only on programs that already run, and
    the lowest unfinished ticket waits on nothing unfinished, whatever order the GPU schedules
    programs in."""
    if lookback:
        ticket = tl.atomic_add(sync_ptr + tl.num_programs(0), 1)
    else:
        ticket = tl.program_id(0)
    return ticket % n_blocks, (ticket // n_blocks) % N, ticket // (n_blocks * N)


@triton.jit
def chunk_flag(sync_ptr, chunk, seq, group, n_blocks, N):
    """Pointer to the int32 flag of (chunk, sequence, group) (chunk-major, as tickets). Written as
    a per-(sequence, group) base plus a per-chunk stride, which the compiler keeps across a
    look-back's loop (the kernels' register budgets were set with this form)."""
    return sync_ptr + seq * n_blocks + group + chunk * (N * n_blocks)


@triton.jit
def read_flag(flag_ptr, go=None):
    """A chunk's flag read with acquire semantics (with ``go``, only where it holds: elsewhere the
    value means nothing and the caller must not use it): a reader that sees a
    value sees the payload its writer stored before publishing it (read the payload with ``.cg``
    loads, from L2, never a stale L1 line). Triton runs a scalar atomic on one thread and hands the
    value to the others through shared memory behind a barrier."""
    return tl.atomic_add(flag_ptr, 0, mask=go, sem="acquire")


@triton.jit
def set_flag(flag_ptr, value, go):
    """Sets a chunk's flag (when ``go``) after its payload: the barrier makes every thread's
    payload stores happen before the one thread that writes the flag goes on, and the release
    makes them visible to any program that reads the flag with acquire semantics."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, mask=go, sem="release")
