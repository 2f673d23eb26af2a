#!/usr/bin/env bash
# The runbook of a session with a lent GPU (see bench/README.md, "On a lent GPU").
#
#   bash bench/gpu.sh prepare            # here, once: the peers' wheels (pure Python) into .whl/
#   # then on the GPU machine (device tool `run`, carry [".whl"]):
#   bash bench/gpu.sh check              # ONE call for a short lease (~8 min): versions, the test
#                                        # suite on CUDA (time-boxed), every op at the points its
#                                        # GPU goals are judged on (--preset gpu-target), ncu on one
#                                        # call per kernel family, then the peer points that may crash
#   bash bench/gpu.sh tests [PYTEST ARGS]   # the test suite on CUDA  -> $OUT/gpu-tests.log
#   bash bench/gpu.sh bench OP [ARGS]       # python -m bench OP --full -> $OUT/*.csv, *.png
#   bash bench/gpu.sh ncu [CASE ...]        # Nsight Compute, python -m bench.ncu -> $OUT/ncu-*.csv
#   # (OP: diagonal, householder, block-diagonal, selective), then here: copy the CSVs and PNGs
#   # from the run's files into bench/results/, run `python -m bench.report` and
#   # `python -m bench.ncu --summarize DIR`.
#   # Tuning: LINREC_DIAGONAL_CONFIG="BLOCK_T=16,num_warps=8" bash bench/gpu.sh bench diagonal ...
#   # check's budgets: TEST_SECONDS (default 180), BENCH_SECONDS (default 240, split over the ops)
#   # and NCU_SECONDS (default 90, split over the cases).
#
# The GPU machine has no network: linrec installs from the checkout without dependencies (torch,
# triton, einops, numpy, pytest and tqdm are in its image), the peers from .whl/.
set -euo pipefail

FLA_CORE=fla-core==0.6.0            # fla.ops.{hgrn,gated_delta_rule,gated_delta_product}; needs einops
ACCELERATED_SCAN=accelerated-scan==0.3.1

# Nsight Compute on one forward + backward per case (bench/ncu.py), each case time-boxed; a case
# that cannot be profiled (no ncu, counters not permitted) leaves its log and the rest go on.
run_ncu() {
  local cases=("$@") seconds
  seconds=$(( ${NCU_SECONDS:-90} / ${#cases[@]} + 1 ))
  if ! command -v ncu > /dev/null; then echo "ncu: not installed" | tee -a "$out/gpu.txt"; return 0; fi
  for case in "${cases[@]}"; do
    timeout "$seconds" ncu --nvtx --nvtx-include "linrec/" --metrics "$(python3 -m bench.ncu --metrics)" --csv \
      python3 -m bench.ncu "$case" > "$out/ncu-$case.csv" 2> "$out/ncu-$case.log"
    echo "ncu $case: exit $? (124: cut at $seconds s)" | tee -a "$out/gpu.txt"
  done
  python3 -m bench.ncu --summarize "$out" | tee "$out/ncu-summary.md"
}

step=${1:-help}
shift || true
case "$step" in
  prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$FLA_CORE" "$ACCELERATED_SCAN"
    ls .whl
    ;;
  tests | bench | check | ncu)
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . \
      || python3 -m pip install -q --no-deps --no-build-isolation .
    out=${OUT:-bench/results/local}
    mkdir -p "$out"
    (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed") \
      | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
      | tee -a "$out/gpu.txt"
    export PYTHONUNBUFFERED=1
    if [ "$step" = check ]; then
      # Tests first, in parallel processes where pytest-xdist is there (Triton's compiles are CPU
      # work); packaging and the ahead-of-time compiles are CPU-side checks that CI already runs.
      # Each stage is time-boxed, so what it finished still comes back under $OUT.
      par=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
      set +e
      # SIGINT at the budget lets pytest (and xdist's workers) stop and report; SIGKILL 20 s later.
      timeout -s INT -k 20 "${TEST_SECONDS:-180}" python3 -m pytest -q -rs $par -p no:cacheprovider tests \
        --ignore=tests/test_packaging.py --ignore=tests/test_aot_compile.py > "$out/gpu-tests.log" 2>&1
      echo "tests: exit $? (124: cut at ${TEST_SECONDS:-180} s)" | tee -a "$out/gpu.txt"
      tail -n 15 "$out/gpu-tests.log"; echo
      # One process per op, each with its share of the budget (percent), so that a slow one cannot
      # starve the others. accelerated-scan's bf16 points at T >= 4096 are skipped here (they
      # access memory out of bounds) and run last, in a process of their own. householder-ab (issue
      # 14's A/B): linrec's Triton Householder again with the state passes' previous launch
      # configuration (the forward pass at 4 warps and 255 registers, the fp32 adjoint pass at 255).
      : > "$out/gpu-bench.log"
      budget=${BENCH_SECONDS:-240}
      for op_share in diagonal:30 householder:25 block-diagonal:15 selective:20 householder-ab:10; do
        op=${op_share%%:*}; seconds=$(( budget * ${op_share##*:} / 100 ))
        if [ "$op" = householder-ab ]; then
          LINREC_HOUSEHOLDER_CONFIG=FWD_WARPS=4,FWD_MAXNREG=255,BWD_MAXNREG=255 timeout "$seconds" \
            python3 -m bench householder --preset gpu-target --impls linrec.triton --out "$out" \
            --name "gpu-target-$op" --no-plot >> "$out/gpu-bench.log" 2>&1
        else
          timeout "$seconds" python3 -m bench "$op" --preset gpu-target --out "$out" \
            --name "gpu-target-$op" --no-plot >> "$out/gpu-bench.log" 2>&1
        fi
        echo "bench $op: exit $? (124: cut at $seconds s; its CSV keeps every finished point)" \
          | tee -a "$out/gpu.txt"
      done
      grep -A16 '^targets:' "$out/gpu-bench.log" || tail -n 20 "$out/gpu-bench.log"
      run_ncu $(python3 -m bench.ncu --list)
      LINREC_BENCH_UNSAFE_PEER_POINTS=1 timeout 60 python3 -m bench diagonal --preset gpu-target --dtypes bf16 \
        --impls accelerated_scan.warp --out "$out" --name gpu-target-diagonal-accelerated-scan-bf16 --no-plot \
        >> "$out/gpu-bench.log" 2>&1
      echo "bench accelerated_scan.warp bf16 (out-of-bounds points): exit $?" | tee -a "$out/gpu.txt"
      exit 0
    fi
    if [ "$step" = ncu ]; then
      set +e
      [ $# -gt 0 ] || set -- $(python3 -m bench.ncu --list)
      run_ncu "$@"
      exit 0
    fi
    if [ "$step" = tests ]; then
      python3 -m pytest -q -rs "$@" 2>&1 | tee "$out/gpu-tests.log"
      exit "${PIPESTATUS[0]}"
    fi
    op=${1:?usage: bash bench/gpu.sh bench OP [ARGS]}
    shift
    python3 -m bench "$op" --full --out "$out" "$@"
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
