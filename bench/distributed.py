"""Context parallelism (``linrec.distributed``): bytes exchanged per rank, and time at 1, 2, 4 processes.

    python -m bench.distributed [--T 16384] [--worlds 1 2 4] [--repeat 3] [--out bench/results]

Spawns ``world`` CPU processes (gloo on 127.0.0.1) per world size; every rank holds T / world
steps of one long sequence and runs each op forward + backward (torch backend, fp32, one thread
per process). Prints, per op and world size, the median time of a forward + backward and the
bytes each rank put into collectives (``linrec.distributed.traffic``: the layout descriptor, the
summaries and the backward's all-reduce), next to the formula (fp32, 4 bytes a number; B' = B):

* diagonal (B, T, D): summaries 2 B D (the slice's product of a and its end state).
* block-diagonal (B, T, G, b): B G b (b + 1) (the ordered b x b product and the end state).
* Householder (B, T, H, K, V): B H K (K + V) (each head's K x K transition and K x V end state).
* selective (B, T, D, N): 2 B D N (exp(A sum dt) and the end state, per channel and state).
* backward: an all-reduce of the gathered summaries' gradient, world x the summaries.
* every call: a layout descriptor of 2 + fields int64 (fields: 8, 9, 12, 16 for the four ops).

Nothing depends on T: the exchange is O(world x state). The world-1 run also times the
single-device op (``single s``), so the cost of the summary pass (each rank scans its boundary
piece once more) shows. On a shared 2-core machine the times of 4 processes measure contention,
not scaling. With ``--out DIR`` the table is written to ``DIR/distributed-<device>.md`` and
``.csv`` with the command, device, versions and git SHA.
"""

from __future__ import annotations

import argparse
import csv
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
    "selective": dict(B=1, D=64, N=16),
}
LAYOUT_FIELDS = {"diagonal": 8, "block_diagonal": 9, "householder": 12, "selective": 16}


def formula(op: str, world: int) -> dict:
    """Bytes one rank puts into collectives for one forward + backward of ``op`` (fp32 summaries)."""
    s = SHAPES[op]
    if op == "diagonal":
        per = 2 * s["B"] * s["D"] * 4
    elif op == "block_diagonal":
        per = s["B"] * s["G"] * s["b"] * (s["b"] + 1) * 4
    elif op == "householder":
        per = s["B"] * s["H"] * s["K"] * (s["K"] + s["V"]) * 4
    else:
        per = 2 * s["B"] * s["D"] * s["N"] * 4
    return {"layout": (2 + LAYOUT_FIELDS[op]) * 8, "summaries": per, "backward": world * per}


def _inputs(op, T, torch):
    s = SHAPES[op]
    g = torch.Generator().manual_seed(0)
    if op == "diagonal":
        return [torch.rand(s["B"], T, s["D"], generator=g) * 0.5 + 0.5, torch.randn(s["B"], T, s["D"], generator=g)]
    if op == "block_diagonal":
        return [torch.randn(s["B"], T, s["G"], s["b"], s["b"], generator=g) * 0.3,
                torch.randn(s["B"], T, s["G"], s["b"], generator=g)]
    if op == "selective":  # x, delta, A (D, N), B, C
        D, N = s["D"], s["N"]
        return [torch.randn(s["B"], T, D, generator=g), torch.randn(s["B"], T, D, generator=g) * 0.5 - 2.0,
                -torch.rand(D, N, generator=g) - 0.1, torch.randn(s["B"], T, N, generator=g),
                torch.randn(s["B"], T, N, generator=g)]
    q = torch.randn(s["B"], T, s["H"], s["K"], generator=g)
    k = torch.nn.functional.normalize(torch.randn(s["B"], T, s["H"], s["K"], generator=g), dim=-1)
    return [q, k, torch.randn(s["B"], T, s["H"], s["V"], generator=g), torch.rand(s["B"], T, s["H"], generator=g)]


def _ops(lrd, linrec):
    """op -> (distributed forward, single-device forward), each returning the output to backpropagate."""
    sel = dict(delta_softplus=True, backend="torch")
    return {
        "diagonal": (lambda a, x: lrd.diagonal_scan(a, x, backend="torch"),
                     lambda a, x: linrec.diagonal_scan(a, x, backend="torch")),
        "block_diagonal": (lambda A, x: lrd.block_diagonal_scan(A, x, backend="torch"),
                           lambda A, x: linrec.block_diagonal_scan(A, x, backend="torch")),
        "householder": (lambda *t: lrd.householder_scan(*t, backend="torch")[0],
                        lambda *t: linrec.householder_scan(*t, backend="torch")[0]),
        "selective": (lambda x, dl, A, B, C: lrd.selective_scan(x, dl, A, B, C, **sel)[0],
                      lambda x, dl, A, B, C: linrec.selective_scan(x, dl, A, B, C, **sel)[0]),
    }


