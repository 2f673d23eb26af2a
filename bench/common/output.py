"""Writing results down: the CSV (and reading it back), the printed table, the plots, the targets.

The CSV has one row per measured (implementation, point, mode, dtype) with the environment
columns of :func:`bench.common.provenance.environment`; :func:`format_table` and
:func:`plot_sweeps` show the rows one (op, sweep) group at a time, naming in the group's title the
sizes that stay fixed along it; :func:`evaluate_targets` checks the issues' goals on them.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .spec import DIM_COLUMNS, MODES, Target

ENV_COLUMNS = ("device", "driver", "cuda", "torch", "triton", "git_sha", "utc_time", "kernel_config", "cpp_hugepages",
               "cpp_output_cache")
CSV_COLUMNS = (("op", "sweep", "impl", "kind", "mode", "dtype", "x_name", "x_value") + DIM_COLUMNS
               + ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "tflops", "peak_extra_mb",
                  "output_mb", "bytes_model", "copy_gbps", "timing", "cpu_ms") + ENV_COLUMNS)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_csv(path: str, rows: List[Dict[str, Any]], env: Dict[str, str]) -> None:
    """Writes the rows, each with the environment columns, to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in {**row, **env}.items() if k in CSV_COLUMNS})


def read_csv(path: str) -> List[Dict[str, Any]]:
    """Reads a results CSV back, numbers as floats where they parse."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: Dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v) if k not in ENV_COLUMNS and k not in ("op", "sweep", "impl") else v
                except (TypeError, ValueError):
                    parsed[k] = v
            rows.append(parsed)
    return rows


def dims_of(row: Dict[str, Any]) -> Dict[str, int]:
    """The sizes a row has (its non-empty ``DIM_COLUMNS``), as integers, in column order."""
    return {k: int(float(row[k])) for k in DIM_COLUMNS if row.get(k, "") not in ("", None)}


def shape_label(row: Dict[str, Any], names: Optional[Sequence[str]] = None) -> str:
    """``B=8 T=4096 D=512`` from a row's size columns (only ``names``, when given)."""
    return " ".join(f"{k}={v}" for k, v in dims_of(row).items() if names is None or k in names)


def split_dims(rows: List[Dict[str, Any]]) -> Tuple[Dict[str, int], List[str]]:
    """The sizes that are the same in every row (name -> value), and the names of those that vary.

    Along the block-size sweep, for instance, ``b`` varies and so does ``G`` (the width G b is
    what stays fixed), so ``G`` is reported as varying, not as the first row's value.
    """
    seen: Dict[str, set] = {}
    for r in rows:
        for k, v in dims_of(r).items():
            seen.setdefault(k, set()).add(v)
    fixed = {k: next(iter(vs)) for k, vs in seen.items() if len(vs) == 1}
    return fixed, [k for k, vs in seen.items() if len(vs) > 1]


def group_title(op: str, sweep: str, rows: List[Dict[str, Any]]) -> Tuple[str, List[str]]:
    """``"block-diagonal / blocksize: B=2 T=128, G varies with b"`` for one (op, sweep) group, and
    the sizes a row of the group must still name (the swept size and any other that varies)."""
    fixed, varying = split_dims(rows)
    x_name = rows[0]["x_name"]
    per_row = [k for k in DIM_COLUMNS if k == x_name or k in varying]
    title = f"{op} / {sweep}"
    shown = " ".join(f"{k}={v}" for k, v in fixed.items() if k not in per_row)
    if shown:
        title += f": {shown}"
    others = [k for k in varying if k != x_name]
    if others:
        title += f"{',' if shown else ':'} {', '.join(others)} {'vary' if len(others) > 1 else 'varies'} with {x_name}"
    return title, per_row


