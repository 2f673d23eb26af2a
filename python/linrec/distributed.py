"""Context (sequence) parallelism: the four scans with time split over the ranks of a process group.

Rank r of ``group`` holds the r-th contiguous slice of the time axis (slices may differ in length,
and may be empty). Every tensor with a time axis is the rank's slice; ``initial_state`` (the state
before the whole sequence) and ``cu_seqlens`` (global offsets over the concatenated time axis) are
the same on every rank. Each op returns the rank's slice of what the single-device op returns on
the concatenation (``householder_scan``'s and ``selective_scan``'s ``final_state``: the whole
sequence's, on every rank; for a reverse scan the state at t = 0, as the single-device op returns).

How (docs/design.md section 7, the two-level scan, with ranks as the pieces):

1. **Layout.** One small all-gather of a fixed-size integer descriptor per rank (slice length,
   the non-time shapes, a checksum of ``cu_seqlens``, flags, and whether the rank's own argument
   checks failed). Every rank checks the same gathered table, so a mismatch (B / D / H / K across
   ranks, different ``cu_seqlens``, offsets that do not end at the global length, a rank whose
   input the single-device checks reject) raises a ``ValueError`` on every rank, never a hang.
2. **Summary.** Only one piece of a slice can hand a state to another rank: the piece that
   reaches the slice's end (``reverse``: its start), i.e. the whole slice without ``cu_seqlens``
   and the part of one sequence with it. The rank writes that piece's affine map
   ``state_out = P state_in + s``: diagonal, P the product of ``a`` (D,) and s the end state from
   zero; block-diagonal, P the ordered product of the b x b blocks (a pairwise product tree) and
   s; Householder, per head, the K x K transition M and the K x V end state s, both from one call
   of the single-device op (chunked WY form, any backend) on ``v`` widened by K zero columns from
   the initial state ``[I_K | 0]``: its final state is ``[M | s]``; selective (Mamba), per
   (d, n), P = exp(A sum_t dt_t) in closed form (with negative eigenvalues, the product of
   2 exp(dt_t A) - 1, from the same op call on a second copy of the rows with x = 0 and state 1)
   and s the op's final state from zero.
3. **Exchange.** One all-gather of the summaries: (world, 2, B', D), (world, B', G, b, b + 1) or
   (world, B', H, K, K + V), (world, 2, B', D, N) with B' = B, or 1 with ``cu_seqlens`` -- O(world x state) bytes per
   rank, independent of T and of the number of packed sequences.
4. **Compose.** Each rank folds its predecessors' maps (successors' for ``reverse``) into the
   initial state of the sequences they belong to, giving the state entering every sequence's
   piece on this rank (a sequence that starts inside the slice keeps its own initial state).
5. **Scan.** The single-device op runs on the slice with that entering state and the slice's
   local offsets ``clip(cu_seqlens - start, 0, T_r)``.
6. **Final state** (when asked for). The rank whose scan ends a sequence (holds its last
   position; ``reverse``: its first) contributes its local final state, the others zeros; one
   all-reduce gives every rank every sequence's final state.

Gradients: the exchange is an autograd function whose backward all-reduces the gradient of the
gathered summaries and keeps the rank's own row (the reverse exchange), so every gradient of
every input equals the single-device one. Inputs that are the same on every rank (the initial
state, a coefficient without a time axis) get on each rank the part of the gradient that flows
through that rank's use of them; their sum over the group is the single-device gradient, which is
what the gradient all-reduce of DDP or FSDP over the group forms for parameters. The same holds
for the loss: the group's loss is the sum of the ranks' losses, and a ``final_state`` used in
several ranks' losses gets the sum of those gradients. Backward runs collectives: every rank must
backpropagate through its output if one does (as any rank does that trains with the others).

Only ``torch.distributed`` moves data (gloo on CPU tensors, NCCL on CUDA tensors), and only
through collectives NCCL runs on device tensors: ``all_gather_into_tensor`` (fallback: the list
form of ``all_gather``) and ``all_reduce`` with SUM, on int64 / fp32 / fp64 / bf16 / fp16 tensors
(complex ones travel as real pairs). No object collective, no point-to-point, no barrier; the
layout descriptor is gathered as a device tensor and read back to the host (one small sync).
"""

from __future__ import annotations

import bisect
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import linrec

__all__ = ["diagonal_scan", "block_diagonal_scan", "householder_scan", "selective_scan", "SliceLayout",
           "slice_layout"]

# Bytes this process has put into collectives (all-gather: its own contribution; all-reduce: its
# buffer), by kind; bench/distributed.py reads and resets it. Layout descriptors count as "layout".
traffic = {"layout": 0, "summaries": 0, "backward": 0}

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.complex128)


# ----------------------------------------------------------------------------------------------
# Collectives with autograd
# ----------------------------------------------------------------------------------------------
def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensors live: the CPU for gloo, the tensors' device otherwise (NCCL)."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def _all_gather_raw(t: Tensor, group, kind: str = "summaries") -> Tensor:
    """(world, *t.shape): every rank's t, in rank order. No autograd. Complex goes as real pairs."""
    traffic[kind] += t.numel() * t.element_size()
    world = dist.get_world_size(group)
    device = t.device
    src = torch.view_as_real(t) if t.is_complex() else t
    src = src.to(_comm_device(group, device)).contiguous()
    out = src.new_empty((world,) + tuple(src.shape))
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        gather_single(out, src, group=group)
    except (RuntimeError, NotImplementedError, ValueError):  # a backend without it
        dist.all_gather(list(out.unbind(0)), src, group=group)
    out = out.to(device)
    return torch.view_as_complex(out) if t.is_complex() else out


