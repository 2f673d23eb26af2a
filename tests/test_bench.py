"""The benchmark command runs end to end on tiny shapes and writes a parsable CSV.

No timing assertions (docs/design.md §10, Tests): only that every measured number is a positive finite
float, that the environment columns are filled in, and that the plots and the README table
are written.
"""

import csv
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``python -m bench --preset tiny`` in a subprocess (as a user would run it), on the CPU."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the bench skips GPU backends on the CPU by itself
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "bench", "--preset", "tiny", "--threads", "1", "--out", str(out),
           "--name", "tiny"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_csv_rows_parse_and_are_positive(tiny_run):
    out, _ = tiny_run
    with open(out / "tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "no rows measured"
    ops = {r["op"] for r in rows}
    assert "diagonal" in ops
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "output_mb", "bytes_model", "copy_gbps"):
            value = float(r[col])
            assert math.isfinite(value) and value > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        if r["tflops"]:
            assert float(r["tflops"]) > 0, r
        assert r["peak_extra_mb"] == "n/a"  # no CPU peak-memory counter: said, not invented
        for col in ("device", "torch", "triton", "git_sha", "utc_time"):
            assert r[col], (col, r)
    impls = {r["impl"] for r in rows if r["op"] == "diagonal"}
    assert {"linrec.torch", "torch_loop"} <= impls


def test_skips_are_notes_not_crashes(tiny_run):
    _, stdout = tiny_run
    assert "backend 'triton' needs a CUDA device" in stdout  # no GPU here: one line, no traceback
    assert "Traceback" not in stdout


def test_plots_and_report(tiny_run, tmp_path):
    out, _ = tiny_run
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert any("diagonal-seqlen" in p for p in pngs), pngs
    from bench import report
    md_path = tmp_path / "table.md"
    text = report.main([str(out / "tiny.csv"), "--out", str(md_path)])
    assert md_path.exists() and "| shape | mode |" in text and "torch" in text


def test_failing_implementation_is_a_skip_not_a_crash():
    """A baseline that raises becomes a one-line Skip marked as a failure (for the circuit breaker)."""
    import torch

    from bench import diagonal
    from bench.common import Impl, Point, Skip, run_case

    def build(inputs, point, mode):
        def fn(a, x):
            raise RuntimeError("boom: unsupported shape\nsecond line")
        return fn, [inputs["a"], inputs["x"]]

    point = Point("seqlen", "T", {"B": 1, "T": 8, "D": 4}, ("fwd",), ("fp32",))
    inputs = diagonal.make_inputs(point, torch.float32, torch.device("cpu"))
    with pytest.raises(Skip) as info:
        run_case(diagonal.OP, Impl("broken", "baseline", build), point, "fwd", "fp32", torch.device("cpu"),
                 inputs, copy_gbps=1.0, min_run_time=0.001, min_samples=1)
    assert info.value.failed and str(info.value) == "RuntimeError: boom: unsupported shape"


def test_target_ratios_use_the_worst_matching_point():
    """Speedups are time(baseline) / time(impl) at shared points, bandwidth is the worst fraction."""
    from bench.common import Target, evaluate_targets

    def row(impl, T, ms, frac):
        return {"op": "diagonal", "sweep": "seqlen", "impl": impl, "mode": "fwd", "dtype": "fp32",
                "B": 8, "T": T, "D": 1024, "median_ms": ms, "frac_copy": frac}

    rows = [row("linrec.triton", 8192, 1.0, 0.9), row("linrec.triton", 16384, 2.0, 0.8),
            row("fla.chunk_hgrn", 8192, 6.0, 0.2), row("fla.chunk_hgrn", 16384, 8.0, 0.2)]
    everything = lambda r: True  # noqa: E731
    speed, bandwidth, missing = evaluate_targets([
        Target("vs fla", "speedup", ("linrec.cuda", "linrec.triton"), 5.0, everything, ("fla.chunk_hgrn",)),
        Target("bw", "bandwidth", ("linrec.triton",), 0.85, everything),
        Target("vs accelerated-scan", "speedup", ("linrec.triton",), 1.2, everything, ("accelerated_scan.warp",)),
    ], rows)
    assert speed.startswith("[no]") and "4.00x fla.chunk_hgrn" in speed and "T=16384" in speed
    assert bandwidth.startswith("[no]") and "80.0%" in bandwidth
    assert missing.startswith("[--]")