def _groups(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    """The rows by (op, sweep), in the order they were run."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["sweep"]), []).append(r)
    return groups


# --------------------------------------------------------------------------------------------
# The printed table
# --------------------------------------------------------------------------------------------

LOOP_BASELINE = "torch_loop"   # the per-step PyTorch loop: the "vs loop" column's yardstick
TABLE_WIDTH = 120              # the printed table fits a terminal this wide
TABLE_LEGEND = ("ms: median time; spread: (p80 - p20) / median; %copy: GB/s over the measured copy "
                "bandwidth; vs loop: the per-step loop's median over this one's")


def loop_speedups(rows: List[Dict[str, Any]], baseline: str = LOOP_BASELINE) -> List[Optional[float]]:
    """Per row, the baseline's median time over the row's at the same op, sweep, shape, mode and
    dtype (``time(loop) / time(impl)``: above 1 is faster than the loop); None where the baseline
    did not run there."""
    def key(r):
        return (r["op"], r["sweep"], shape_label(r), r["mode"], r["dtype"])

    loop_ms = {key(r): r["median_ms"] for r in rows if r["impl"] == baseline}
    return [loop_ms[key(r)] / r["median_ms"] if key(r) in loop_ms else None for r in rows]


def _num(x: float) -> str:
    """Three significant digits without an exponent: ``0.00512``, ``3.14``, ``12.3``, ``4096``."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A fixed-width text table of the measured rows, one block per (op, sweep) as they were run.

    Each block's title names the op, the sweep and the sizes fixed along it, so a row names only
    the sizes that vary. Columns: shape, mode, dtype, implementation, median ms, spread (p80 - p20
    over the median), GB/s, % of copy bandwidth, TFLOP/s, peak extra MiB, and the speed-up against
    the per-step loop; a column empty in every row of a block (TFLOP/s of the diagonal op, peak
    memory on the CPU) is left out of that block.
    """
    header = ("shape", "mode", "dtype", "impl", "ms", "spread", "GB/s", "%copy", "TFLOP/s", "peak MiB", "vs loop")
    speedups = dict(zip(map(id, rows), loop_speedups(rows)))
    blocks = [textwrap.fill(TABLE_LEGEND, TABLE_WIDTH)]
    for (op, sweep), grp in _groups(rows).items():
        title, per_row = group_title(op, sweep, grp)
        lines = []
        for r in grp:
            med, speedup = r["median_ms"], speedups[id(r)]
            lines.append((
                shape_label(r, per_row), r["mode"], r["dtype"], r["impl"], _num(med),
                f"{100 * (r['p80_ms'] - r['p20_ms']) / med:.0f}%" if med > 0 else "",
                _num(r["gbps"]),
                f"{100 * r['frac_copy']:.1f}" if isinstance(r["frac_copy"], float) else "",
                _num(r["tflops"]) if isinstance(r["tflops"], float) else "",
                _num(r["peak_extra_mb"]) if isinstance(r["peak_extra_mb"], float) else "",
                (f"{speedup:.2f}x" if speedup < 100 else f"{speedup:.0f}x") if speedup is not None else "",
            ))
        keep = [i for i in range(len(header)) if i < 4 or any(line[i] for line in lines)]
        cols = [[header[i]] + [line[i] for line in lines] for i in keep]
        widths = [max(len(c) for c in col) for col in cols]
        table = ["  ".join(c[j].ljust(w) for c, w in zip(cols, widths)).rstrip() for j in range(len(lines) + 1)]
        table.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join([textwrap.fill(title, TABLE_WIDTH)] + table))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def plot_sweeps(rows: List[Dict[str, Any]], out_prefix: str, env: Dict[str, str]) -> List[str]:
    """One PNG per (op, sweep): a panel per (mode, dtype), median time vs the swept size,
    one line per implementation (log-log). Returns the written paths.

    The title (the group's title of :func:`format_table`, then device, versions and git SHA) is
    wrapped to the figure's width, and the layout makes room for it, so nothing is cut off.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title_fontsize = 9
    written = []
    for (op, sweep), grp in _groups(rows).items():
        panels = sorted({(r["mode"], r["dtype"]) for r in grp}, key=lambda p: (MODES.index(p[0]), p[1]))
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        width = max(6.5, 5 * ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.8 * nrows + 0.6), squeeze=False,
                                 layout="constrained")
        for ax, (mode, dtype) in zip(axes.flat, panels):
            sel = [r for r in grp if r["mode"] == mode and r["dtype"] == dtype]
            for impl in sorted({r["impl"] for r in sel}):
                pts = sorted((r["x_value"], r["median_ms"], r["p20_ms"], r["p80_ms"]) for r in sel
                             if r["impl"] == impl)
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=impl)
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(sel[0]["x_name"] if sel else "")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"{mode} {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        title, _ = group_title(op, sweep, grp)
        details = (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}"
                   + (f" | {env['kernel_config']}" if env.get("kernel_config") else ""))
        chars_per_line = int(width * 72 / (0.62 * title_fontsize))   # a character is ~0.6 em wide
        fig.suptitle("\n".join(textwrap.wrap(title, chars_per_line) + textwrap.wrap(details, chars_per_line)),
                     fontsize=title_fontsize)
        path = f"{out_prefix}-{op}-{sweep}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def evaluate_targets(targets: List[Target], rows: List[Dict[str, Any]]) -> List[str]:
    """One line per target: the measured ratio (or fraction of copy bandwidth) against its goal.

    A speedup (or time ratio) is taken at every matching point where both implementations ran,
    and the worst one is reported with the point it came from: the smallest speedup, the
    largest time ratio. A target with ``baseline_mode`` pairs the implementation's rows with
    the baseline's rows of that mode at the same sweep, shape and dtype.
    """
    lines = []
    for t in targets:
        sel = [r for r in rows if t.where(r)]
        impl = next((name for name in t.impl if any(r["impl"] == name for r in sel)), None)
        if impl is None:
            lines.append(f"[--] {t.label}: not measured ({'/'.join(t.impl)} did not run here)")
            continue
        key = lambda r: (r["sweep"], shape_label(r), r["mode"], r["dtype"])  # noqa: E731
        mine = {key(r): r for r in sel if r["impl"] == impl}
        if t.kind == "bandwidth":
            worst = min(mine.values(), key=lambda r: r["frac_copy"])
            ok = worst["frac_copy"] >= t.goal
            lines.append(f"[{'ok' if ok else 'no'}] {t.label}: {impl} reaches {100 * worst['frac_copy']:.1f}% "
                         f"of copy bandwidth (worst point {shape_label(worst)} {worst['mode']} {worst['dtype']}; "
                         f"goal >= {100 * t.goal:.0f}%)")
            continue
        base = next((name for name in t.baseline if any(r["impl"] == name for r in sel)), None)
        if base is None:
            lines.append(f"[--] {t.label}: baseline {'/'.join(t.baseline)} not measured here")
            continue
        theirs = {key(r): r for r in sel if r["impl"] == base}

        def their_key(k):
            return k if t.baseline_mode is None else (k[0], k[1], t.baseline_mode, k[3])

        pairs = [(theirs[their_key(k)]["median_ms"], mine[k]) for k in mine if their_key(k) in theirs]
        if not pairs:
            lines.append(f"[--] {t.label}: {impl} and {base} never ran at the same point")
            continue
        against = f"{base}{' ' + t.baseline_mode if t.baseline_mode else ''}"
        if t.kind == "time_ratio":
            worst_ratio, r = max(((r["median_ms"] / ms, r) for ms, r in pairs), key=lambda p: p[0])
            ok = worst_ratio <= t.goal
            lines.append(f"[{'ok' if ok else 'no'}] {t.label}: {impl} takes {worst_ratio:.2f}x the time of "
                         f"{against} (worst of {len(pairs)} point(s): {shape_label(r)} {r['mode']} {r['dtype']}; "
                         f"goal <= {t.goal:.3g}x)")
            continue
        worst_ratio, r = min(((ms / r["median_ms"], r) for ms, r in pairs), key=lambda p: p[0])
        ok = worst_ratio >= t.goal
        lines.append(f"[{'ok' if ok else 'no'}] {t.label}: {impl} is {worst_ratio:.2f}x {against} "
                     f"(worst of {len(pairs)} point(s): {shape_label(r)} {r['mode']} {r['dtype']}; "
                     f"goal >= {t.goal:g}x)")
    return lines