def _all_reduce_raw(t: Tensor, group, kind: str = "summaries") -> Tensor:
    """The sum over the group of every rank's t (a new tensor). No autograd."""
    traffic[kind] += t.numel() * t.element_size()
    device = t.device
    src = torch.view_as_real(t) if t.is_complex() else t
    buf = src.to(_comm_device(group, device), copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    buf = buf.to(device)
    return torch.view_as_complex(buf) if t.is_complex() else buf


class _AllGather(torch.autograd.Function):
    """(world, *t.shape) from every rank's t; backward: all-reduce the gradient, keep this rank's row.

    ``anchors`` are inputs the result should depend on for autograd only (so that a rank whose
    summary is a constant, an empty slice, still takes part in the backward's collective).
    """

    @staticmethod
    def forward(ctx, group, t: Tensor, *anchors: Tensor) -> Tensor:
        ctx.group, ctx.n_anchors = group, len(anchors)
        return _all_gather_raw(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = _all_reduce_raw(grad, ctx.group, "backward")[dist.get_rank(ctx.group)]
        return (None, g) + (None,) * ctx.n_anchors


class _AllReduce(torch.autograd.Function):
    """Sum over the group; backward: the sum of the ranks' gradients (every rank used the sum)."""

    @staticmethod
    def forward(ctx, group, t: Tensor) -> Tensor:
        ctx.group = group
        return _all_reduce_raw(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, _all_reduce_raw(grad, ctx.group, "backward")


class _Tie(torch.autograd.Function):
    """Returns ``out`` unchanged; makes the backward of ``out`` also reach ``others`` (with zeros).

    The backward of a collective must run on every rank. A rank that does not use a gathered
    tensor (rank 0 needs no predecessor) or a reduced one (a final state its loss ignores) ties it
    to what it does use, so that its backward runs the collective whenever the others' do.
    """

    @staticmethod
    def forward(ctx, out: Tensor, *others: Tensor) -> Tensor:
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes)


# ----------------------------------------------------------------------------------------------
# Layout: slice lengths, checked descriptors, pieces of packed sequences
# ----------------------------------------------------------------------------------------------
def _rank_and_world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("linrec.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or launch with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


class SliceLayout:
    """Where every rank's slice lies on the global time axis, and what that means for packed sequences.

    Attributes:
        rank, world: this rank and the group's size.
        lengths: T_j of every rank's slice; starts: their global offsets; total: sum of lengths.
        cu: the global offsets as Python ints (N + 1), or None (every sequence spans all of time).
        num_seqs: N (B without cu_seqlens).
    """

    def __init__(self, rank: int, lengths: Sequence[int], cu: Optional[List[int]], num_seqs: int):
        self.rank, self.world = rank, len(lengths)
        self.lengths = list(lengths)
        self.starts = [sum(self.lengths[:j]) for j in range(self.world)]
        self.total = sum(self.lengths)
        self.cu, self.num_seqs = cu, num_seqs

    @property
    def length(self) -> int:
        return self.lengths[self.rank]

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    def seq_at(self, pos: int) -> int:
        """The (non-empty) sequence holding global position ``pos`` (cu_seqlens given)."""
        return bisect.bisect_right(self.cu, pos) - 1

    def boundary(self, j: int, reverse: bool) -> Tuple[Optional[int], int, int]:
        """The piece of rank j's (non-empty) slice that hands its state on to other ranks.

        Returns (sequence, lo, hi): the local time range [lo, hi) of that piece and its
        sequence index, or None for "every row" without cu_seqlens (the whole slice).
        """
        T_j, s_j = self.lengths[j], self.starts[j]
        if self.cu is None:
            return None, 0, T_j
        if reverse:
            n = self.seq_at(s_j)
            return n, 0, min(self.cu[n + 1] - s_j, T_j)
        n = self.seq_at(s_j + T_j - 1)
        return n, max(self.cu[n] - s_j, 0), T_j

    def local_cu(self, like: Tensor) -> Tensor:
        """(N + 1,) this slice's offsets ``clip(cu - start, 0, T_r)``, like cu_seqlens' dtype and device."""
        vals = [min(max(c - self.start, 0), self.length) for c in self.cu]
        return torch.tensor(vals, dtype=like.dtype, device=like.device)

    def owners(self, reverse: bool = False) -> List[int]:
        """For every sequence, the rank whose scan ends it: the rank holding its last position (its
        first with ``reverse``, where the scan ends at t = 0); rank 0 for an empty sequence."""
        if self.cu is None:
            nonempty = [j for j in range(self.world) if self.lengths[j] > 0]
            return [(nonempty[0] if reverse else nonempty[-1]) if nonempty else 0] * self.num_seqs
        out = []
        for n in range(self.num_seqs):
            if self.cu[n + 1] == self.cu[n]:
                out.append(0)
            else:
                pos = self.cu[n] if reverse else self.cu[n + 1] - 1
                out.append(bisect.bisect_right(self.starts, pos) - 1)
                while self.lengths[out[-1]] == 0:  # empty slices share their start with the next one
                    out[-1] -= 1
        return out

    def predecessors(self, reverse: bool) -> List[int]:
        """The non-empty ranks whose maps feed this one, in the order they apply."""
        order = range(self.rank + 1, self.world)[::-1] if reverse else range(self.rank)
        return [j for j in order if self.lengths[j] > 0]


def _checksum(values: Sequence[int]) -> int:
    """A 62-bit checksum of a list of ints, the same in every process."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 62)
    return h


def _exchange_layout(op: str, group, device: torch.device, T_r: int, fields: List[Tuple[str, int]],
                     cu: Optional[List[int]], num_seqs: int, error: Optional[BaseException]) -> SliceLayout:
    """One all-gather of every rank's descriptor; the same checks on every rank; raises on all or none.

    ``fields`` are (name, value) pairs that must agree across ranks; their number must be the same
    on every rank for a given op (a rank whose checks failed sends zeros).
    """
    rank, world = _rank_and_world(group)
    vec = [1 if error is not None else 0, T_r] + [int(v) for _, v in fields]
    table = _all_gather_raw(torch.tensor(vec, dtype=torch.int64, device=device), group, "layout").tolist()
    bad = [j for j in range(world) if table[j][0]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"linrec.distributed.{op}: rank(s) {bad} of the group rejected their input "
                         f"(their error says why); no rank ran the scan")
    for i, (name, _) in enumerate(fields):
        values = [table[j][2 + i] for j in range(world)]
        if len(set(values)) > 1 and name.endswith("(checksum)"):
            raise ValueError(f"linrec.distributed.{op}: {name[:-len(' (checksum)')]} must be the same on every "
                             f"rank of the group; ranks {[j for j in range(world) if values[j] != values[0]]} "
                             f"differ from rank 0")
        if len(set(values)) > 1:
            raise ValueError(f"linrec.distributed.{op}: {name} must be the same on every rank of the group, "
                             f"got {values} on ranks 0..{world - 1}")
    lengths = [table[j][1] for j in range(world)]
    if cu is not None:
        total = sum(lengths)
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"linrec.distributed.{op}: cu_seqlens must start at 0, be non-decreasing and end at "
                             f"the global length {total} (the sum of the slices {lengths}), got {cu}")
    return SliceLayout(rank, lengths, cu, num_seqs)


def _cu_fields(cu_seqlens) -> Tuple[Optional[List[int]], List[Tuple[str, int]]]:
    if cu_seqlens is None:
        return None, [("cu_seqlens given", 0), ("len(cu_seqlens)", 0), ("cu_seqlens (checksum)", 0)]
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError("cu_seqlens must be a 1-D int32/int64 tensor of global offsets")
    cu = [int(c) for c in cu_seqlens.tolist()]
    return cu, [("cu_seqlens given", 1), ("len(cu_seqlens)", len(cu)), ("cu_seqlens (checksum)", _checksum(cu))]


def _prepare(op: str, group, lead, T_r: int, validate: Callable[[], List[Tuple[str, int]]], cu_seqlens,
             n_fields: int) -> SliceLayout:
    """Runs the local checks (catching their error), then the layout exchange.

    lead: the op's first tensor argument (B, T_r, ...) (x, or q; anything where the checks will
    reject it): its device carries the exchange (the CPU if it is no tensor), and N = B without
    cu_seqlens, else len(cu_seqlens) - 1.
    """
    error, fields, cu = None, None, None
    device = lead.device if isinstance(lead, Tensor) else torch.device("cpu")
    try:
        cu, cu_fields = _cu_fields(cu_seqlens)
        fields = validate() + cu_fields
        n = lead.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    except Exception as e:  # noqa: BLE001 -- re-raised on this rank after the exchange, a ValueError elsewhere
        error, n = e, 0
    if fields is None or len(fields) != n_fields:
        fields = [("?", 0)] * n_fields
    return _exchange_layout(op, group, device, T_r, fields, cu, n, error)


def _slice_time(t: Optional[Tensor], axis: int, T_r: int, lo: int, hi: int) -> Optional[Tensor]:
    """t[..., lo:hi, ...] along ``axis`` when t has this rank's time axis there (size T_r), else t
    (a coefficient broadcast over time)."""
    if t is None or axis < 0 or t.shape[axis] != T_r:
        return t
    return t.narrow(axis, lo, hi - lo)


def _check_backend(family: str, backend: str, x: Tensor) -> None:
    """Raises where the single-device op would refuse ``backend`` for x's device (checked before any
    collective, so that every rank hears of it). The shapes and dtypes are checked by a zero-length
    call of the op with the reference backend, which launches no kernel."""
    import importlib
    from ._common import resolve_backend
    op = importlib.import_module(f"linrec.{family}.op")
    resolve_backend(backend, x.device, available=op.AVAILABLE_BACKENDS)


def _dtype_code(t: Tensor) -> int:
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1


def _acc(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float64, torch.complex128):
        return dtype
    return torch.complex64 if dtype.is_complex else torch.float32


def _entering(layout: SliceLayout, summaries: Tensor, init: Tensor, reverse: bool,
              apply: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The state entering every sequence's piece on this rank.

    summaries: (world, B', ...) gathered maps; init: (N, ...) the initial states (accumulation dtype);
    apply(summary_j, state_rows) -> new rows, with summary_j (B', ...) and state_rows (B', ...).
    """
    E = init
    for j in layout.predecessors(reverse):
        seq = layout.boundary(j, reverse)[0]
        if seq is None:
            E = apply(summaries[j], E)
        else:
            row = apply(summaries[j], E[seq:seq + 1])
            mask = torch.arange(E.shape[0], device=E.device) == seq
            E = torch.where(mask.view((-1,) + (1,) * (E.dim() - 1)), row, E)
    return E


def _gather_final(layout: SliceLayout, local_final: Tensor, group, reverse: bool = False) -> Tensor:
    """The whole sequence's final state on every rank from the ranks that hold each sequence's end
    (``reverse``: its start, where a reverse scan ends).

    local_final: (N, ...) the final states of this rank's local scan. Returns (N, ...).
    """
    mine = torch.tensor([o == layout.rank for o in layout.owners(reverse)], device=local_final.device)
    contribution = torch.where(mine.view((-1,) + (1,) * (local_final.dim() - 1)), local_final, 0)
    return _AllReduce.apply(group, contribution)


def _local_final_states(h: Tensor, local_cu: Optional[Tensor], E: Tensor, reverse: bool) -> Tensor:
    """Where this rank's scan leaves every sequence: the state at its last local position (its first
    with ``reverse``: a reverse scan ends at t = 0), or the entering state E for a sequence with no
    position on this rank.

    h: (B, T_r, *S) the local scan's states; local_cu: (N + 1,) local offsets or None; E: (N, *S).
    Returns (N, *S) in h's dtype.
    """
    from .nn._common import final_states
    if not reverse:
        return final_states(h, local_cu, E)
    N = E.shape[0]
    if h.shape[1] == 0:
        return E.to(h.dtype)
    if local_cu is None:
        return h[:, 0]
    starts = local_cu[:-1].long()
    empty = (local_cu[1:].long() == starts).view((N,) + (1,) * (h.dim() - 2))
    return torch.where(empty, E.to(h.dtype), h[0, starts.clamp_max(h.shape[1] - 1)])


def _exchange(group, summary: Tensor, anchors: Sequence[Optional[Tensor]]) -> Tensor:
    return _AllGather.apply(group, summary, *[a for a in anchors if isinstance(a, Tensor)])


def _compose_and_scan(layout: SliceLayout, group, summary: Tensor, anchors: Sequence[Optional[Tensor]],
                      initial_state: Optional[Tensor], state_shape: Sequence[int], reverse: bool,
                      apply: Callable[[Tensor, Tensor], Tensor], cu_seqlens: Optional[Tensor],
                      scan: Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, Optional[Tensor]]], empty_out: Tensor,
                      output_final_state: bool, out_is_states: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Steps 3 to 6 of every family (the module docstring): exchange the summaries, compose the state
    entering this slice, scan the slice from it, and gather the final state.

    Args:
        summary: this rank's map (B', ...) in the accumulation dtype (the identity for an empty
            slice); anchors: the inputs it depends on (see ``_AllGather``).
        initial_state: (N, *S) or None (zeros); state_shape: (N, *S). The states are composed in
            the summary's dtype (the accumulation dtype), on its device.
        apply: ``apply(summary_j, state_rows)`` as in ``_entering``.
        scan: ``scan(E, local_cu) -> (out, local_final)``, the single-device op on this (non-empty)
            slice from the entering states E (N, *S) with the slice's local offsets; local_final
            (N, *S) may be None where ``out_is_states``.
        empty_out: the (empty) output of an empty slice, which runs no kernel.
        out_is_states: out holds the states (B, T_r, *S) (diagonal, block-diagonal), whose op
            returns no final state: it is read from them (``_local_final_states``).

    Returns:
        (out, final_state (N, *S) on every rank, or None unless output_final_state).
    """
    gathered = _exchange(group, summary, anchors)
    acc = summary.dtype
    init = (initial_state.to(acc) if initial_state is not None
            else summary.new_zeros(tuple(state_shape), dtype=acc))
    E = _Tie.apply(_entering(layout, gathered, init, reverse, apply), gathered)
    local_cu = None if cu_seqlens is None else layout.local_cu(cu_seqlens)
    if layout.length > 0:
        out, local_final = scan(E, local_cu)
    else:  # an empty slice runs no kernel; its (empty) output still leads back to the exchange
        out, local_final = _Tie.apply(empty_out, E), E
    if not output_final_state:
        return out, None
    if out_is_states:
        local_final = _local_final_states(out, local_cu, E, reverse).to(acc)
    final = _gather_final(layout, local_final, group, reverse)
    return _Tie.apply(out, final), final


# ----------------------------------------------------------------------------------------------
# Diagonal
# ----------------------------------------------------------------------------------------------
def _diagonal(a, x, initial_state, group, reverse, cu_seqlens, backend, output_final_state):
    T_r = x.shape[1] if isinstance(x, Tensor) and x.dim() == 3 else 0

    def validate():
        with torch.no_grad():  # the single-device checks, on a zero-length slice (costs nothing)
            a_axis = a.dim() - 2 if isinstance(a, Tensor) else -1
            local_cu = None if cu_seqlens is None else torch.zeros_like(cu_seqlens)
            linrec.diagonal_scan(_slice_time(a, a_axis, T_r, 0, 0), x[:, :0], initial_state, reverse=reverse,
                                 cu_seqlens=local_cu, backend="reference")
        _check_backend("diagonal", backend, x)
        return [("B", x.shape[0]), ("D", x.shape[2]), ("x dtype", _dtype_code(x)), ("reverse", int(reverse)),
                ("initial_state given", int(initial_state is not None))]

    layout = _prepare("diagonal_scan", group, x, T_r, validate, cu_seqlens, 8)
    B, _, D = x.shape
    acc = _acc(x.dtype)
    a_axis = a.dim() - 2
    rows = B if cu_seqlens is None else 1
    if T_r > 0:
        _, lo, hi = layout.boundary(layout.rank, reverse)
        a_p = _slice_time(a, a_axis, T_r, lo, hi)
        h_p = linrec.diagonal_scan(a_p, x[:, lo:hi].to(acc), None, reverse=reverse, backend=backend)
        end = h_p[:, 0] if reverse else h_p[:, -1]                                     # (B', D)
        a_acc = a_p.to(acc)
        if a_axis >= 0 and a_p.shape[a_axis] == hi - lo and hi - lo > 1:
            prod = torch.broadcast_to(a_acc, (rows, hi - lo, D)).prod(dim=1)          # (B', D)
        else:  # no time axis: a^L
            prod = torch.broadcast_to(a_acc, (rows, 1, D))[:, 0] ** (hi - lo)
        summary = torch.stack([prod, end])                                             # (2, B', D)
    else:
        summary = torch.stack([x.new_ones((rows, D), dtype=acc), x.new_zeros((rows, D), dtype=acc)])
    return _compose_and_scan(  # exchanged: (world, 2, B', D)
        layout, group, summary, (a, x, initial_state), initial_state, (layout.num_seqs, D), reverse,
        lambda m, h: m[0] * h + m[1], cu_seqlens,
        lambda E, cu: (linrec.diagonal_scan(a, x, E, reverse=reverse, cu_seqlens=cu, backend=backend), None),
        x.new_zeros(x.shape), output_final_state, out_is_states=True)


def diagonal_scan(a: Tensor, x: Tensor, initial_state: Optional[Tensor] = None, *, group=None,
                  reverse: bool = False, cu_seqlens: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``linrec.diagonal_scan`` with time split over the ranks of ``group``.

    Args:
        a: this rank's slice of the coefficients, (B, T_r, D) or broadcastable to it, e.g. (D,)
            for a time-invariant recurrence (then the same on every rank).
        x: (B, T_r, D), this rank's slice of time (T_r may differ across ranks, and may be 0).
        initial_state: (N, D) or None, the state before the whole sequence (``reverse``: after it),
            the same on every rank.
        group: the process group (default: the default group); rank r holds the r-th slice.
        reverse: ``h_t = a_t * h_{t+1} + x_t``; the state entering a slice comes from later ranks.
        cu_seqlens: (N + 1,) global offsets of N sequences packed along the concatenated time axis
            (B = 1), the same on every rank; sequences may span any number of slices.
        backend: passed to the single-device op.

    Returns:
        h: (B, T_r, D) in x's dtype, this rank's slice of the single-device result.

    Exchanged per rank: 2 B' D accumulation-dtype numbers (B' = B, or 1 with cu_seqlens) gathered
    from every rank, plus a descriptor of 13 int64; backward: the same as an all-reduce.
    """
    return _diagonal(a, x, initial_state, group, reverse, cu_seqlens, backend, False)[0]


