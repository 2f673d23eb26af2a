#!/usr/bin/env bash
# Issue 20's CPU targets, every one measured by the bench itself (bench/results/cpu-issue20.md).
#
#   bash bench/results/cpu-issue20.sh            # 1 and 2 threads (about 7-9 minutes on a quiet 2-core VM)
#   THREADS="1" bash bench/results/cpu-issue20.sh
#   ROUNDS=7 bash bench/results/cpu-issue20.sh   # fewer interleaved rounds (default 9): about 20% shorter
#
# Per thread count, three runs, all timed in interleaved rounds (the cpu-target preset's default):
#  1. every op at the quick and cpu-target presets (diagonal B=8 T=4096 D=512 in fp32, bf16 and
#     complex64 against the elementwise floors; block-diagonal b=4 B=8 T=4096 G=64 cpp vs torch;
#     every quick / cpu-target CPU point against the per-step loop), the cpp backend as it ships:
#     large outputs from its output cache, on huge pages: bench/results/cpu-issue20-<t>thread.{csv,txt};
#  2. the diagonal cpu-target point again, cpp and the floors only, under LINREC_CPP_CACHE_MB=0
#     (every cpp output freshly mapped on huge pages): bench/results/cpu-issue20-<t>thread-fresh.{csv,txt};
#  3. the same under LINREC_CPP_CACHE_MB=0 LINREC_CPP_HUGEPAGES=0 (fresh outputs on 4 KiB pages,
#     like PyTorch's): bench/results/cpu-issue20-<t>thread-4k.{csv,txt}.
# The .txt files are the runs' printed tables and target lines; the CSVs carry device, versions,
# git SHA, UTC time, timing method and the cpp page setting in every row.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=bench/results
SKIP=reference,logscan,associative,expanded   # Python-loop references and slow baselines no target reads
for t in ${THREADS:-1 2}; do
  s=$([ "$t" = 1 ] && echo thread || echo threads)
  python -m bench --preset quick,cpu-target --threads "$t" --skip-impls "$SKIP" --no-plot ${ROUNDS:+--rounds "$ROUNDS"} \
    --out "$OUT" --name "cpu-issue20-${t}${s}" 2>/dev/null | tee "$OUT/cpu-issue20-${t}${s}.txt"
  LINREC_CPP_CACHE_MB=0 python -m bench diagonal --preset cpu-target --threads "$t" --impls linrec.cpp,floor ${ROUNDS:+--rounds "$ROUNDS"} \
    --no-plot --out "$OUT" --name "cpu-issue20-${t}${s}-fresh" 2>/dev/null | tee "$OUT/cpu-issue20-${t}${s}-fresh.txt"
  LINREC_CPP_CACHE_MB=0 LINREC_CPP_HUGEPAGES=0 python -m bench diagonal --preset cpu-target --threads "$t" --impls linrec.cpp,floor ${ROUNDS:+--rounds "$ROUNDS"} \
    --no-plot --out "$OUT" --name "cpu-issue20-${t}${s}-4k" 2>/dev/null | tee "$OUT/cpu-issue20-${t}${s}-4k.txt"
done
echo
echo "== issue 20 targets =="
for f in "$OUT"/cpu-issue20-*thread*.txt; do
  echo "-- $f"
  grep -E "^\s+\[(ok|no)\] (diagonal fwd|diagonal fwd\+bwd) B=8|cpp backend vs torch|backend='auto'|linrec.torch \(not|^\s+below:" "$f" || true
done