def _time(fn, inputs, repeat, sync) -> float:
    """The median seconds of ``fn(*inputs).sum().backward()`` over ``repeat`` runs after one warm-up."""
    times = []
    for i in range(repeat + 1):
        sync()
        t0 = time.perf_counter()
        fn(*inputs).sum().backward()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, port, T, repeat, out):
    import torch
    import torch.distributed as dist
    import linrec
    import linrec.distributed as lrd
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    per = T // world
    result = {}
    for op, (dist_fn, single_fn) in _ops(lrd, linrec).items():
        full = _inputs(op, T, torch)
        # Inputs with this rank's time axis are sliced; A of the selective scan, (D, N), is not.
        local = [(t[:, rank * per:(rank + 1) * per] if t.dim() >= 3 else t).clone().requires_grad_(True)
                 for t in full]
        for key in lrd.traffic:
            lrd.traffic[key] = 0
        dist_fn(*local).sum().backward()            # one call's bytes
        traffic = dict(lrd.traffic)
        result[op] = {"seconds": _time(dist_fn, local, repeat, dist.barrier), "bytes": traffic}
        if world == 1:
            result[op]["single_seconds"] = _time(single_fn, [t.detach().requires_grad_(True) for t in local],
                                                 repeat, lambda: None)
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


COLUMNS = ("op", "world", "T", "seconds", "single_seconds", "layout_bytes", "layout_formula", "summary_bytes",
           "summary_formula", "backward_bytes", "backward_formula")


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
    ap.add_argument("--out", default=None, help="folder for distributed-<device>.md / .csv (none: print only)")
    args = ap.parse_args(argv)
    import torch
    from bench.common import device_slug, environment
    env = environment(torch.device("cpu"))
    env["device"] = env["device"].split(" (")[0] + f" ({os.cpu_count()} cores, 1 thread per process)"
    load_before = os.getloadavg()[0]
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    command = "python -m bench.distributed " + " ".join(argv)
    head = (f"T = {args.T}; shapes {SHAPES}; fp32, torch backend, gloo on the CPU\n"
            f"device: {env['device']}  torch {env['torch']}  git {env['git_sha']}  {env['utc_time']}")
    print(head)
    rows = []
    for world in args.worlds:
        res = _run(world, args.T, args.repeat)
        for op, r in res.items():
            f, b = formula(op, world), r["bytes"]
            rows.append({"op": op, "world": world, "T": args.T, "seconds": r["seconds"],
                         "single_seconds": r.get("single_seconds", ""), "layout_bytes": b["layout"],
                         "layout_formula": f["layout"], "summary_bytes": b["summaries"],
                         "summary_formula": f["summaries"], "backward_bytes": b["backward"],
                         "backward_formula": f["backward"]})
    header = (f"| {'op':14} | world | fwd+bwd s | single s | layout B (formula) | summaries B (formula) "
              f"| backward B (formula) |")
    lines = [header, "|" + "|".join("---" for _ in range(7)) + "|"]
    for r in rows:
        single = f"{r['single_seconds']:.3f}" if r["single_seconds"] != "" else ""
        lines.append(f"| {r['op']:14} | {r['world']} | {r['seconds']:.3f} | {single} | {r['layout_bytes']} "
                     f"({r['layout_formula']}) | {r['summary_bytes']} ({r['summary_formula']}) "
                     f"| {r['backward_bytes']} ({r['backward_formula']}) |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "distributed-" + device_slug(torch.device("cpu")))
        with open(stem + ".md", "w") as fh:
            fh.write("# linrec.distributed on the CPU (gloo): time and bytes exchanged per rank\n\n"
                     f"Command: `{command}`\n\n"
                     f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; "
                     f"git {env['git_sha']}; {env['utc_time']}\n\n"
                     f"Load average (1 min) before / after the run: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
                     f"on {os.cpu_count()} cores (above the core count, the times include waiting for a core).\n\n"
                     + (f"Uncommitted changes in tracked files at the time: {', '.join(dirty)}.\n\n" if dirty else "")
                     +
                     f"T = {args.T} (T / world per rank), shapes {SHAPES}, fp32, torch backend, median of "
                     f"{args.repeat} forward + backward runs. Bytes: what one rank put into collectives for "
                     "one forward + backward (measured by ``linrec.distributed.traffic``; formula in "
                     "parentheses, see bench/distributed.py).\n\n" + "\n".join(lines) + "\n")
        with open(stem + ".csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(COLUMNS) + ["command", "device", "torch", "triton", "git_sha",
                                                                "utc_time"])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "command": command, **{k: env[k] for k in ("device", "torch", "triton", "git_sha",
                                                                            "utc_time")}})
        print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