# ----------------------------------------------------------------------------------------------
# Block-diagonal
# ----------------------------------------------------------------------------------------------
def _ordered_product(M: Tensor, reverse: bool) -> Tensor:
    """The product of L matrices along dim 1 by a pairwise tree (log2 L batched matmuls).

    M: (B', L, G, b, b). Returns (B', G, b, b): M_L ... M_2 M_1 (later on the left), or
    M_1 M_2 ... M_L with ``reverse``.
    """
    while M.shape[1] > 1:
        if M.shape[1] % 2:
            eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
            M = torch.cat([M, eye.expand(M.shape[0], 1, *M.shape[2:])], dim=1)
        even, odd = M[:, 0::2], M[:, 1::2]
        M = even @ odd if reverse else odd @ even
    return M[:, 0]


def _block_diagonal(A, x, initial_state, group, reverse, cu_seqlens, backend, output_final_state):
    T_r = x.shape[1] if isinstance(x, Tensor) and x.dim() == 4 else 0

    def validate():
        with torch.no_grad():
            A_axis = A.dim() - 4 if isinstance(A, Tensor) else -1
            local_cu = None if cu_seqlens is None else torch.zeros_like(cu_seqlens)
            linrec.block_diagonal_scan(_slice_time(A, A_axis, T_r, 0, 0), x[:, :0], initial_state,
                                       reverse=reverse, cu_seqlens=local_cu, backend="reference")
        _check_backend("block_diagonal", backend, x)
        return [("B", x.shape[0]), ("G", x.shape[2]), ("b", x.shape[3]), ("x dtype", _dtype_code(x)),
                ("reverse", int(reverse)), ("initial_state given", int(initial_state is not None))]

    layout = _prepare("block_diagonal_scan", group, x, T_r, validate, cu_seqlens, 9)
    B, _, G, b = x.shape
    acc = _acc(x.dtype)
    A_axis = A.dim() - 4
    rows = B if cu_seqlens is None else 1
    if T_r > 0:
        _, lo, hi = layout.boundary(layout.rank, reverse)
        A_p = _slice_time(A, A_axis, T_r, lo, hi)
        h_p = linrec.block_diagonal_scan(A_p, x[:, lo:hi].to(acc), None, reverse=reverse, backend=backend)
        end = h_p[:, 0] if reverse else h_p[:, -1]                                     # (B', G, b)
        A_acc = A_p.to(acc)
        if A_axis >= 0 and A_p.shape[A_axis] == hi - lo and hi - lo > 1:
            prod = _ordered_product(torch.broadcast_to(A_acc, (rows, hi - lo, G, b, b)), reverse)
        else:  # no time axis: A^L
            prod = torch.linalg.matrix_power(torch.broadcast_to(A_acc, (rows, 1, G, b, b))[:, 0], hi - lo)
        summary = torch.cat([prod, end.unsqueeze(-1)], dim=-1)                         # (B', G, b, b + 1)
    else:
        eye = torch.eye(b, dtype=acc, device=x.device).expand(rows, G, b, b)
        summary = torch.cat([eye, x.new_zeros((rows, G, b, 1), dtype=acc)], dim=-1)
    return _compose_and_scan(  # exchanged: (world, B', G, b, b + 1)
        layout, group, summary, (A, x, initial_state), initial_state,
        (layout.num_seqs, G, b), reverse,
        lambda m, h: (m[..., :b] @ h.unsqueeze(-1)).squeeze(-1) + m[..., b], cu_seqlens,
        lambda E, cu: (linrec.block_diagonal_scan(A, x, E, reverse=reverse, cu_seqlens=cu, backend=backend), None),
        x.new_zeros(x.shape), output_final_state, out_is_states=True)


