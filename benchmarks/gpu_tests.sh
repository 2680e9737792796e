#!/usr/bin/env bash
# The test suite on a lent GPU (the CUDA variants that `make test` skips on the CPU run here, and
# the Triton kernels run compiled instead of interpreted), on a machine with no package index.
#
#   # device tool, from the repository root (carry [".whl"] so the liger/CCE tests can import):
#   bash benchmarks/gpu_tests.sh                      # the kernel and model tests (default below)
#   TESTS="tests" bash benchmarks/gpu_tests.sh        # everything
#
# Writes junit.xml and gpu_tests.log to $OUT when it exists.  A hard limit (LIMIT_S, default 540)
# keeps one device call inside its 10 minutes; pytest-timeout, where installed, stops a single
# hanging test after TEST_TIMEOUT_S (default 180) and the run goes on.
# Dry run on a CPU box: SKIP_INSTALL=1 PYTHON=.venv/bin/python TESTS=tests/test_nn.py bash benchmarks/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG=${OUT:+$OUT/gpu_tests.log}
LOG=${LOG:-/tmp/gpu_tests.log}
exec > >(tee "$LOG") 2>&1

source benchmarks/gpu_setup.sh
echo "setup took $(( $(date +%s) - T0 )) s"

TESTS=${TESTS:-tests/test_head.py tests/test_triton_ops.py tests/test_csrc.py tests/test_nn.py tests/test_objectives.py tests/test_llava_adapter.py tests/test_packing.py}
ARGS=(-q -rs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then ARGS+=(--timeout "${TEST_TIMEOUT_S:-180}"); fi
if [ -n "${OUT:-}" ]; then ARGS+=(--junitxml "$OUT/junit.xml"); fi
echo; echo "== pytest ${TESTS} at +$(( $(date +%s) - T0 )) s"
# shellcheck disable=SC2086  # TESTS is a list of paths
timeout --signal=INT --kill-after=15 "${LIMIT_S:-540}" "$PY" -m pytest "${ARGS[@]}" $TESTS
rc=$?
echo "pytest exit status $rc; total $(( $(date +%s) - T0 )) s"
exit $rc
