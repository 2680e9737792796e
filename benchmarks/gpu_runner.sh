#!/usr/bin/env bash
# The GPU benchmark suite on one H100/H200, in under 8 minutes, on a machine with no package index.
#
#   bash benchmarks/fetch_wheels.sh                     # here, once: liger-kernel + cut-cross-entropy -> .whl/
#   # then, through the device tool (carry [".whl"]), from the repository root:
#   SYMMPO_FAST_COMMIT=<sha> bash benchmarks/gpu_runner.sh
#
# What it does: installs the carried wheels into /tmp/site, installs symmpo-fast from the working
# tree (no native build unless SYMMPO_FAST_BUILD_EXT=1: the CUDA extension takes minutes of nvcc,
# and Triton is the CUDA backend `auto` picks), then runs scenarios (a) head+loss, (b) whole step
# on LLaVA-1.5-7B/-13B shapes, (c) step speed-up vs lengths, each under a soft budget (no new point
# starts after it; the rest get "skipped" rows) and a hard timeout.  Rows are appended to
# benchmarks/results/*.csv as they are measured; the charts and latest.md are redrawn at the end.
# Where $OUT exists (the device tool), results.tar.gz (the whole results folder) and the log go there:
#   tar -xzf <files_at>/results.tar.gz -C benchmarks/results
#
# Budgets (seconds; override with HEAD_S / STEP_S / LENGTHS_S): soft 190 / 140 / 55, hard +50 / +40 / +35.
# Dry run of the script itself on a CPU box (nothing installed, results elsewhere):
#   SKIP_INSTALL=1 PYTHON=.venv/bin/python PRESET=smoke DEVICE=cpu RESULTS=/tmp/r bash benchmarks/gpu_runner.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PRESET=${PRESET:-gpu}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-benchmarks/results}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOG=${OUT:+$OUT/gpu_runner.log}
LOG=${LOG:-/tmp/gpu_runner.log}
exec > >(tee "$LOG") 2>&1

source benchmarks/gpu_setup.sh
echo "setup took $(( $(date +%s) - T0 )) s"

scenario() {  # name soft_budget hard_timeout
    echo; echo "== scenario $1 (soft budget $2 s, hard limit $3 s) at +$(( $(date +%s) - T0 )) s"
    timeout --signal=INT --kill-after=15 "$3" "$PY" -m symmpo_fast.bench --scenario "$1" --preset "$PRESET" \
        --device "$DEVICE" --results "$RESULTS" --budget-s "$2" --no-plot
    local rc=$?
    [ $rc -eq 0 ] || echo "scenario $1 ended with status $rc (rows measured before that are in the CSV)"
}
scenario head    "${HEAD_S:-190}"    $(( ${HEAD_S:-190} + 50 ))
scenario step    "${STEP_S:-140}"    $(( ${STEP_S:-140} + 40 ))
scenario lengths "${LENGTHS_S:-55}"  $(( ${LENGTHS_S:-55} + 35 ))

echo; echo "== charts and tables at +$(( $(date +%s) - T0 )) s"
"$PY" -m symmpo_fast.bench --plot-only --results "$RESULTS" || true
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . && echo "results -> \$OUT/results.tar.gz"
fi
echo; echo "== acceptance checks (this run)"
SINCE=$SINCE RESULTS=$RESULTS "$PY" - <<'EOF'
import csv, os, pathlib
p = pathlib.Path(os.environ["RESULTS"]) / "checks.csv"
for r in (csv.DictReader(open(p)) if p.exists() else []):
    if r["date"] >= os.environ["SINCE"]:
        print(f"  [{'pass' if r['passed'] == 'yes' else 'FAIL'}] {r['check']}: {r['value']} {r['op']} {r['threshold']}"
              f"  ({r['note']})")
EOF
echo "total $(( $(date +%s) - T0 )) s"