def block_diagonal_scan(A: Tensor, x: Tensor, initial_state: Optional[Tensor] = None, *, group=None,
                        reverse: bool = False, cu_seqlens: Optional[Tensor] = None,
                        backend: str = "auto") -> Tensor:
    """``linrec.block_diagonal_scan`` with time split over the ranks of ``group``.

    Args:
        A: this rank's slice of the blocks, (B, T_r, G, b, b) or broadcastable to it, e.g.
            (G, b, b) time-invariant (then the same on every rank).
        x: (B, T_r, G, b), this rank's slice of time (may be empty).
        initial_state: (N, G, b) or None, the same on every rank.
        group, reverse, cu_seqlens, backend: as in ``diagonal_scan``.

    Returns:
        h: (B, T_r, G, b) in x's dtype, this rank's slice of the single-device result.

    Exchanged per rank: B' G b (b + 1) fp32 numbers (the b x b product and the end state of the
    slice's boundary piece; B' = B, or 1 with cu_seqlens) gathered from every rank.
    """
    return _block_diagonal(A, x, initial_state, group, reverse, cu_seqlens, backend, False)[0]


# ----------------------------------------------------------------------------------------------
# Householder
# ----------------------------------------------------------------------------------------------
def _householder_summary(q, k, v, beta, log_gate, lo, hi, scale, backend) -> Tensor:
    """The affine map ``S_out = M S_in + s`` of a piece [lo, hi) of the slice, per head.

    One call of the single-device op (chunked WY form) on v widened by K zero columns in front,
    ``[0 | v]``, from the initial state ``[I_K | 0]``: its final state is ``[M | s]``. q: (B', T, H, K), k: (B', T, [n,] H, K),
    v: (B', T, [n,] H, V), beta: (B', T, [n,] H), log_gate: (B', T, H) or None.
    Returns (B', H, K, K + V) float32: [M | s].
    """
    sl = slice(lo, hi)
    K, V = q.shape[-1], v.shape[-1]
    v_p = v[:, sl]
    v_ext = torch.cat([v_p.new_zeros(v_p.shape[:-1] + (K,)), v_p], dim=-1)       # [0 | v]
    rows, H = q.shape[0], q.shape[2]
    acc = _acc(q.dtype)
    eye = torch.eye(K, dtype=acc, device=q.device).expand(rows, H, K, K)
    init = torch.cat([eye, q.new_zeros((rows, H, K, V), dtype=acc)], dim=-1)       # [I | 0]
    _, final = linrec.householder_scan(q[:, sl], k[:, sl], v_ext, beta[:, sl],
                                       None if log_gate is None else log_gate[:, sl], init, scale=scale,
                                       output_final_state=True, backend=backend)
    return final                                                                  # [M | s]


