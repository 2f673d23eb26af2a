"""``python -m bench.report``: the README's performance tables (markdown) from committed CSVs.

Reads every ``bench/results/*.csv`` (or the files given), and writes
``bench/results/README_table.md``: per CSV (one device and preset), a heading with the device,
driver, torch / triton versions, git SHA and date, the measured copy bandwidth, then per op a
table of the largest point of each headline sweep (every implementation, every mode and dtype
measured there) and the issues' target ratios measured in that file.

Examples::

    python -m bench.report                              # all CSVs under bench/results
    python -m bench.report bench/results/cuda-*.csv --sweeps seqlen,target-n1
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any, Dict, List, Optional, Sequence

from .common import MODES, HelpFormatter, evaluate_targets, loop_speedups, read_csv, shape_label

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Sweeps shown by default: sequence length, the issues' target shapes and the CPU comparison.
DEFAULT_SWEEPS = ("seqlen", "cpu-target", "target-n1", "target-n2", "target-n3", "blocksize")


def _targets():
    from . import block_diagonal, diagonal, householder
    return diagonal.targets() + householder.targets() + block_diagonal.targets()


def _fmt_ms(r: Dict[str, Any]) -> str:
    return f"{r['median_ms']:.3g} ({r['p20_ms']:.3g}–{r['p80_ms']:.3g})"


def _headline_rows(rows: List[Dict[str, Any]], sweeps: Sequence[str]) -> List[Dict[str, Any]]:
    """Rows at the largest swept size of each (op, sweep), plus every row of target sweeps."""
    keep = []
    for (op, sweep) in dict.fromkeys((r["op"], r["sweep"]) for r in rows):
        if sweep not in sweeps:
            continue
        sel = [r for r in rows if r["op"] == op and r["sweep"] == sweep]
        if sweep == "seqlen":
            top = max(r["x_value"] for r in sel)
            sel = [r for r in sel if r["x_value"] == top]
        keep.extend(sel)
    return keep


def table_for_file(path: str, sweeps: Sequence[str]) -> str:
    """The markdown section of one results CSV."""
    rows = read_csv(path)
    if not rows:
        return f"### {os.path.basename(path)}\n\n(no rows)\n"
    env = rows[0]
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    tuned = f", kernel launch settings {env['kernel_config']}" if env.get("kernel_config") else ""
    out = [f"### {env['device']}",
           "",
           f"`{os.path.relpath(path)}` — torch {env['torch']}, triton {env['triton']}{cuda}{driver}, "
           f"linrec {env['git_sha']}{tuned}, {env['utc_time']}. Measured copy bandwidth "
           f"{float(env['copy_gbps']):.1f} GB/s. Times are median (p20–p80) ms; GB/s counts the bytes "
           f"that must move (each input read once, each output written once); "
           f"\"vs loop\" is the per-step PyTorch loop's time over this one's.",
           ""]
    rows_shown = _headline_rows(rows, sweeps)
    for op in dict.fromkeys(r["op"] for r in rows_shown):
        sel = [r for r in rows_shown if r["op"] == op]
        out.append(f"**{op}**")
        out.append("")
        out.append("| shape | mode | dtype | impl | median ms (p20–p80) | GB/s | % copy BW | TFLOP/s | vs loop |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        sel.sort(key=lambda r: (r["sweep"], r["x_value"], shape_label(r), MODES.index(r["mode"]), r["dtype"],
                                r["median_ms"]))
        for r, vs_loop in zip(sel, loop_speedups(sel)):
            speedup = f"{vs_loop:.2f}x" if vs_loop is not None else ""
            frac = f"{100 * r['frac_copy']:.1f}" if isinstance(r["frac_copy"], float) else ""
            tflops = f"{r['tflops']:.3g}" if isinstance(r["tflops"], float) else ""
            out.append(f"| {shape_label(r)} | {r['mode']} | {r['dtype']} | {r['impl']} | {_fmt_ms(r)} | "
                       f"{r['gbps']:.3g} | {frac} | {tflops} | {speedup} |")
        out.append("")
    lines = [line for line in evaluate_targets(_targets(), rows) if not line.startswith("[--]")]
    if lines:
        out.append("Targets measured in this file (`ok` = goal met, `no` = not met):")
        out.append("")
        out.extend(f"- {line}" for line in lines)
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench.report``."""
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("csvs", nargs="*", default=[], help="results CSVs (default: bench/results/*.csv)")
    p.add_argument("--sweeps", default=",".join(DEFAULT_SWEEPS), help="sweeps to show (comma-separated)")
    p.add_argument("--out", default=os.path.join(RESULTS, "README_table.md"),
                   help="markdown file to write (default: bench/results/README_table.md)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Writes the markdown tables of the given (or all committed) CSVs; returns the text."""
    args = build_parser().parse_args(argv)
    paths = args.csvs or sorted(glob.glob(os.path.join(RESULTS, "*.csv")))
    sweeps = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    sections = ["## Performance", "",
                "Generated by `python -m bench.report` from the CSVs in `bench/results/` "
                "(written by `python -m bench`).", ""]
    sections.extend(table_for_file(path, sweeps) for path in paths)
    text = "\n".join(sections)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {args.out}")
    return text


if __name__ == "__main__":
    main()
