#!/usr/bin/env bash
# The runbook of a session with a lent GPU (see bench/README.md, "On a lent GPU").
#
#   bash bench/gpu.sh prepare            # here, once: the peers' wheels (pure Python) into .whl/
#   # then on the GPU machine (device tool `run`, carry [".whl"]):
#   bash bench/gpu.sh check              # ONE call for a short lease (~7 min): versions, the test
#                                        # suite on CUDA (time-boxed), then every op at the points
#                                        # its GPU goals are judged on (--preset gpu-target)
#   bash bench/gpu.sh tests [PYTEST ARGS]   # the test suite on CUDA  -> $OUT/gpu-tests.log
#   bash bench/gpu.sh bench OP [ARGS]       # python -m bench OP --full -> $OUT/*.csv, *.png
#   # (OP: diagonal, householder, block-diagonal), then here: copy the CSVs and PNGs from the
#   # run's files into bench/results/ and run `python -m bench.report`.
#   # Tuning: LINREC_DIAGONAL_CONFIG="BLOCK_T=16,num_warps=8" bash bench/gpu.sh bench diagonal ...
#   # check's budgets: TEST_SECONDS (default 200) and BENCH_SECONDS (default 240, a third per op).
#
# The GPU machine has no network: linrec installs from the checkout without dependencies (torch,
# triton, einops, numpy, pytest and tqdm are in its image), the peers from .whl/.
set -euo pipefail

FLA_CORE=fla-core==0.6.0            # fla.ops.{hgrn,gated_delta_rule,gated_delta_product}; needs einops
ACCELERATED_SCAN=accelerated-scan==0.3.1

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
  tests | bench | check)
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
      timeout -s INT -k 20 "${TEST_SECONDS:-200}" python3 -m pytest -q -rs $par -p no:cacheprovider tests \
        --ignore=tests/test_packaging.py --ignore=tests/test_aot_compile.py > "$out/gpu-tests.log" 2>&1
      echo "tests: exit $? (124: cut at ${TEST_SECONDS:-200} s)" | tee -a "$out/gpu.txt"
      tail -n 15 "$out/gpu-tests.log"; echo
      # One process per op, each with a third of the budget, so that a slow one cannot starve the others.
      : > "$out/gpu-bench.log"
      per_op=$(( ${BENCH_SECONDS:-240} / 3 ))
      for op in diagonal block-diagonal householder; do
        timeout "$per_op" python3 -m bench "$op" --preset gpu-target --out "$out" \
          --name "gpu-target-$op" --no-plot >> "$out/gpu-bench.log" 2>&1
        echo "bench $op: exit $? (124: cut at $per_op s; its CSV keeps every finished point)" \
          | tee -a "$out/gpu.txt"
      done
      grep -A12 '^targets:' "$out/gpu-bench.log" || tail -n 20 "$out/gpu-bench.log"
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
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