def householder_scan(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Optional[Tensor] = None,
                     initial_state: Optional[Tensor] = None, *, group=None, scale: Optional[float] = None,
                     output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                     backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """``linrec.householder_scan`` with time split over the ranks of ``group``.

    Args:
        q: (B, T_r, H, K); k: (B, T_r, n, H, K) or (B, T_r, H, K); v: (B, T_r, n, H, V) or
            (B, T_r, H, V); beta: (B, T_r, n, H) or (B, T_r, H); log_gate: (B, T_r, H) or None:
            this rank's slice of time (T_r may differ across ranks, and may be 0).
        initial_state: (N, H, K, V) or None, the state before the whole sequence, the same on every rank.
        group, cu_seqlens, backend: as in ``diagonal_scan``; scale: default K ** -0.5.
        output_final_state: also return the whole sequence's final state (on every rank).

    Returns:
        o: (B, T_r, H, V) in q's dtype, this rank's slice of the single-device output;
        final_state: (N, H, K, V) float32, the same on every rank, or None.

    Exchanged per rank: B' H K (K + V) fp32 numbers (each head's K x K transition and K x V end
    state of the slice's boundary piece; B' = B, or 1 with cu_seqlens) gathered from every rank,
    and with ``output_final_state`` an all-reduce of N H K V fp32 numbers.
    """
    T_r = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else 0

    def validate():
        with torch.no_grad():
            local_cu = None if cu_seqlens is None else torch.zeros_like(cu_seqlens)
            linrec.householder_scan(q[:, :0], k[:, :0], v[:, :0], beta[:, :0],
                                    None if log_gate is None else log_gate[:, :0], initial_state, scale=scale,
                                    cu_seqlens=local_cu, backend="reference")
        _check_backend("householder", backend, q)
        for name, t in (("k", k), ("v", v), ("beta", beta), ("log_gate", log_gate)):
            if t is not None and t.shape[1] != T_r:
                raise ValueError(f"{name} must have q's time length {T_r}, got shape {tuple(t.shape)}")
        n = k.shape[2] if k.dim() == 5 else 1
        return [("B", q.shape[0]), ("H", q.shape[2]), ("K", q.shape[3]), ("n", n), ("V", v.shape[-1]),
                ("q dtype", _dtype_code(q)), ("log_gate given", int(log_gate is not None)),
                ("initial_state given", int(initial_state is not None)),
                ("output_final_state", int(bool(output_final_state)))]

    layout = _prepare("householder_scan", group, q, T_r, validate, cu_seqlens, 12)
    B, _, H, K = q.shape
    V = v.shape[-1]
    acc = _acc(q.dtype)
    rows = B if cu_seqlens is None else 1
    if T_r > 0:
        _, lo, hi = layout.boundary(layout.rank, False)
        summary = _householder_summary(q, k, v, beta, log_gate, lo, hi, scale, backend)   # (B', H, K, K + V)
    else:
        eye = torch.eye(K, dtype=acc, device=q.device).expand(rows, H, K, K)
        summary = torch.cat([eye, q.new_zeros((rows, H, K, V), dtype=acc)], dim=-1)
    return _compose_and_scan(  # exchanged: (world, B', H, K, K + V)
        layout, group, summary, (q, k, v, beta, log_gate, initial_state), initial_state,
        (layout.num_seqs, H, K, V), False, lambda m, S: m[..., :K] @ S + m[..., K:],
        cu_seqlens,
        lambda E, cu: linrec.householder_scan(q, k, v, beta, log_gate, E, scale=scale,
                                              output_final_state=output_final_state, cu_seqlens=cu, backend=backend),
        q.new_zeros((B, 0, H, V)), output_final_state)


# ----------------------------------------------------------------------------------------------
# Selective (Mamba)
# ----------------------------------------------------------------------------------------------
def _selective_summary(x, delta, A, B, C, delta_bias, delta_softplus, reverse, negative_eigenvalues, lo, hi,
                       backend) -> Tensor:
    """The affine map ``h_out = P * h_in + s`` of the piece [lo, hi) of the slice (elementwise per (d, n)).

    x, delta: (B', T_r, D); A: (D, N); B, C: (B', T_r, N) or (B', T_r, G, N); delta_bias: (D,) or None.
    s is the piece's end state from a zero state (the single-device op's final state); P the
    product of its transitions abar_t = exp(dt_t A) over the piece. Without negative eigenvalues
    that product is exp(A sum_t dt_t), computed in closed form from the summed step sizes; with
    them abar_t = 2 exp(dt_t A) - 1 has no such form, and P comes from the same op call: a second
    copy of the rows with x = 0 and the initial state 1 ends in P (the batch doubled, not T).
    Returns (2, B', D, N) in the accumulation dtype: [P, s].
    """
    sl = slice(lo, hi)
    x_p, delta_p, B_p, C_p = x[:, sl], delta[:, sl], B[:, sl], C[:, sl]
    rows, _, Dch = x_p.shape
    acc = _acc(x.dtype)
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, output_final_state=True, reverse=reverse,
              negative_eigenvalues=negative_eigenvalues, backend=backend)
    if not negative_eigenvalues:
        _, s = linrec.selective_scan(x_p, delta_p, A, B_p, C_p, **kw)                  # (B', D, N)
        dt = delta_p.to(acc) if delta_bias is None else delta_p.to(acc) + delta_bias.to(acc)
        if delta_softplus:
            dt = F.softplus(dt)
        P = torch.exp(dt.sum(dim=1).unsqueeze(-1) * A.to(acc))                        # (B', D, N)
        return torch.stack([P, s])
    N = A.shape[1]
    init = torch.cat([x_p.new_zeros((rows, Dch, N), dtype=acc), x_p.new_ones((rows, Dch, N), dtype=acc)])
    _, final = linrec.selective_scan(torch.cat([x_p, torch.zeros_like(x_p)]), torch.cat([delta_p, delta_p]), A,
                                     torch.cat([B_p, B_p]), torch.cat([C_p, C_p]), initial_state=init, **kw)
    return torch.stack([final[rows:], final[:rows]])                                 # [P, s]


