"""Peak extra memory of one Householder forward + backward (Triton launchers), from tracked allocations.

``python -m bench.householder_memory`` runs, under the Triton interpreter, the Triton path's forward
(``householder_scan_forward``) and then its backward (``householder_scan_backward``, given the forward's chunk
inverse Tinv as the op's autograd gives it; ``--recompute``: without, so that it recomputes Tinv) on bf16 inputs, and tracks every tensor storage that a
PyTorch op creates meanwhile (a ``TorchDispatchMode`` sees each ``empty`` / ``empty_like`` / ... of
the launchers; a storage counts from its creation until it is freed, checked at every op). The
inputs and the incoming gradient ``do`` exist before and are not counted; the output ``o`` and the
final state are held until the end (the caller holds them), the forward's saved tensors until the
backward ends. Printed: the peak in bytes per token and head (K = V, n = 1, no gate), and that
figure times B T H at the GPU targets, beside flash-linear-attention's ``chunk_gated_delta_rule``
peak computed from its algorithm (``fla_peak_bytes_per_token``: what its forward and backward
allocate and save, in their dtypes).

Memory grows as B T H here (plus N H K V for the final state, which both count), so small shapes
(T = 256, H = 1) give the per-token figure of the full shapes.
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LINREC_DEVICE_MODEL", "h100")

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

TARGETS = ((8, 2048, 16, 128), (1, 8192, 32, 128), (4, 4096, 16, 64))


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages created by PyTorch ops while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = {}     # data_ptr -> (StorageWeakRef, nbytes)
        self.peak = 0

    def _sweep(self):
        # The interpreter's launches leave reference cycles that hold kernel arguments until the
        # cycle collector runs; a GPU launch does not, so collect before every check.
        gc.collect()
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[ptr]

    def current(self) -> int:
        self._sweep()
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        # Storages the op was given (a view's base, the interpreter's set_ of an input's storage) are
        # not new allocations.
        given = set()
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, torch.Tensor):
                given.add(a.untyped_storage().data_ptr())
            elif isinstance(a, torch.UntypedStorage):
                given.add(a.data_ptr())
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live and storage.data_ptr() not in given:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def fla_peak_bytes_per_token(K: int, V: int, elem: int = 2, chunk: int = 64) -> dict:
    """flash-linear-attention's chunk_gated_delta_rule (n = 1): peak bytes per token and head of its
    forward and of its forward + backward, from what it allocates (fla/ops/gated_delta_rule/chunk.py and
    the common kernels it calls; tensors in the inputs' dtype unless named fp32).

    Forward: g cumsum (fp32), A = K K^T (fp32, chunk x chunk) then its inverse (bf16), w, u, the chunk
    states h (bf16, K V per chunk), v_new, o. It saves g and A (with the inputs). Backward: w, u, h, v_new
    recomputed, dv (local), dh (bf16, K V per chunk), dv2, dq, dk, dw, dg (fp32), then prepare_wy_repr_bwd's
    dk2, dv, db, dg2; the peak is at that last kernel, with o held by the caller."""
    g, A32, A = 4, 4 * chunk, elem * chunk
    h = elem * K * V / chunk
    fwd = max(g + A32 + A, g + A + elem * K + elem * V + h + elem * V + elem * V)
    held = elem * V + A + g                                          # o, and the saved A and g
    bwd = held + (elem * K + elem * V + h + elem * V                 # w, u, h, v_new
                  + h + elem * V                                     # dh, dv2 (the local dv freed)
                  + 3 * elem * K + 4                                 # dq, dk, dw, dg
                  + elem * K + elem * V + elem + 4)                  # dk2, dv, db, dg2
    return dict(forward=fwd, total=max(fwd, bwd))


def measure(K: int, T: int = 256, n: int = 1, save: bool = True) -> dict:
    from linrec.kernels import householder as hk
    B, H, V = 1, 1, K
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(B, T, n, H, K, generator=g), dim=-1).bfloat16()
    v = torch.randn(B, T, n, H, V, generator=g).bfloat16()
    beta = torch.rand(B, T, n, H, generator=g).bfloat16()
    do = torch.randn(B, T, H, V, generator=g).bfloat16()
    scale = K ** -0.5
    with AllocationTracker() as tracker:
        o, final, tinv = hk.householder_scan_forward(q, k, v, beta, None, None, cu_seqlens=None, scale=scale,
                                                     return_saved=True)
        if not save:
            tinv = None
        forward_peak = tracker.peak
        grads = hk.householder_scan_backward(q, k, v, beta, None, None, do, None, cu_seqlens=None, scale=scale,
                                             tinv=tinv)
        del grads, tinv
    # The final state (N H K V fp32) is not per token: taken out, as from fla's figure.
    final_bytes = final.numel() * final.element_size()
    tokens = B * T * H
    return dict(forward=(forward_peak - final_bytes) / tokens, total=(tracker.peak - final_bytes) / tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--recompute", action="store_true", help="backward without the forward's Tinv")
    args = p.parse_args(argv)
    print("peak extra memory, bytes per token and head (bf16, n = 1, no gate), forward / forward + backward;"
          " then GiB at the GPU targets")
    for K in sorted({t[3] for t in TARGETS}, reverse=True):
        ours = measure(K, args.T, save=not args.recompute)
        fla = fla_peak_bytes_per_token(K, K)
        print(f"K = V = {K}: linrec {ours['forward']:.0f} / {ours['total']:.0f}, fla {fla['forward']:.0f} / "
              f"{fla['total']:.0f}")
        for B, T, H, KK in TARGETS:
            if KK == K:
                tokens = B * T * H
                print(f"  (B, T, H, K=V) = {(B, T, H, K)}: linrec {ours['total'] * tokens / 2**30:.2f} GiB, "
                      f"fla {fla['total'] * tokens / 2**30:.2f} GiB (forward {ours['forward'] * tokens / 2**30:.2f}"
                      f" / {fla['forward'] * tokens / 2**30:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
