"""Context parallelism (``linrec.distributed``): bytes exchanged per rank, and time at 1, 2, 4 processes.

    python -m bench.distributed [--T 16384] [--worlds 1 2 4] [--repeat 3]

Spawns ``world`` CPU processes (gloo on 127.0.0.1) per world size; every rank holds T / world
steps of one long sequence and runs each op forward + backward (torch backend). Prints, per op
and world size, the median time of a forward + backward and the bytes each rank put into
collectives (``linrec.distributed.traffic``: the layout descriptor, the summaries and the
backward's all-reduce), next to the formula:

* diagonal (B, T, D): summaries 2 B D x 4 bytes (fp32 product and end state); backward: world x that.
* block-diagonal (B, T, G, b): B G b (b + 1) x 4; backward: world x that.
* Householder (B, T, H, K, V): B H K (K + V) x 4; backward: world x that.
* every call: a layout descriptor of 2 + fields int64 (13 to 14 x 8 bytes).

Nothing depends on T: the exchange is O(world x state). On a shared 2-core machine the times
of 4 processes measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "diagonal": dict(B=1, D=64),
    "block_diagonal": dict(B=1, G=8, b=4),
    "householder": dict(B=1, H=2, K=32, V=32, n=1),
}


def formula(op: str, world: int) -> dict:
    s = SHAPES[op]
    if op == "diagonal":
        per = 2 * s["B"] * s["D"] * 4
    elif op == "block_diagonal":
        per = s["B"] * s["G"] * s["b"] * (s["b"] + 1) * 4
    else:
        per = s["B"] * s["H"] * s["K"] * (s["K"] + s["V"]) * 4
    return {"summaries": per, "backward": world * per}


def _inputs(op, T, torch):
    s = SHAPES[op]
    g = torch.Generator().manual_seed(0)
    if op == "diagonal":
        return [torch.rand(s["B"], T, s["D"], generator=g) * 0.5 + 0.5, torch.randn(s["B"], T, s["D"], generator=g)]
    if op == "block_diagonal":
        return [torch.randn(s["B"], T, s["G"], s["b"], s["b"], generator=g) * 0.3,
                torch.randn(s["B"], T, s["G"], s["b"], generator=g)]
    q = torch.randn(s["B"], T, s["H"], s["K"], generator=g)
    k = torch.nn.functional.normalize(torch.randn(s["B"], T, s["H"], s["K"], generator=g), dim=-1)
    return [q, k, torch.randn(s["B"], T, s["H"], s["V"], generator=g), torch.rand(s["B"], T, s["H"], generator=g)]


def _worker(rank, world, port, T, repeat, out):
    import torch
    import torch.distributed as dist
    import linrec.distributed as lrd
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    per = T // world
    result = {}
    for op in SHAPES:
        full = _inputs(op, T, torch)
        local = [t[:, rank * per:(rank + 1) * per].clone().requires_grad_(True) for t in full]
        fn = {"diagonal": lambda a, x: lrd.diagonal_scan(a, x, backend="torch"),
              "block_diagonal": lambda A, x: lrd.block_diagonal_scan(A, x, backend="torch"),
              "householder": lambda *t: lrd.householder_scan(*t, backend="torch")[0]}[op]
        times = []
        for i in range(repeat + 1):
            for key in lrd.traffic:
                lrd.traffic[key] = 0
            dist.barrier()
            t0 = time.perf_counter()
            fn(*local).sum().backward()
            dist.barrier()
            if i:  # the first run warms up
                times.append(time.perf_counter() - t0)
        result[op] = {"seconds": statistics.median(times), "bytes": dict(lrd.traffic)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def _run(world, T, repeat, timeout=600):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, "-m", "bench.distributed", "--worker", str(r), str(world), str(port),
                                   str(T), str(repeat), out], env=env) for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise SystemExit(f"world {world}: a process failed")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        r, w, port, T, repeat, out = argv[1:]
        return _worker(int(r), int(w), int(port), int(T), int(repeat), out)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--T", type=int, default=16384, help="global sequence length")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per op (after one warm-up)")
    args = ap.parse_args(argv)
    print(f"T = {args.T}; shapes {SHAPES}; fp32, torch backend, gloo on the CPU")
    print(f"{'op':16} {'world':>5} {'fwd+bwd s':>10} {'layout B':>9} {'summ. B':>8} {'formula':>8} "
          f"{'bwd B':>7} {'formula':>8}")
    for world in args.worlds:
        res = _run(world, args.T, args.repeat)
        for op, r in res.items():
            f, b = formula(op, world), r["bytes"]
            print(f"{op:16} {world:>5} {r['seconds']:>10.3f} {b['layout']:>9} {b['summaries']:>8} "
                  f"{f['summaries']:>8} {b['backward']:>7} {f['backward']:>8}")


if __name__ == "__main__":
    main()