def _selective(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, output_final_state, reverse,
               cu_seqlens, negative_eigenvalues, backend, group):
    T_r = x.shape[1] if isinstance(x, Tensor) and x.dim() == 3 else 0

    def validate():
        with torch.no_grad():  # the single-device checks, on a zero-length slice (costs nothing)
            local_cu = None if cu_seqlens is None else torch.zeros_like(cu_seqlens)
            cut = lambda t: t[:, :0] if isinstance(t, Tensor) and t.dim() >= 2 else t   # noqa: E731
            linrec.selective_scan(cut(x), cut(delta), A, cut(B), cut(C), D, cut(z), delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, initial_state=initial_state,
                                  output_final_state=output_final_state, reverse=reverse, cu_seqlens=local_cu,
                                  negative_eigenvalues=negative_eigenvalues, backend="reference")
        _check_backend("selective", backend, x)
        for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
            if t is not None and t.shape[1] != T_r:
                raise ValueError(f"{name} must have x's time length {T_r}, got shape {tuple(t.shape)}")
        G = B.shape[2] if B.dim() == 4 else 0
        return [("B", x.shape[0]), ("D", x.shape[2]), ("N", A.shape[1]), ("G", G), ("x dtype", _dtype_code(x)),
                ("reverse", int(reverse)), ("negative_eigenvalues", int(negative_eigenvalues)),
                ("delta_softplus", int(delta_softplus)), ("D given", int(D is not None)),
                ("z given", int(z is not None)), ("delta_bias given", int(delta_bias is not None)),
                ("initial_state given", int(initial_state is not None)),
                ("output_final_state", int(bool(output_final_state)))]

    layout = _prepare("selective_scan", group, x, T_r, validate, cu_seqlens, 16)
    Bsz, _, Dch = x.shape
    N = A.shape[1]
    acc = _acc(x.dtype)
    rows = Bsz if cu_seqlens is None else 1
    if T_r > 0:
        _, lo, hi = layout.boundary(layout.rank, reverse)
        summary = _selective_summary(x, delta, A, B, C, delta_bias, delta_softplus, reverse, negative_eigenvalues,
                                     lo, hi, backend)                                  # (2, B', D, N)
    else:  # the identity map
        summary = torch.stack([x.new_ones((rows, Dch, N), dtype=acc), x.new_zeros((rows, Dch, N), dtype=acc)])
    return _compose_and_scan(  # exchanged: (world, 2, B', D, N)
        layout, group, summary, (x, delta, A, B, C, delta_bias, initial_state), initial_state,
        (layout.num_seqs, Dch, N), reverse, lambda m, h: m[0] * h + m[1], cu_seqlens,
        lambda E, cu: linrec.selective_scan(x, delta, A, B, C, D, z, delta_bias=delta_bias,
                                            delta_softplus=delta_softplus, initial_state=E,
                                            output_final_state=output_final_state, reverse=reverse, cu_seqlens=cu,
                                            negative_eigenvalues=negative_eigenvalues, backend=backend),
        x.new_zeros(x.shape), output_final_state)


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, *, group=None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, initial_state: Optional[Tensor] = None,
                   output_final_state: bool = False, reverse: bool = False, cu_seqlens: Optional[Tensor] = None,
                   negative_eigenvalues: bool = False, backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """``linrec.selective_scan`` (Mamba's S6) with time split over the ranks of ``group``.

    Each rank scans the boundary piece of its slice from a zero state, giving the piece's affine
    map ``h_out = P * h_in + s`` per (sequence, d, n) (P the product of the transitions: exp(A
    sum dt), or with ``negative_eigenvalues`` the product of 2 exp(dt A) - 1); the maps are
    all-gathered, every rank composes its predecessors' (``reverse``: successors') into the state
    entering its slice, and rescans the slice from there.

    Args:
        x, delta: (B, T_r, D), this rank's slice of time (T_r may differ across ranks, and may be 0).
        A: (D, N), the same on every rank.
        B, C: (B, T_r, N) or (B, T_r, G, N), this rank's slice.
        D: (D,) or None; delta_bias: (D,) or None: the same on every rank.
        z: (B, T_r, D) or None, this rank's slice.
        initial_state: (N_seq, D, N) or None, the state before the whole sequence (``reverse``:
            after it), the same on every rank.
        group: the process group (default: the default group); rank r holds the r-th slice.
        output_final_state: also return every sequence's final state (the state after its last
            step; with ``reverse`` after its first position, t = 0), the same on every rank.
        delta_softplus, reverse, negative_eigenvalues, backend: as in ``linrec.selective_scan``.
        cu_seqlens: (N_seq + 1,) global offsets of sequences packed along the concatenated time
            axis (B = 1), the same on every rank; sequences may span any number of slices.

    Returns:
        y: (B, T_r, D) in x's dtype, this rank's slice of the single-device output;
        final_state: (N_seq, D, N) float32 (float64 for float64 x), the same on every rank, or None.

    Exchanged per rank: 2 B' D N accumulation-dtype numbers (P and s of the slice's boundary
    piece; B' = B, or 1 with cu_seqlens) gathered from every rank, a descriptor of 18 int64, and
    with ``output_final_state`` an all-reduce of N_seq D N numbers; the backward all-reduces the
    gradients of the same tensors.
    """
    return _selective(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, output_final_state,
                      reverse, cu_seqlens, negative_eigenvalues, backend, group)


