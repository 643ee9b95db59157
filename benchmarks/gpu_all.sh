#!/usr/bin/env bash
# Every GPU measurement of issue 12 in one command, for a bare, offline GPU machine
# (see ../shared/gpu/README.md: run `bash ../shared/gpu/prepare.sh` here first, send .gpu/ along):
#
#   source .gpu/setup.sh; bash benchmarks/gpu_all.sh
#
# Steps, in order of importance, each under its own time cap and one overall budget (GPU_ALL_BUDGET_S,
# default 540 s: with setup.sh's ~25 s inside a 10-minute command limit; a step that would not fit is
# skipped and says so):
#   1. build the quick demo on the GPU           python3 -m analysis.zoo build --quick --device cuda
#   2. the test suite on the GPU                 MERGESCOPE_DEVICE=cuda python3 -m pytest
#   3. slider -> page on every page (AppTest)    benchmarks/app_sliders.py --build quick --device cuda
#   4. re-merge after a rank change (ViT-12)     benchmarks/merge.py --device cuda --skip-naive
#   5. all SVD factors (ViT-12), persist off     benchmarks/spectra.py --device cuda --skip-naive
#   6. polar solvers on TSV-M's inputs           benchmarks/polar.py --device cuda
#   7. work removed (reads per move, write)      benchmarks/work_removed.py --device cuda
#   8. with time left: the from-scratch baselines of 4 and 5 (naive SVD loops)
# Everything goes under $OUT (default out/gpu-<time>): one log per step, JSON where a benchmark writes
# it, junit XML of the tests, and summary.md (status, seconds, and every markdown table printed).
# The demo's backbone there is a random-init MiniLM (setup.sh): timings are real, accuracies are not.
#
# On a CPU, for a dry run of the plumbing: DEVICE=cpu SMALL=1 bash benchmarks/gpu_all.sh
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -f .gpu/setup.sh && ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
  source .gpu/setup.sh            # not sourced by the caller yet
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}                 # 1: tiny settings (CPU dry run)
BUDGET=${GPU_ALL_BUDGET_S:-540}
OUT=${OUT:-out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MERGESCOPE_CACHE=${MERGESCOPE_CACHE:-/tmp/ms-gpu-all}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$OUT/summary.md"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CAP_SECONDS COMMAND...: run under min(CAP, time left), log to $OUT/NAME.log, record the outcome
step() {
  local name=$1 cap=$2; shift 2
  local remaining; remaining=$(left)
  local limit=$(( cap < remaining ? cap : remaining ))
  if (( limit < 20 )); then
    echo "| $name | skipped: ${remaining} s of the budget left |  |" >> "$SUMMARY.steps"
    echo "== $name: skipped (${remaining} s left)"
    return 0
  fi
  echo "== $name (up to ${limit} s): $*"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="exit $rc"
  (( rc == 124 || rc == 137 )) && what="stopped at its ${limit} s cap"
  echo "| $name | $what | $dt |" >> "$SUMMARY.steps"
  echo "   -> $what after ${dt} s; last lines:"; tail -n 4 "$OUT/$name.log" | sed 's/^/      /'
  return 0
}

: > "$SUMMARY.steps"
{
  echo "# GPU measurements, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: unknown (no git)"
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) \
    || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo "device=$DEVICE small=$SMALL budget=${BUDGET}s MERGESCOPE_CACHE=$MERGESCOPE_CACHE"
  echo '```'
} > "$OUT/env.md" 2>&1
cat "$OUT/env.md"

HAVE_STREAMLIT=1
$PY -c "import streamlit, plotly" 2>/dev/null || HAVE_STREAMLIT=0
PYTEST_ARGS=(-q -p no:cacheprovider -rA --junitxml "$OUT/tests.xml")
$PY -c "import pytest_timeout" 2>/dev/null || PYTEST_ARGS+=(-o "addopts=-ra")   # no --timeout without the plugin

if (( SMALL )); then
  BUILD=(--quick); SLIDERS=(--build tiny --pages 1,3); MERGE=(--blocks 1 --tasks 4 --repeat 1)
  SPECTRA=(--blocks 1 --shape minilm --tasks 4 --methods gram); POLAR=(--blocks 1 --tasks 4 --repeat 1)
  WORK=(--set synthetic --blocks 1 --tasks 4 --moves 2 --spectra-blocks 1 --spectra-repeat 1)
  TESTS=(tests/test_taskvectors.py tests/test_resident.py tests/test_merging_polar.py)
  [[ $DEVICE == cpu ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a shared CPU: no spinning OpenMP threads
else
  BUILD=(--quick); SLIDERS=(--build quick); MERGE=(--blocks 12 --repeat 3); SPECTRA=(--blocks 12)
  POLAR=(--blocks 4 --repeat 3); WORK=(--set demo --moves 3 --spectra-shape vit --spectra-blocks 12 --spectra-repeat 1)
  TESTS=()
fi

if (( SMALL )) && [[ $DEVICE == cpu ]]; then
  echo "| build | skipped: SMALL=1 on a CPU (the 14-minute quick build; sliders use --build tiny) |  |" >> "$SUMMARY.steps"
else
  step build 240 $PY -m analysis.zoo build "${BUILD[@]}" --device "$DEVICE"
fi
step tests 200 env MERGESCOPE_DEVICE="$DEVICE" $PY -m pytest "${PYTEST_ARGS[@]}" ${TESTS[@]+"${TESTS[@]}"}
if (( HAVE_STREAMLIT )); then
  step app_sliders 180 $PY benchmarks/app_sliders.py "${SLIDERS[@]}" --device "$DEVICE" --json "$OUT/app_sliders.json"
else
  echo "| app_sliders | skipped: streamlit or plotly cannot be imported here (was .gpu/setup.sh sourced?) |  |" >> "$SUMMARY.steps"
fi
step merge 120 $PY benchmarks/merge.py "${MERGE[@]}" --device "$DEVICE" --skip-naive
step spectra 120 $PY benchmarks/spectra.py "${SPECTRA[@]}" --device "$DEVICE" --skip-naive --json "$OUT/spectra.json"
step polar 90 $PY benchmarks/polar.py "${POLAR[@]}" --device "$DEVICE" --json "$OUT/polar.json"
step work_removed 150 $PY benchmarks/work_removed.py "${WORK[@]}" --device "$DEVICE"
step spectra_naive 150 $PY benchmarks/spectra.py "${SPECTRA[@]}" --device "$DEVICE" --methods gram --json "$OUT/spectra_naive.json"
step merge_naive 200 $PY benchmarks/merge.py "${MERGE[@]}" --device "$DEVICE"

{
  cat "$OUT/env.md"
  echo
  echo "| step | outcome | seconds |"
  echo "|---|---|---|"
  cat "$SUMMARY.steps"
  echo
  echo "Total: $(( $(date +%s) - START )) s of a ${BUDGET} s budget."
  if [[ -f "$OUT/tests.log" ]]; then
    echo; echo "## tests"; echo '```'; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40; echo '```'
  fi
  for name in app_sliders merge spectra polar work_removed spectra_naive merge_naive; do
    [[ -f "$OUT/$name.log" ]] || continue
    echo; echo "## $name"; echo
    grep -E "^(\||==|device|set:|tsv_m f=|iso_cts c=|\[)" "$OUT/$name.log" | grep -v "^\[New" | tail -n 60
  done
} > "$SUMMARY"
rm -f "$SUMMARY.steps"
echo; echo "summary: $SUMMARY"
