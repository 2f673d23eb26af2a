"""``python -m bench``: one command that benchmarks every op, backend and baseline.

Examples::

    python -m bench                          # quick sweep of all three ops (about 2 minutes on a 2-core CPU)
    python -m bench diagonal --preset cpu-target   # B=8 T=4096 D=512 fp32: torch backend vs loop
    python -m bench --full                   # the GPU sweep (all ops; run one op per call if the
                                             # machine limits a command's time)
    python -m bench --preset gpu-target      # only the points the GPU goals are judged on
    python -m bench householder --full --modes fwdbwd --dtypes bf16

Writes ``<out>/<device>-<preset>[-<ops>].csv`` (one row per measured point, with device,
driver, versions, git SHA and UTC time) and one PNG per (op, sweep); prints a table (with each
implementation's speed-up against the per-step loop), the skipped implementations (one line
each) and the issues' target ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import block_diagonal, diagonal, householder, selective
from .common import (DTYPES, MODES, HelpFormatter, OpSpec, Skip, add_device_option, check_against_loop, device_slug,
                     environment, evaluate_targets, format_table, make_row, measure_copy_bandwidth,
                     peak_extra_memory_mb, pick_device, plot_sweeps, prepare_case, run_case, time_interleaved,
                     write_csv)

OPS: Dict[str, OpSpec] = {
    "diagonal": diagonal.OP,
    "householder": householder.OP,
    "block-diagonal": block_diagonal.OP,
    "selective": selective.OP,
}
# The presets, each with what it runs (every op module's ``sweeps(preset, device)`` knows them all).
PRESETS = {
    "tiny": "seconds; the shapes tests/test_bench.py runs",
    "quick": "small shapes of every op, fwd and fwd+bwd, fp32 (about 2 minutes on a 2-core CPU)",
    "cpu-target": "the CPU comparisons of the issues: diagonal B=8 T=4096 D=512 fp32, block-diagonal b=4 "
                  "B=8 T=4096 G=64 fp32 (cpp vs torch), and small CPU points of the other ops",
    "gpu-target": "only the points the GPU goals are judged on, for a short GPU lease (150 cases)",
    "full": "the GPU sweep: sequence length, batch, width/heads, block size, n factors, dtypes, every mode, "
            "and the issues' target shapes",
}
SUSPECT_FRAC_COPY = 1.1  # rows moving their modelled bytes faster than this x the copy bandwidth get a note
MAX_FAILURES = 3  # an implementation that raised this many times in a row (per op and dtype) is not retried
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench`` (``--help`` lists the presets and every default)."""
    presets = "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:12s}", subsequent_indent=" " * 14)
                         for name, text in PRESETS.items())
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=HelpFormatter,
                                epilog="presets:\n" + presets)
    p.add_argument("ops", nargs="*", default=[], metavar="OP",
                   help=f"which ops to run: {', '.join(OPS)} or all (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the quick preset (the default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="the full preset (default: quick)")
    g.add_argument("--preset", help=f"{' | '.join(PRESETS)}, or several joined by commas (e.g. quick,cpu-target); "
                                    "see the list below (default: quick)")
    p.add_argument("--modes", default="", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--dtypes", default="", help=f"comma-separated subset of {','.join(DTYPES)} (default: all "
                                                "that the preset measures)")
    p.add_argument("--sweeps", default="", help="comma-separated sweep names to keep, e.g. seqlen,target "
                                                "(default: all)")
    p.add_argument("--impls", default="", help="comma-separated substrings; keep implementations whose "
                                               "name contains one, e.g. linrec,loop (default: all)")
    p.add_argument("--skip-impls", default="", help="comma-separated substrings; drop implementations whose "
                                                    "name contains one, e.g. associative_scan,reference "
                                                    "(default: none)")
    add_device_option(p)
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per point (default: 0.005 tiny, 0.02 quick, 0.1 on CUDA, 0.2 on the CPU)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time a point's implementations in interleaved rounds (each round runs every one in "
                        "turn; median, p20, p80 over the rounds) instead of one after the other (default: on "
                        "for the cpu-target preset on the CPU, off otherwise)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of --interleave (default: 3 for tiny and quick, 9 otherwise)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads, 0 for torch's own choice; 1 gives steadier numbers on a shared machine")
    p.add_argument("--out", default="", help="folder for the CSV and PNGs (default: bench/results for full and "
                                             "cpu-target runs, bench/results/local (git-ignored) for tiny/quick)")
    p.add_argument("--name", default="", help="file name stem (default: <device>-<preset>[-<ops>])")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--dry-run", action="store_true", help="list the points and implementations, run nothing")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the command line; fills in the preset and the output folder."""
    p = build_parser()
    args = p.parse_args(argv)
    args.preset = args.preset or "quick"
    if not args.out:  # quick looks must not overwrite the committed results
        quick_only = set(args.preset.split(",")) <= {"tiny", "quick"}
        args.out = os.path.join(DEFAULT_OUT, "local") if quick_only else DEFAULT_OUT
    for preset in args.preset.split(","):
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    for op in args.ops:
        if op not in OPS and op != "all":
            p.error(f"unknown op {op!r}; choose from {', '.join(OPS)}, all")
    return args


def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _broken(op: OpSpec, impl, dtype_name: str, skips: Dict[tuple, int], failures: Dict[tuple, int]) -> bool:
    """Whether the circuit breaker holds ``impl`` off (it failed MAX_FAILURES times in a row for this
    op and dtype); counts the case as skipped when it does."""
    if failures.get((op.name, impl.name, dtype_name), 0) < MAX_FAILURES:
        return False
    key = (op.name, impl.name, f"not retried after {MAX_FAILURES} failures in a row ({dtype_name})")
    skips[key] = skips.get(key, 0) + 1
    return True


def _note_skip(op: OpSpec, impl, dtype_name: str, skip: Skip, skips: Dict[tuple, int],
               failures: Dict[tuple, int]) -> None:
    key = (op.name, impl.name, str(skip))
    skips[key] = skips.get(key, 0) + 1
    if skip.failed:
        breaker = (op.name, impl.name, dtype_name)
        failures[breaker] = failures.get(breaker, 0) + 1


def _run_interleaved(op: OpSpec, point, mode: str, dtype_name: str, impls, device, inputs: Dict[str, Any],
                     copy_gbps: float, rounds: int, skips: Dict[tuple, int], failures: Dict[tuple, int],
                     bar) -> List[Dict[str, Any]]:
    """One point and mode: every implementation built (one warm-up call each), then timed in
    ``rounds`` interleaved rounds (:func:`bench.common.time_interleaved`); one row each."""
    built = {}
    for impl in impls:
        bar.set_postfix_str(f"{op.name} {impl.name} {mode} {dtype_name} {point.x_name}={point.x_value} (build)")
        if _broken(op, impl, dtype_name, skips, failures):
            bar.update(1)
            continue
        try:
            built[impl.name] = (impl, *prepare_case(impl, point, mode, device, inputs))
        except Skip as skip:
            _note_skip(op, impl, dtype_name, skip, skips, failures)
            bar.update(1)
    if not built:
        return []
    bar.set_postfix_str(f"{op.name} {len(built)} impls {mode} {dtype_name} {point.x_name}={point.x_value} "
                        f"({rounds} interleaved rounds)")
    try:
        cpu_times: Dict[str, float] = {}
        times, _ = time_interleaved({name: fn for name, (_, fn, _) in built.items()}, device, rounds=rounds,
                                    cpu_times=cpu_times)
    except Exception as exc:  # noqa: BLE001 - one implementation failing while timed drops the point's rows
        for impl, _, _ in built.values():
            _note_skip(op, impl, dtype_name, Skip(f"interleaved timing failed: {type(exc).__name__}: "
                                                  f"{str(exc).strip()[:120]}", failed=True), skips, failures)
        bar.update(len(built))
        return []
    rows = []
    for name, (impl, fn, out_bytes) in built.items():
        peak = peak_extra_memory_mb(fn, device)
        rows.append(make_row(op, impl, point, mode, dtype_name, times[name], out_bytes, copy_gbps, peak,
                             f"interleaved, {rounds} rounds", cpu_ms=cpu_times[name]))
        failures[(op.name, impl.name, dtype_name)] = 0
        bar.update(1)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Runs the benchmark; returns the measured rows (also written to the CSV)."""
    from tqdm import tqdm

    args = parse_args(argv)
    ops = list(OPS) if not args.ops or "all" in args.ops else list(dict.fromkeys(args.ops))
    device = pick_device(args.device)
    modes = _split(args.modes) or list(MODES)
    dtypes = _split(args.dtypes) or list(DTYPES)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {MODES}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; choose from {tuple(DTYPES)}")
    sweep_filter, impl_filter, impl_skip = _split(args.sweeps), _split(args.impls), _split(args.skip_impls)
    min_run_time = args.min_run_time if args.min_run_time is not None else (
        {"tiny": 0.005, "quick": 0.02}.get(args.preset, 0.1 if device.type == "cuda" else 0.2))
    min_samples = {"tiny": 3, "quick": 3}.get(args.preset, 7)  # a preset list gets the careful defaults
    interleave = args.interleave if args.interleave is not None else (
        device.type == "cpu" and "cpu-target" in args.preset.split(","))
    rounds = args.rounds if args.rounds is not None else {"tiny": 3, "quick": 3}.get(args.preset, 9)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"device: {env['device']}  driver: {env['driver'] or 'n/a'}  torch {env['torch']}  "
          f"triton {env['triton']}  git {env['git_sha']}  {env['utc_time']}"
          + (f"  kernel config: {env['kernel_config']}" if env["kernel_config"] else "")
          + (f"  cpp huge pages: {env['cpp_hugepages']}  cpp output cache: {env['cpp_output_cache']}"
             if env["cpp_hugepages"] else ""), flush=True)
    print("timing: " + (f"interleaved, {rounds} rounds per point and mode (median, p20, p80 over rounds)" if interleave
                        else "each implementation on its own"), flush=True)

    # Collect the work first, so the progress bar knows its length.
    plan = []
    notes: List[str] = []
    for op_name in ops:
        op = OPS[op_name]
        op_impls, op_notes = op.impls(device)
        notes.extend(op_notes)
        if impl_filter:
            op_impls = [i for i in op_impls if any(f in i.name for f in impl_filter)]
        if impl_skip:
            op_impls = [i for i in op_impls if not any(f in i.name for f in impl_skip)]
        points = [pt for preset in args.preset.split(",") for pt in op.sweeps(preset, device)]
        for point in points:
            if sweep_filter and point.sweep not in sweep_filter:
                continue
            for dtype_name in point.dtypes:
                if dtype_name not in dtypes:
                    continue
                runs = [(mode, impl) for mode in point.modes if mode in modes for impl in op_impls]
                if runs:
                    plan.append((op, point, dtype_name, runs))

    total = sum(len(runs) for *_, runs in plan)
    if args.dry_run:
        for op, point, dtype_name, runs in plan:
            print(f"{op.name:15s} {point.sweep:12s} {point.dims} {dtype_name} modes={sorted({m for m, _ in runs})} "
                  f"impls={len({i.name for _, i in runs})}")
        print(f"{total} cases (before skips)")
        return []

    copy_gbps = measure_copy_bandwidth(device, min_run_time=min_run_time,
                                       nbytes=(8 << 20) if args.preset == "tiny" else None)
    print(f"copy bandwidth (dst.copy_(src), read + write): {copy_gbps:.1f} GB/s", flush=True)

    stem = args.name or f"{device_slug(device)}-{args.preset.replace(',', '+')}" + ("" if set(ops) == set(OPS) else "-" + "-".join(ops))
    csv_path = os.path.join(args.out, stem + ".csv")
    rows: List[Dict[str, Any]] = []
    skips: Dict[tuple, int] = {}
    failures: Dict[tuple, int] = {}  # consecutive failures per (op, impl, dtype): a circuit breaker
    with tqdm(total=total, desc=f"bench {args.preset}", unit="case", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for op, point, dtype_name, runs in plan:
            inputs = None
            try:
                inputs = op.make_inputs(point, DTYPES[dtype_name], device)
            except torch.OutOfMemoryError:
                notes.append(f"{op.name}: {point.dims} {dtype_name}: inputs do not fit in memory")
                bar.update(len(runs))
                continue
            if interleave:
                for mode in dict.fromkeys(m for m, _ in runs):
                    impls = [impl for m, impl in runs if m == mode]
                    rows.extend(_run_interleaved(op, point, mode, dtype_name, impls, device, inputs, copy_gbps,
                                                 rounds, skips, failures, bar))
            else:
                for mode, impl in runs:
                    bar.set_postfix_str(f"{op.name} {impl.name} {mode} {dtype_name} {point.x_name}={point.x_value}")
                    if _broken(op, impl, dtype_name, skips, failures):
                        bar.update(1)
                        continue
                    try:
                        rows.append(run_case(op, impl, point, mode, dtype_name, device, inputs, copy_gbps,
                                             min_run_time, min_samples))
                        failures[(op.name, impl.name, dtype_name)] = 0
                    except Skip as skip:
                        _note_skip(op, impl, dtype_name, skip, skips, failures)
                    bar.update(1)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_csv(csv_path, rows, env)  # after every point: a run cut short keeps what it measured

    print()
    print(format_table(rows))
    print()
    for note in notes:
        print(f"note: {note}")
    for (op_name, impl_name, reason), count in skips.items():
        print(f"note: {op_name}: {impl_name} skipped at {count} case(s): {reason}")
    for r in rows:  # a rate above the copy bandwidth cannot come from memory: say so next to the number
        if isinstance(r["frac_copy"], float) and r["frac_copy"] > SUSPECT_FRAC_COPY:
            print(f"note: {r['op']}: {r['impl']} {r['mode']} {r['dtype']} {r['x_name']}={r['x_value']} moved the "
                  f"modelled bytes at {100 * r['frac_copy']:.0f}% of the measured copy bandwidth: faster than "
                  "memory, so suspect (data left in cache, pages reused, or a copy measured under load)")

    target_lines = evaluate_targets([t for name in ops for t in OPS[name].targets()], rows)
    if device.type == "cpu":
        target_lines += check_against_loop(rows)
    measured = [line for line in target_lines if not line.startswith("[--]")]
    if measured:
        print("\ntargets:")
        for line in measured:
            print("  " + line)

    write_csv(csv_path, rows, env)
    print(f"\nwrote {csv_path} ({len(rows)} rows)")
    if not args.no_plot and rows:
        for path in plot_sweeps(rows, os.path.join(args.out, stem), env):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