# ----------------------------------------------------------------------------------------------
# Layers: the short convolution's halo
# ----------------------------------------------------------------------------------------------
def slice_layout(x: Tensor, cu_seqlens: Optional[Tensor], group, fields: Sequence[Tuple[str, int]] = (),
                 op: str = "layer") -> SliceLayout:
    """The layout of x's (B, T_r, ...) time slices over ``group`` (one small all-gather, checked).

    ``fields``: further (name, value) pairs that must agree across ranks.
    """
    T_r = x.shape[1]
    return _prepare(op, group, x, T_r,
                    lambda: [("B", x.shape[0])] + [tuple(f) for f in fields] +
                            [("x shape", _checksum(x.shape[2:]))],
                    cu_seqlens, len(fields) + 5)


def short_conv(conv, x: Tensor, state: Optional[Tensor], cu_seqlens: Optional[Tensor], group
               ) -> Tuple[Tensor, Tensor]:
    """``conv(x, state, cu_seqlens)`` (a ``linrec.nn.ShortConv``) on this rank's slice of time.

    The previous ranks' last ``W - 1`` inputs (the halo) come through one all-gather of every
    rank's last min(W - 1, T_r) inputs; they continue the sequence that enters the slice (all rows
    without cu_seqlens), after the carried ``state`` if that sequence started less than W - 1
    steps before the slice.

    Args:
        x: (B, T_r, C) this rank's slice; state: (N, C, W - 1) or None, the same on every rank.
        cu_seqlens: (N + 1,) global offsets, or None.

    Returns:
        y: (B, T_r, C); new_state: (N, C, W - 1), the whole sequences' last W - 1 inputs, on every rank.
    """
    W1 = conv.kernel_size - 1
    layout = slice_layout(x, cu_seqlens, group, [("kernel_size", conv.kernel_size)], "ShortConv")
    B, T_r, C = x.shape
    N = layout.num_seqs
    state0 = x.new_zeros((N, C, W1)) if state is None else state.to(x.dtype)
    E = state0
    if W1 > 0:
        tail = x[:, max(0, T_r - W1):]
        tail = F.pad(tail, (0, 0, W1 - tail.shape[1], 0))                              # (B, W - 1, C)
        tails = _AllGather.apply(group, tail, x)                                         # (world, B, W - 1, C)
        valid = [tails[j][:, W1 - min(W1, layout.lengths[j]):] for j in range(layout.rank)]
        hist = torch.cat(valid + [x.new_zeros((B, 0, C))], dim=1)[:, -W1:]               # (B, <= W - 1, C)
        # The sequence entering the slice (all rows without cu_seqlens) and how many of the
        # halo's positions belong to it.
        if layout.cu is None:
            n0, m = None, min(hist.shape[1], layout.start)
        elif T_r > 0:
            n0 = layout.seq_at(layout.start)
            m = min(hist.shape[1], layout.start - layout.cu[n0])
        else:
            n0, m = None, 0
        if m > 0:
            rows = state0 if n0 is None else state0[n0:n0 + 1]
            carried = torch.cat([rows, hist[:, hist.shape[1] - m:].transpose(1, 2)], dim=2)[..., -W1:]
            if n0 is None:
                E = carried
            else:
                mask = (torch.arange(N, device=x.device) == n0).view(N, 1, 1)
                E = torch.where(mask, carried, state0)
        E = _Tie.apply(E, tails)
    local_cu = None if cu_seqlens is None else layout.local_cu(cu_seqlens)
    y, local_new = conv(x, E, local_cu)
    if W1 == 0:
        return y, local_new
    new_state = _gather_final(layout, local_new, group)
    return _Tie.apply(y, new_state), new_state
