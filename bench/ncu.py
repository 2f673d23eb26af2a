"""One call of each kernel family at a GPU target shape, for Nsight Compute (issue 19).

On a lent GPU, ``bash bench/gpu.sh ncu`` (or the ``check`` step) runs, for every case below::

    ncu --nvtx --nvtx-include "linrec/" --metrics <METRICS> --csv python -m bench.ncu CASE

Each case builds its inputs with the op's own bench generator (``bench/<op>.py``), runs the call
once outside the profiled region (Triton compiles, autotuning, allocator warm-up), then once
more inside an NVTX range named ``linrec``: forward, and the backward of a summed output, so that
ncu reports every kernel launch of one forward + backward and nothing else. Per launch it
records DRAM bytes read and written (to set beside ``python -m bench.traffic``'s counts),
achieved occupancy, registers per thread and duration.

Here (no GPU): ``python -m bench.ncu --list`` prints the cases, and
``python -m bench.ncu --summarize DIR`` turns the ``ncu-*.csv`` files a run returned into a
markdown table (one row per kernel launch).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# ncu metric names: DRAM traffic, achieved occupancy, registers, duration.
METRICS = ",".join([
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
    "gpu__time_duration.sum",
])


def _call(op: str, dims: Dict[str, int], dtype: torch.dtype, backend: str, device: torch.device):
    """Inputs from ``bench/<op>.py``'s generator; returns (call returning one tensor, leaves to differentiate)."""
    import linrec
    from bench import block_diagonal, diagonal, householder, selective
    from bench.common import Point
    point = Point("ncu", next(iter(dims)), dims, ("fwd", "bwd"), ("fp32",))
    if op == "diagonal":
        inputs = diagonal.make_inputs(point, dtype, device)
        a, x = (t.requires_grad_() for t in (inputs["a"], inputs["x"]))
        return (lambda: linrec.diagonal_scan(a, x, backend=backend)), (a, x)
    if op == "block_diagonal":
        inputs = block_diagonal.make_inputs(point, dtype, device)
        A, x = (t.requires_grad_() for t in (inputs["A"], inputs["x"]))
        return (lambda: linrec.block_diagonal_scan(A, x, backend=backend)), (A, x)
    if op == "householder":
        inputs = householder.make_inputs(point, dtype, device)
        leaves = tuple(t.requires_grad_() for t in inputs.values())
        return (lambda: linrec.householder_scan(*leaves, backend=backend)[0]), leaves
    inputs = selective.make_inputs(point, dtype, device)
    leaves = tuple(inputs[name].requires_grad_() for name in ("x", "delta", "B", "C"))
    return (lambda: linrec.selective_scan(inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                          inputs["D"], delta_softplus=True, backend=backend)[0]), leaves


#: case name -> (op, dims at the GPU target, dtype, backend): the shapes issue 19 names.
CASES: Dict[str, Tuple[str, Dict[str, int], torch.dtype, str]] = {
    "diagonal-triton-fp32": ("diagonal", {"B": 8, "T": 8192, "D": 1024}, torch.float32, "triton"),
    "diagonal-triton-bf16": ("diagonal", {"B": 8, "T": 8192, "D": 1024}, torch.bfloat16, "triton"),
    "diagonal-cuda-fp32": ("diagonal", {"B": 8, "T": 8192, "D": 1024}, torch.float32, "cuda"),
    "diagonal-cuda-bf16": ("diagonal", {"B": 8, "T": 8192, "D": 1024}, torch.bfloat16, "cuda"),
    "block-diagonal-b4-fp32": ("block_diagonal", {"B": 8, "T": 4096, "G": 64, "b": 4}, torch.float32, "triton"),
    "householder-n1-bf16": ("householder", {"B": 1, "T": 8192, "H": 32, "K": 128, "V": 128, "n": 1},
                            torch.bfloat16, "triton"),
    "selective-n16-bf16": ("selective", {"B": 4, "T": 4096, "D": 1536, "N": 16}, torch.bfloat16, "triton"),
}


def forward_backward(call, leaves) -> None:
    """One forward and the backward of its summed output."""
    out = call()
    torch.autograd.grad(out.float().sum(), leaves)


def run_case(name: str) -> None:
    """Warm-up call, then one forward + backward inside the NVTX range ncu is told to profile."""
    op, dims, dtype, backend = CASES[name]
    call, leaves = _call(op, dims, dtype, backend, torch.device("cuda"))
    forward_backward(call, leaves)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("linrec")
    forward_backward(call, leaves)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def _rows(path: str) -> List[Dict[str, str]]:
    """ncu --csv prints log lines before the CSV header: keep from the header on."""
    text = open(path, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        return []
    return list(csv.DictReader(io.StringIO(text[start:])))


def summarize(directory: str) -> str:
    """A markdown table of the ncu CSVs (``ncu-CASE.csv``) under ``directory``, one row per launch."""
    lines = ["| case | kernel | grid | regs | occupancy % | DRAM read MB | DRAM write MB | us |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(directory, "ncu-*.csv"))):
        case = os.path.basename(path)[len("ncu-"):-len(".csv")]
        launches: Dict[Tuple[str, str], Dict[str, str]] = {}
        for row in _rows(path):
            key = (row.get("ID", ""), row.get("Kernel Name", ""))
            launches.setdefault(key, {})[row.get("Metric Name", "")] = row.get("Metric Value", "")
        for (_, kernel), m in launches.items():
            def num(metric: str, scale: float = 1.0) -> str:
                value = m.get(metric, "").replace(",", "")
                try:
                    return f"{float(value) / scale:.3g}"
                except ValueError:
                    return value or "-"
            lines.append(f"| {case} | {kernel[:48]} | {num('launch__grid_size')} | "
                         f"{num('launch__registers_per_thread')} | "
                         f"{num('sm__warps_active.avg.pct_of_peak_sustained_active')} | "
                         f"{num('dram__bytes_read.sum', 1e6)} | {num('dram__bytes_write.sum', 1e6)} | "
                         f"{num('gpu__time_duration.sum', 1e3)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", nargs="?", choices=sorted(CASES), help="the case to run under ncu (needs CUDA)")
    p.add_argument("--list", action="store_true", help="print the case names, one per line")
    p.add_argument("--metrics", action="store_true", help="print the ncu --metrics argument")
    p.add_argument("--summarize", metavar="DIR", help="markdown table of DIR/ncu-*.csv")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
    elif args.metrics:
        print(METRICS)
    elif args.summarize:
        print(summarize(args.summarize))
    elif args.case:
        if not torch.cuda.is_available():
            print("bench.ncu: a case needs a CUDA device", file=sys.stderr)
            return 2
        run_case(args.case)
    else:
        p.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
