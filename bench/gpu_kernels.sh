#!/usr/bin/env bash
# The GPU kernel session, as run through the device tool on one H100/H200 (no network):
#   STAGE=test     the cuda-marked tests: kernels (compiled in parallel first), then the model
#   STAGE=frag     bench/frag_probe.py: the fragment-order W4A16 kernel checked, tuned, compared
#   STAGE=wgmma    bench/wgmma_probe.py: the wgmma W4A16 kernel checked and timed against the others
#   STAGE=tune     time candidate tile configs -> $OUT/kernel_configs.json, kernel_tune.json;
#                  TUNE_ARGS: e.g. "--formats fp8 --buckets 64,128"
#   STAGE=measure  latency per linear and per layer chain with CONFIGS=<table> (or built-in);
#                  HUMMING=1 adds humming-kernels (its wheel installed on PYTHONPATH);
#                  KP_ARGS: more kernel_perf.py arguments, e.g. "--formats w4a16-g128,w4a16"
#   STAGE=ws       bench/ws_probe.py: the warp-specialized wgmma W4A16 kernel checked and timed
#                  against the layers' own wgmma picks (WS_ARGS="--ms 64 --models 8b")
#   STAGE=gather   bench/gather_probe.py: ways to gather x into the wgmma kernel's mma K order
#   STAGE=split    bench/split_probe.py: each linear's time per K split count (wgmma W4A16)
#   STAGE=w4a8     bench/w4a8_probe.py: the W4A8 wgmma kernel checked, and timed against W4A8
#                  on the canonical kernel and W4A16 (W4A8_ARGS="--formats w4a8,w4a8-g128";
#                  add --ws for the warp-specialized twin next to the table's configs)
#   STAGE=floor    bench/read_floor.py: an empty kernel, read-only kernels and the one-token
#                  fragment kernel (and its data path alone) on each linear's bytes
#   STAGE=profile  Nsight Compute on one launch of each PROFILE_CASES entry (kernel_profile.py
#                  arguments, ';'-separated): where the warps wait -> $OUT/profile_<i>.txt
# Results go to $OUT (default bench/results); COMMIT names the checkout in the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
case "${STAGE:?set STAGE=test|tune|frag|wgmma|ws|measure|gather|split|w4a8|floor|profile}" in
test)
  python tests/test_triton_kernels.py --warm-gpu
  python -m pytest -q -m cuda tests/test_triton_kernels.py tests/test_w4_fragment.py tests/test_w4_wgmma.py \
    tests/test_w4a8_wgmma.py tests/test_w4_wgmma_ws.py \
    tests/test_humming_backend.py tests/test_cuda.py -p no:cacheprovider
  ;;
tune)
  python bench/kernel_perf.py --tune-only --out "$OUT" --budget-s "${BUDGET:-330}" ${TUNE_ARGS:-}
  ;;
frag)
  # FRAG_ARGS: e.g. "--stages check,tune --buckets 16,32" (see bench/frag_probe.py)
  python bench/frag_probe.py --out "$OUT" --budget-s "${BUDGET:-270}" ${COMMIT:+--commit "$COMMIT"} \
    ${FRAG_ARGS:-}
  ;;
wgmma)
  python bench/wgmma_probe.py --out "$OUT" --budget-s "${BUDGET:-300}" ${COMMIT:+--commit "$COMMIT"} \
    ${WGMMA_ARGS:-}
  ;;
measure)
  python bench/kernel_perf.py --out "$OUT" ${CONFIGS:+--configs "$CONFIGS"} ${HUMMING:+--humming} \
    ${COMMIT:+--commit "$COMMIT"} --budget-s "${BUDGET:-200}" --chain-budget-s "${CHAIN_BUDGET:-120}" \
    ${KP_ARGS:-}
  ;;
ws)
  python bench/ws_probe.py --out "$OUT" --budget-s "${BUDGET:-300}" ${COMMIT:+--commit "$COMMIT"} \
    ${WS_ARGS:-}
  ;;
gather)
  python bench/gather_probe.py --out "$OUT" ${COMMIT:+--commit "$COMMIT"}
  ;;
split)
  python bench/split_probe.py --out "$OUT" ${COMMIT:+--commit "$COMMIT"} ${SPLIT_ARGS:-}
  ;;
w4a8)
  python bench/w4a8_probe.py --out "$OUT" ${COMMIT:+--commit "$COMMIT"} --budget-s "${BUDGET:-240}" \
    ${W4A8_ARGS:-}
  ;;
floor)
  python bench/read_floor.py --out "$OUT" ${COMMIT:+--commit "$COMMIT"} --budget-s "${BUDGET:-200}"
  ;;
profile)
  # --clock-control none: leave the clocks as they are (the device notes ask for it).
  # Per case: the sections and stall reasons as text, and the SASS with its sampled stalls
  # as CSV (bench/kernel_profile.py --stalls summarizes that CSV anywhere, no GPU needed)
  IFS=';' read -ra cases <<< "${PROFILE_CASES:---kernel wgmma --layer down --m 64;--kernel wgmma --layer gate_up --m 64;--kernel canonical --layer down --m 64;--kernel frag --layer down --m 1}"
  i=0
  for c in "${cases[@]}"; do
    i=$((i + 1))
    echo "== profile $i: $c" | tee "$OUT/profile_$i.txt"
    rep="${TMPDIR:-/tmp}/profile_$i"
    # shellcheck disable=SC2086  # $c holds several arguments
    if ncu --clock-control none --kernel-name 'regex:_w4_|_qlinear_kernel' --launch-skip 2 --launch-count 1 \
      --section LaunchStats --section Occupancy --section SpeedOfLight --section SchedulerStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
      --section ComputeWorkloadAnalysis \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio|sm__pipe_.*tensor.*_cycles_active\.avg\.pct_of_peak_sustained_active|sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active' -f -o "$rep" \
      python bench/kernel_profile.py $c >> "$OUT/profile_$i.txt" 2>&1; then
      ncu -i "$rep.ncu-rep" --print-details all >> "$OUT/profile_$i.txt" 2>&1
      ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/profile_${i}_sass.csv" 2>&1 || true
    else
      echo "ncu failed ($?)" >> "$OUT/profile_$i.txt"
    fi
  done
  ;;
*)
  echo "unknown STAGE=$STAGE" >&2
  exit 2
  ;;
esac