#: What ``backend="auto"`` runs on a CPU, in order: the compiled backend where it takes the call
#: (the bench's ``linrec.cpp`` row exists only there: elsewhere the backend refuses the point),
#: else the chunked PyTorch form.
CPU_AUTO_ORDER = ("linrec.cpp", "linrec.torch")


def check_against_loop(rows: List[Dict[str, Any]], baseline: str = LOOP_BASELINE) -> List[str]:
    """Issue 20's "no CPU shape slower than the per-step loop", on the measured rows.

    At every (op, sweep, shape, mode, dtype) where the loop ran, two implementations are
    compared with it: what ``backend="auto"`` picks on a CPU (``linrec.cpp`` where it ran, else
    ``linrec.torch``; see :data:`CPU_AUTO_ORDER`) and ``linrec.torch`` itself. Returns a summary
    line for each (``[ok]`` when none is below 1.0x, with the slowest point) and one line per
    point below 1.0x. Speed-ups are time(loop) / time(impl), as in the table's "vs loop".
    """
    def key(r):
        return (r["op"], r["sweep"], shape_label(r), r["mode"], r["dtype"])

    by_key: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(key(r), {})[r["impl"]] = r
    lines: List[str] = []
    for who in ("auto", "linrec.torch"):
        measured = []
        for k, impls in by_key.items():
            if baseline not in impls:
                continue
            name = next((n for n in CPU_AUTO_ORDER if n in impls), None) if who == "auto" else (
                who if who in impls else None)
            if name is None:
                continue
            measured.append((impls[baseline]["median_ms"] / impls[name]["median_ms"], name, impls[name]))
        if not measured:
            continue
        below = sorted((m for m in measured if m[0] < 1.0), key=lambda m: m[0])
        worst = min(measured, key=lambda m: m[0])
        label = ("backend='auto' on the CPU (linrec.cpp where it runs, else linrec.torch)" if who == "auto"
                 else "linrec.torch (not what auto runs where cpp takes the call)")
        lines.append(f"[{'no' if below else 'ok'}] {label} vs per-step loop: {len(below)} of {len(measured)} "
                     f"point(s) below 1.0x; slowest {worst[0]:.2f}x ({worst[1]}, {worst[2]['op']} "
                     f"{shape_label(worst[2])} {worst[2]['mode']} {worst[2]['dtype']}; goal >= 1x everywhere)")
        for ratio, name, r in below:
            lines.append(f"       below: {ratio:.2f}x {name}, {r['op']} {r['sweep']} {shape_label(r)} "
                         f"{r['mode']} {r['dtype']}")
    return lines
