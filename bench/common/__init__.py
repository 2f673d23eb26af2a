"""Shared machinery of the benchmark, one module per concern:

* :mod:`bench.common.spec`: what a case is (:class:`Point`, :class:`Impl`, :class:`OpSpec`,
  :class:`Target`, :class:`Skip`) and the rules that refuse a point;
* :mod:`bench.common.provenance`: device, driver, versions, git SHA (:func:`git_sha`) and time;
* :mod:`bench.common.timing`: timing (one case on its own, :func:`run_case`, or a point's
  implementations in interleaved rounds, :func:`time_interleaved`), copy bandwidth, CSV rows;
* :mod:`bench.common.output`: CSV, printed table, plots and target checks;
* :mod:`bench.common.cli`: the help formatter and ``--device`` of every bench command line.

Every name is re-exported here, so ``from bench.common import X`` works for all of them.
"""

from .cli import HelpFormatter, add_device_option, pick_device
from .provenance import cpp_hugepages, cpp_output_cache, cpu_name, cuda_driver, device_slug, environment, git_sha
from .output import (CPU_AUTO_ORDER, CSV_COLUMNS, ENV_COLUMNS, LOOP_BASELINE, TABLE_LEGEND, TABLE_WIDTH,
                     check_against_loop, dims_of, evaluate_targets, format_table, group_title, loop_speedups,
                     plot_sweeps, read_csv, shape_label, split_dims, write_csv)
from .spec import (DIM_COLUMNS, DTYPES, LINREC_BACKENDS, MODES, Impl, OpSpec, Point, Skip, Target, both, cap_steps,
                   linrec_backend_impls, needs_cuda, optional_import, probe_backend)
from .timing import (build_mode_fn, make_row, measure_copy_bandwidth, peak_extra_memory_mb, prepare_case, run_case,
                     time_fn, time_interleaved)

_git_sha = git_sha  # the name of the git-SHA helper before the split

__all__ = [
    "HelpFormatter", "add_device_option", "pick_device",
    "cpp_hugepages", "cpp_output_cache", "cpu_name", "cuda_driver", "device_slug", "environment", "git_sha",
    "CPU_AUTO_ORDER", "check_against_loop", "CSV_COLUMNS", "ENV_COLUMNS", "LOOP_BASELINE", "TABLE_LEGEND", "TABLE_WIDTH", "dims_of", "evaluate_targets", "format_table",
    "group_title", "loop_speedups", "plot_sweeps", "read_csv", "shape_label", "split_dims", "write_csv",
    "DIM_COLUMNS", "DTYPES", "LINREC_BACKENDS", "MODES", "Impl", "OpSpec", "Point", "Skip", "Target", "both",
    "cap_steps", "linrec_backend_impls", "needs_cuda", "optional_import", "probe_backend",
    "build_mode_fn", "make_row", "measure_copy_bandwidth", "peak_extra_memory_mb", "prepare_case", "run_case",
    "time_fn", "time_interleaved",
]