def test_gpu_runbook_parses_and_prints_its_usage():
    script = os.path.join(REPO, "bench", "gpu.sh")
    subprocess.run(["bash", "-n", script], check=True)          # syntax
    usage = subprocess.run(["bash", script, "help"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 2 and "bash bench/gpu.sh tests" in usage.stdout


def test_gpu_target_preset_covers_every_gpu_goal():
    """``--preset gpu-target`` (the one-call check of a short GPU lease) has, for every GPU goal of
    every op, at least one (shape, mode, dtype) point that the goal's row filter selects."""
    import torch

    from bench.__main__ import OPS
    for op in OPS.values():
        points = op.sweeps("gpu-target", torch.device("cuda"))
        assert points, f"{op.name}: gpu-target has no points"
        rows = [dict(op=op.name, sweep=pt.sweep, mode=mode, dtype=dtype, **pt.dims)
                for pt in points for mode in pt.modes for dtype in pt.dtypes]
        for target in op.targets():
            if "linrec.triton" not in target.impl:
                continue  # a CPU goal: the cpu-target preset measures it
            assert any(target.where(r) for r in rows), f"gpu-target misses {target.label!r}"


# The longest implementation name of each op (the README's implementations table): the widest rows.
LONGEST_IMPL = {"diagonal": "accelerated_scan.triton", "householder": "linrec.reference",
                "block-diagonal": "linrec.reference", "selective": "expanded_diagonal"}


def made_up_rows(op, preset):
    """Rows for every point of a preset of ``op`` (GPU sizes), each measured by its longest-named
    implementation and by the per-step loop, with numbers as wide as they get."""
    import torch

    rows = []
    for pt in op.sweeps(preset, torch.device("cuda")):
        for mode in pt.modes:
            for dtype in pt.dtypes:
                for impl, ms in ((LONGEST_IMPL[op.name], 0.00512), ("torch_loop", 60.0)):
                    rows.append(dict(op=op.name, sweep=pt.sweep, impl=impl, mode=mode, dtype=dtype,
                                     x_name=pt.x_name, x_value=pt.x_value, median_ms=ms, p20_ms=0.5 * ms,
                                     p80_ms=1.5 * ms, gbps=12345.6, frac_copy=0.999, tflops=0.000123,
                                     peak_extra_mb=12345.6, **pt.dims))
    return rows


def test_table_fits_120_columns_and_gives_the_speedup_over_the_loop():
    from bench.__main__ import OPS, PRESETS
    from bench.common import TABLE_WIDTH, format_table

    assert TABLE_WIDTH == 120
    for op in OPS.values():
        for preset in PRESETS:
            text = format_table(made_up_rows(op, preset))
            wide = [line for line in text.splitlines() if len(line) > TABLE_WIDTH]
            assert not wide, (op.name, preset, wide[:2])
            impl_rows = [line for line in text.splitlines() if f" {LONGEST_IMPL[op.name]} " in line]
            assert impl_rows and all(line.endswith(" 11719x") for line in impl_rows), impl_rows[:2]  # 60 / 0.00512
            assert all(line.endswith(" 1.00x") for line in text.splitlines() if " torch_loop " in line)


def test_titles_name_only_the_sizes_fixed_along_the_sweep():
    """Along the block-size sweep G = width / b changes with b: the title says so instead of
    claiming the first point's G; the sizes fixed along a sweep are named once, in the title."""
    import torch

    from bench import block_diagonal, diagonal
    from bench.common import group_title

    rows = [dict(x_name=pt.x_name, **pt.dims) for pt in block_diagonal.sweeps("quick", torch.device("cpu"))
            if pt.sweep == "blocksize"]
    title, per_row = group_title("block-diagonal", "blocksize", rows)
    assert title == "block-diagonal / blocksize: B=2 T=128, G varies with b" and per_row == ["G", "b"]
    rows = [dict(x_name=pt.x_name, **pt.dims) for pt in diagonal.sweeps("full", torch.device("cuda"))
            if pt.sweep == "seqlen"]
    assert group_title("diagonal", "seqlen", rows) == ("diagonal / seqlen: B=8 D=1024", ["T"])


def test_every_command_line_lists_its_presets_and_shows_every_default():
    """``--help`` of ``python -m bench``, ``bench.report`` and the task commands: every option has
    help text that states its default, the task commands take ``--device``, and the bench's help
    names every preset, each of which every op knows."""
    import torch

    from bench import __main__ as bench_main
    from bench import report
    from bench.tasks import beta_probe, lm, state_tracking

    parsers = {"bench": bench_main.build_parser(), "report": report.build_parser(),
               "state_tracking": state_tracking.build_parser(), "lm": lm.build_parser(),
               "beta_probe": beta_probe.build_parser()}
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert "default" in text, (name, action.dest, text)
    for name in ("state_tracking", "lm", "beta_probe", "bench"):
        assert "--device" in parsers[name].format_help(), name
    help_text = parsers["bench"].format_help()
    for preset in bench_main.PRESETS:
        assert preset in help_text
        for op in bench_main.OPS.values():
            op.sweeps(preset, torch.device("cpu"))  # raises on a preset the op does not know


def test_common_reexports_every_name_of_its_modules():
    """``from bench.common import X`` works for every public name of bench/common/*.py."""
    import bench.common
    from bench.common import cli, output, provenance, spec, timing

    for module in (cli, provenance, output, spec, timing):
        own = [name for name, value in vars(module).items() if not name.startswith("_")
               and getattr(value, "__module__", module.__name__) == module.__name__
               and not isinstance(value, type(bench.common))]
        missing = [name for name in own if getattr(bench.common, name, None) is not getattr(module, name)]
        assert not missing, (module.__name__, missing)
    assert bench.common.git_sha() == bench.common.environment(__import__("torch").device("cpu"))["git_sha"]


# ---------------------------------------------------------------------------------------------
# bench.ncu: the Nsight Compute cases of a GPU lease, checked here at small shapes
# ---------------------------------------------------------------------------------------------

_SMALL = {"B": 1, "T": 16, "D": 8, "G": 2, "H": 2, "K": 8, "V": 8}


@pytest.mark.parametrize("case", sorted(__import__("bench.ncu", fromlist=["CASES"]).CASES))
def test_ncu_case_builds_its_call_and_differentiates(case):
    """Every ncu case's inputs and call run (at a small shape, torch backend on the CPU) and give
    finite gradients for every leaf, so a GPU lease does not spend time on a broken case."""
    import torch
    from bench import ncu
    op, dims, dtype, _ = ncu.CASES[case]
    small = {k: _SMALL.get(k, v) for k, v in dims.items()}
    call, leaves = ncu._call(op, small, dtype, "torch", torch.device("cpu"))
    out = call()
    grads = torch.autograd.grad(out.float().sum(), leaves)
    assert out.shape[:2] == (small["B"], small["T"])
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


def test_ncu_summary_reads_ncu_csv(tmp_path):
    """--summarize turns ncu's raw CSV (log lines first, values with thousands separators) into one
    markdown row per kernel launch with MB and microseconds."""
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')
    metrics = {"dram__bytes_read.sum": "268,435,456", "dram__bytes_write.sum": "134,217,728",
               "sm__warps_active.avg.pct_of_peak_sustained_active": "71.5",
               "launch__registers_per_thread": "40", "launch__grid_size": "8,192",
               "gpu__time_duration.sum": "120,000"}
    rows = "".join(f'"0","1","python","h","diagonal_scan_kernel","1","7","(128,1,1)","(8192,1,1)","0","9.0",'
                   f'"Command line profiler metrics","{name}","x","{value}"\n' for name, value in metrics.items())
    (tmp_path / "ncu-diagonal-triton-fp32.csv").write_text("==PROF== Connected to process 1\n" + header + rows)
    result = subprocess.run([sys.executable, "-m", "bench.ncu", "--summarize", str(tmp_path)], capture_output=True,
                            text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    line = [l for l in result.stdout.splitlines() if l.startswith("| diagonal-triton-fp32")]
    assert line == ["| diagonal-triton-fp32 | diagonal_scan_kernel | 8.19e+03 | 40 | 71.5 | 268 | 134 | 120 |"]


# ---------------------------------------------------------------------------------------------
# Issue 20: interleaved timing, complex64 and bf16 at the cpu-target point, floor targets
# ---------------------------------------------------------------------------------------------


def test_time_interleaved_runs_every_function_once_per_round_in_rotating_order():
    """Each timed round calls every implementation in turn (one block each), the order rotating by
    one per round; the medians come from one sample per round and sit between p20 and p80."""
    import torch

    from bench.common import time_interleaved

    log = []

    def make(name):
        def fn():
            log.append(name)
            return torch.zeros(4)
        return fn

    names = ["a", "b", "c"]
    cpu = {}
    times, order = time_interleaved({n: make(n) for n in names}, torch.device("cpu"), rounds=4,
                                    min_block_time=0.0, warmup_rounds=1, cpu_times=cpu)
    assert set(cpu) == set(names) and all(v >= 0 for v in cpu.values())
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert log == names + [n for rnd in order for n in rnd]  # one warm-up round, then the rounds, one call per block
    for n in names:
        med, p20, p80 = times[n]
        assert 0 < p20 <= med <= p80, (n, times[n])


def test_time_interleaved_blocks_short_calls_and_keeps_outputs_until_the_clock_stops():
    """A call shorter than min_block_time is repeated within its block (k calls, time per call);
    what a block's calls return is released only after the block, outside the timed region."""
    import torch

    from bench.common import time_interleaved

    counts = {"fast": 0}
    alive = []

    def fast():
        counts["fast"] += 1
        t = torch.zeros(1)
        alive.append(t)
        return t

    times, order = time_interleaved({"fast": fast}, torch.device("cpu"), rounds=3, min_block_time=0.002)
    assert len(order) == 3 and counts["fast"] > 3 + 1  # more than one call per block
    assert times["fast"][0] < 2.0                        # ms per call, not per block


class _Bar:
    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass


def _cpu_target_rows(dtype_name, modes=("fwd", "fwdbwd"), rounds=2):
    """The diagonal cpu-target point at a small size (B=1 T=64 D=32), every CPU implementation,
    timed by the runner's interleaved path; returns the rows and the skip notes."""
    import torch

    from bench import diagonal
    from bench.__main__ import _run_interleaved
    from bench.common import DTYPES, Point

    device = torch.device("cpu")
    impls, _ = diagonal.impls(device)
    impls = [i for i in impls if i.name not in ("linrec.triton", "linrec.cuda", "linrec.reference")]
    point = Point("cpu-target", "T", {"B": 1, "T": 64, "D": 32}, modes, (dtype_name,))
    inputs = diagonal.make_inputs(point, DTYPES[dtype_name], device)
    rows, skips, failures = [], {}, {}
    for mode in modes:
        rows += _run_interleaved(diagonal.OP, point, mode, dtype_name, impls, device, inputs, 1.0, rounds,
                                 skips, failures, _Bar())
    return rows, skips


def test_cpu_target_has_bf16_and_complex64_and_complex64_inputs_are_complex():
    import torch

    from bench import diagonal

    (point,) = diagonal.sweeps("cpu-target", torch.device("cpu"))
    assert point.dims == {"B": 8, "T": 4096, "D": 512}
    assert set(point.dtypes) == {"fp32", "bf16", "complex64"} and set(point.modes) == {"fwd", "bwd", "fwdbwd"}
    small = diagonal.Point("cpu-target", "T", {"B": 2, "T": 8, "D": 4}, ("fwd",), ("complex64",))
    inputs = diagonal.make_inputs(small, torch.complex64, torch.device("cpu"))
    assert inputs["a"].dtype == inputs["x"].dtype == torch.complex64
    mod = inputs["a"].abs()
    assert bool(((mod >= 0.5 - 1e-6) & (mod < 1 + 1e-6)).all())          # stable: |a| in [0.5, 1)
    assert inputs["a"].imag.abs().max() > 0.1                            # really complex


def test_complex64_point_runs_interleaved_and_every_implementation_agrees():
    """At a small cpu-target point in complex64 the runner times the linrec backends, the loop and
    both floors interleaved; the loop and linrec.torch (and cpp where built) compute the same scan
    (within 1e-5 of the complex128 reference), and the huge-page floor computes addcmul."""
    import torch

    import linrec
    from bench import diagonal

    rows, skips = _cpu_target_rows("complex64")
    by = {(r["impl"], r["mode"]): r for r in rows}
    for impl in ("linrec.torch", "torch_loop"):
        for mode in ("fwd", "fwdbwd"):
            r = by[(impl, mode)]
            assert r["dtype"] == "complex64" and r["timing"] == "interleaved, 2 rounds"
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["bytes_model"] == {"fwd": 3, "fwdbwd": 8}[mode] * 64 * 32 * 8
    assert ("elementwise_floor", "fwd") in by and ("elementwise_floor_thp", "fwd") in by
    assert ("elementwise_floor_warm", "fwd") in by
    assert ("elementwise_floor", "fwdbwd") not in by  # a forward-only bound

    point = diagonal.Point("cpu-target", "T", {"B": 1, "T": 64, "D": 32}, ("fwd",), ("complex64",))
    inputs = diagonal.make_inputs(point, torch.complex64, torch.device("cpu"))
    a, x = inputs["a"], inputs["x"]
    ref = linrec.diagonal_scan(a.to(torch.complex128), x.to(torch.complex128), backend="reference")
    outs = {"torch_loop": diagonal.torch_loop(a, x), "linrec.torch": linrec.diagonal_scan(a, x, backend="torch")}
    if ("linrec.cpp", "fwd") in by:
        outs["linrec.cpp"] = linrec.diagonal_scan(a, x, backend="cpp")
    for name, out in outs.items():
        assert out.dtype == torch.complex64
        torch.testing.assert_close(out.to(torch.complex128), ref, rtol=1e-5, atol=1e-5, msg=name)
    floor = torch.addcmul(x, a, x, out=diagonal.empty_hugepages(x))
    torch.testing.assert_close(floor, torch.addcmul(x, a, x), rtol=0, atol=0)
    warm, args = diagonal._build_elementwise_floor_warm(inputs, point, "fwd")
    first, second = warm(*args), warm(*args)
    assert first.data_ptr() == second.data_ptr()  # one output, mapped at build time, rewritten by every call
    torch.testing.assert_close(second, torch.addcmul(x, a, x), rtol=0, atol=0)


def test_bf16_point_runs_interleaved():
    rows, _ = _cpu_target_rows("bf16", modes=("fwd",), rounds=1)
    impls = {r["impl"] for r in rows}
    assert {"linrec.torch", "torch_loop", "elementwise_floor", "elementwise_floor_thp", "elementwise_floor_warm"} <= impls
    assert all(r["dtype"] == "bf16" and r["median_ms"] > 0 for r in rows)


def _floor_rows(cpp_fwd, cpp_fwdbwd, floor, floor_thp, dtype="fp32", floor_warm=None):
    def row(impl, mode, ms):
        return {"op": "diagonal", "sweep": "cpu-target", "impl": impl, "mode": mode, "dtype": dtype,
                "B": 8, "T": 4096, "D": 512, "median_ms": ms}
    return [row("linrec.cpp", "fwd", cpp_fwd), row("linrec.cpp", "fwdbwd", cpp_fwdbwd),
            row("elementwise_floor", "fwd", floor), row("elementwise_floor_thp", "fwd", floor_thp)] + (
        [row("elementwise_floor_warm", "fwd", floor_warm)] if floor_warm is not None else [])


def test_floor_targets_compare_the_cpp_time_with_the_floor_of_the_same_pages():
    """Issue 20's CPU targets: cpp fwd <= 1.3x the floor's forward, fwd+bwd <= 1.3 x 8/3 of it, per
    dtype; the like-for-like floor follows the cpp backend's output cache and page settings, and
    PyTorch's own (fresh, 4 KiB) floor is reported too where it is not the like-for-like one."""
    from bench import diagonal
    from bench.common import evaluate_targets

    rows = _floor_rows(cpp_fwd=12.0, cpp_fwdbwd=40.0, floor=30.0, floor_thp=10.0)
    lines = evaluate_targets(diagonal.cpu_floor_targets("on", "off"), rows)
    fp32 = [line for line in lines if " fp32:" in line]
    assert len(fp32) == 4 and all(line.startswith("[--]") for line in lines if " fp32:" not in line)
    like_fwd, torch_fwd, like_both, torch_both = fp32
    assert like_fwd.startswith("[ok]") and "1.20x the time of elementwise_floor_thp fwd" in like_fwd
    assert torch_fwd.startswith("[ok]") and "0.40x the time of elementwise_floor fwd" in torch_fwd
    assert like_both.startswith("[no]") and "4.00x the time of elementwise_floor_thp fwd" in like_both  # > 3.47
    assert torch_both.startswith("[ok]") and "1.33x" in torch_both and "goal <= 3.47x" in torch_both
    off = evaluate_targets(diagonal.cpu_floor_targets("off", "off"),
                           _floor_rows(12.0, 40.0, 10.0, 5.0, dtype="complex64"))
    measured = [line for line in off if not line.startswith("[--]")]
    assert len(measured) == 2 and all("elementwise_floor fwd" in line and "4 KiB" in line for line in measured)
    assert measured[0].startswith("[ok]") and "1.20x" in measured[0]
    assert measured[1].startswith("[no]") and "4.00x" in measured[1]
    # output cache on (the default): the warm floor (no page faults on either side) is the like-for-like one
    cached = evaluate_targets(diagonal.cpu_floor_targets("on", "on"), _floor_rows(12.0, 40.0, 30.0, 10.0, floor_warm=8.0))
    fp32 = [line for line in cached if " fp32:" in line]
    assert len(fp32) == 4
    assert fp32[0].startswith("[no]") and "1.50x the time of elementwise_floor_warm fwd" in fp32[0]
    assert fp32[2].startswith("[no]") and "5.00x the time of elementwise_floor_warm fwd" in fp32[2]
    assert fp32[1].startswith("[ok]") and "0.40x the time of elementwise_floor fwd" in fp32[1]


def test_floor_targets_are_evaluated_on_a_small_measured_point():
    """The targets find their rows in a real (small, interleaved) run: cpp where it builds."""
    from bench import diagonal
    from bench.common import evaluate_targets

    rows, _ = _cpu_target_rows("fp32", rounds=1)
    if not any(r["impl"] == "linrec.cpp" for r in rows):
        pytest.skip("the cpp backend is not built on this machine")
    lines = [line for line in evaluate_targets(diagonal.cpu_floor_targets(), rows) if " fp32:" in line]
    assert lines and all(line[:4] in ("[ok]", "[no]") for line in lines), lines


def test_check_against_loop_follows_what_auto_runs():
    """auto = linrec.cpp where it ran at a point, else linrec.torch; every point below the loop is listed."""
    from bench.common import check_against_loop

    def row(impl, T, ms, op="diagonal"):
        return {"op": op, "sweep": "seqlen", "impl": impl, "mode": "fwd", "dtype": "fp32", "B": 2, "T": T,
                "D": 64, "median_ms": ms}

    rows = [row("torch_loop", 128, 10.0), row("linrec.cpp", 128, 2.0), row("linrec.torch", 128, 20.0),
            row("torch_loop", 512, 10.0, op="selective"), row("linrec.torch", 512, 12.5, op="selective")]
    auto, auto_below, torch_line, torch_below1, torch_below2 = check_against_loop(rows)
    assert auto.startswith("[no]") and "1 of 2 point(s) below 1.0x" in auto and "slowest 0.80x" in auto
    assert "0.80x linrec.torch, selective" in auto_below
    assert torch_line.startswith("[no]") and "2 of 2" in torch_line
    assert "0.50x linrec.torch, diagonal" in torch_below1 and "0.80x" in torch_below2
    assert check_against_loop(rows[:2])[0].startswith("[ok]")


def test_interleave_flag_end_to_end(tmp_path):
    """``--interleave --rounds 2`` from the command line: the CSV says how each row was timed."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "bench", "diagonal", "--preset", "tiny", "--threads", "1", "--interleave",
           "--rounds", "2", "--impls", "linrec.torch,loop", "--out", str(tmp_path), "--name", "il", "--no-plot"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "timing: interleaved, 2 rounds" in proc.stdout
    with open(tmp_path / "il.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} == {"linrec.torch", "torch_loop"}
    assert all(r["timing"] == "interleaved, 2 rounds" and r["cpp_hugepages"] in ("on", "off")
               and r["cpp_output_cache"] in ("on", "off") for r in rows)
    assert all(float(r["cpu_ms"]) >= 0 for r in rows)
    assert "vs per-step loop" in proc.stdout  # the no-slower-than-the-loop check ran
