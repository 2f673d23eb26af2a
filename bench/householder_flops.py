"""Tensor-core FLOPs and HBM bytes of the Householder Triton path, per kernel, counted under the interpreter.

``python -m bench.householder_flops [--n 1 2 3] [--T 256] [--K 128]`` runs ``bench.traffic``'s Householder
case (bf16, B = H = 1, K = V, the launch plan of ``LINREC_DEVICE_MODEL``, default h100) forward and
backward, and prints per kernel launch:

* tensor FLOPs: ``2 M N K`` (times the batch of batched products) of every ``tl.dot`` the
  interpreter runs (``InterpreterBuilder.create_dot`` is hooked), split into products whose
  operands are the bf16 inputs themselves (run as ``input_precision="ieee"`` on the values rounded to
  bf16 under the interpreter, see ``_mm`` in ``kernels/householder.py``) and products with fp32
  operands (TF32 on a GPU for bf16 inputs); divided by chunks x heads (chunks of 64 // n tokens);
* the meter's distinct bytes loaded + stored, divided by tokens x heads.

The forward is the custom op ``linrec::householder_scan``; the backward is the backward custom op as
autograd calls it, with what the forward saved (``--recompute`` calls it without, as ``bench.traffic``
does, so the backward recomputes the forward's chunk-local factors).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LINREC_DEVICE_MODEL", "h100")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import traffic  # noqa: E402


class DotCounter:
    """Hooks the interpreter's tl.dot and sums 2 M N K per kernel launch (by the meter's current launch)."""

    def __init__(self, meter: traffic.Meter):
        self.meter = meter
        self.by_kernel = {}   # kernel -> [bf16-operand flops, fp32-operand flops]

    def __enter__(self):
        from triton.runtime.interpreter import InterpreterBuilder
        self._orig = InterpreterBuilder.create_dot
        counter = self

        def create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc):
            shape_a = np.asarray(a.data).shape
            n_cols = np.asarray(b.data).shape[-1]
            flops = 2 * int(np.prod(shape_a)) * n_cols
            kernel = counter.meter._current[0].kernel if counter.meter._current is not None else "?"
            # "ieee" products in a bf16 run are the bf16-operand products (_mm), emulated in fp32.
            lowp = str(input_precision).lower().endswith("ieee")
            counter.by_kernel.setdefault(kernel, [0, 0])[0 if lowp else 1] += flops
            return counter._orig(builder, a, b, d, input_precision, max_num_imprecise_acc)

        InterpreterBuilder.create_dot = create_dot
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpreterBuilder
        InterpreterBuilder.create_dot = self._orig


def inputs(B, T, H, K, V, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, n, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, n, H, V, generator=g).to(dtype)
    beta = torch.rand(B, T, n, H, generator=g).to(dtype)
    do = torch.randn(B, T, H, V, generator=g).to(dtype)
    return q, k, v, beta, do


def measure(n: int, T: int, K: int, recompute: bool):
    import linrec  # noqa: F401
    B, H, V = 1, 1, K
    q, k, v, beta, do = inputs(B, T, H, K, V, n, torch.bfloat16)
    scale = K ** -0.5
    rows = []
    with traffic.Meter() as meter, DotCounter(meter) as dots:
        out = torch.ops.linrec.householder_scan(q, k, v, beta, None, None, None, scale, "triton")
    rows.append(("forward", meter.traffic, dots.by_kernel))
    saved = None if recompute else out[2]
    with traffic.Meter() as meter, DotCounter(meter) as dots:
        # (schema: ..., initial_state, saved, grad_o, grad_final, cu_seqlens, scale, backend)
        torch.ops.linrec.householder_scan_backward(q, k, v, beta, None, None, saved, do, None, None, scale, "triton")
    rows.append(("backward", meter.traffic, dots.by_kernel))
    chunks = -(-T // max(1, 64 // n)) * B * H
    tokens = B * T * H
    return rows, chunks, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1])
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--recompute", action="store_true", help="backward without the forward's saved tensors")
    args = p.parse_args(argv)
    for n in args.n:
        rows, chunks, tokens = measure(n, args.T, args.K, args.recompute)
        total_f, total_b = 0.0, 0.0
        print(f"n = {n}, T = {args.T}, K = V = {args.K}, bf16: per chunk and head (MFLOPs bf16-operand + fp32-operand),"
              f" per token and head (KB = 1024 B; per kernel argument: bytes loaded/stored)")
        for name, tr, by_kernel in rows:
            f = sum(sum(x) for x in by_kernel.values()) / chunks / 1e6
            b = tr.total / tokens / 1024
            total_f += f
            total_b += b
            print(f"  {name}: {f:.2f} MFLOPs, {b:.2f} KB ({tr.kernel_bytes / tokens / 1024:.2f} KB kernels, "
                  f"{len(tr.launches)} launches)")
            for kernel, (lo, hi) in by_kernel.items():
                print(f"    {kernel}: {lo / chunks / 1e6:.2f} + {hi / chunks / 1e6:.2f} MFLOPs")
            for launch in tr.launches:
                print(f"    {launch.kernel}: {(launch.load_bytes + launch.store_bytes) / tokens / 1024:.2f} KB "
                      + " ".join(f"{a}:{ld / tokens:.0f}/{st / tokens:.0f}" for a, (ld, st) in launch.by_arg.items()))
        print(f"  forward + backward: {total_f:.2f} MFLOPs per chunk and head, {total_b:.2f} KB per token and head")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
