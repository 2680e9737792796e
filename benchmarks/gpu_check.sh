#!/usr/bin/env bash
# The GPU checks in one device call (one H100/H200, ~540 s, a machine with no package index):
#
#   bash benchmarks/fetch_wheels.sh        # here, once: the baselines' wheels -> .whl/ (git-ignored)
#   git rev-parse --short=12 HEAD           # here: the commit to stamp (the copied tree has no .git)
#   # device tool, from the repository root:
#   run(command="SYMMPO_FAST_COMMIT=<sha> bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=570)
#
# Stages run in this order, each under its own limit (seconds, STAGES below) and all under
# DEADLINE_S (540: the call's 570 s less the copy back); a stage that would get less than
# MIN_STAGE_S (or its whole limit, if smaller) is skipped.  Each one writes its results into
# OUTDIR as it goes (CSV rows as they are measured, test results when its pytest ends), so a
# kill at the limit keeps every finished stage's results:
#
#   setup    carried wheels, editable install without native code, the nvcc build of the CUDA
#            extension started in the background                        -> summary.txt (versions)
#   tests    the Triton / torch CUDA cases of the kernel tests            -> tests.xml
#   csrc     waits for the build, then the csrc CUDA cases                -> tests.xml (merged)
#   kernels  benchmarks/gpu_kernel_check.py: every backend x vocabulary x dtype x softcap,
#            error vs fp64, GB/s, the autotuner's choice, one launch > 2^31 -> kernels.csv
#   head     symmpo-fast bench head, the GPU preset under a budget: the acceptance point
#            (N=16384 D=4096 V=128256 bf16) with every method the bench registers
#                                                                         -> bench/head_loss.csv, bench/checks.csv
#   model    tests/test_gpu_model.py: flex vs SDPA (with compile times), the fused loss in a
#            bf16 model, Liger                                            -> tests.xml (merged)
#   step     symmpo-fast bench step, the LLaVA-1.5-7B-shaped LoRA step: the official layout vs ours
#                                                                         -> bench/step.csv
#   qwen     the same for the Qwen2.5-VL-7B-shaped LoRA step              -> bench/step.csv
#   trl      symmpo-fast bench trl: stock TRL DPOTrainer step vs FusedDPOTrainer (Qwen2.5-0.5B
#            shape, full and LoRA)                                        -> bench/trl_step.csv
#
# and gpu_check.log (everything, as it is printed), summary.txt (one line per stage): 8 files.
# A new stage is a function stage_<name> and an entry name:limit in STAGES; keep the file count
# (the device returns at most 8 files).  Exit status 0 only if every stage ended ok.
#
# Dry run on a CPU box (the suite does this: tests/test_bench_smoke.py): DEVICE=cpu PRESET=smoke
# SKIP_INSTALL=1 with small selections in the *_ARGS / *_TESTS variables below.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1/bench" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export OUT PY=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-gpu} PYTHONUNBUFFERED=1
export WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXX)}
# The defaults are the device run; each can be narrowed for a dry run.
export BUILD_EXT=${BUILD_EXT:-1}
export BUILD_CMD=${BUILD_CMD:-"env SYMMPO_FAST_NO_EXT=0 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=12 \
$PY setup.py build_ext --inplace"}
# The CUDA cases: test_head's cuda-* ids and all of test_triton_ops (it runs on CUDA where there
# is one); csrc's wait for the build.  (-k matches the folder names too: keep "cuda" and "csrc"
# out of the checkout's path.)
export KERNEL_TESTS=${KERNEL_TESTS:-"tests/test_head.py tests/test_triton_ops.py"}
export CSRC_TESTS=${CSRC_TESTS:-"tests/test_csrc.py tests/test_head.py"}
export XDIST=${XDIST:-"-n 8"}
export KERNELS_ARGS=${KERNELS_ARGS:-""}
export HEAD_ARGS=${HEAD_ARGS:-"--rep-ms 100"}
export STEP_ARGS=${STEP_ARGS:-"--methods official,auto --reps 2 --cases llava-1.5-7b+lora"}
export QWEN_ARGS=${QWEN_ARGS:-"--methods official,auto --reps 2 --cases qwen2.5-vl-7b"}
export TRL_ARGS=${TRL_ARGS:-"--reps 2"}
STAGES=${STAGES:-"setup:30 tests:90 csrc:30 kernels:60 head:90 model:50 step:80 qwen:60 trl:50"}
DEADLINE_S=${DEADLINE_S:-540}
MIN_STAGE_S=${MIN_STAGE_S:-15}
T0=$(date +%s)
: > "$WORK/env.sh"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - T0 )); }

# pytest with the device's junit file for ``name`` in WORK; OUTDIR's tests.xml / model.xml is
# rebuilt from every junit file of its group after each run.
run_pytest() {  # group name pytest-args...
    local group=$1 name=$2; shift 2
    local xdist=()
    if [ -n "$XDIST" ] && "$PY" -c "import xdist" 2>/dev/null; then read -ra xdist <<< "$XDIST"; fi
    "$PY" -m pytest -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml "$WORK/junit_${group}_${name}.xml" "$@"
    local rc=$?
    "$PY" - "$OUT/$group.xml" "$WORK"/junit_"${group}"_*.xml <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, parts = sys.argv[1], sys.argv[2:]
root = ET.Element("testsuites")
for p in parts:
    try:
        r = ET.parse(p).getroot()
    except (ET.ParseError, OSError):  # a run killed before pytest wrote it
        continue
    for suite in [r] if r.tag == "testsuite" else list(r):
        suite.set("name", Path(p).stem.removeprefix("junit_"))  # e.g. tests_csrc
        root.append(suite)
ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
EOF
    return $rc
}

stage_setup() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing the carried wheels failed"; return 1; }
        echo "export PYTHONPATH=/tmp/site\${PYTHONPATH:+:\$PYTHONPATH}" >> "$WORK/env.sh"
    else
        echo "no .whl/ carried: the liger-kernel, cut-cross-entropy and TRL rows will read n/a" \
             "(run benchmarks/fetch_wheels.sh here first)"
    fi
    if [ "${SKIP_INSTALL:-0}" = 1 ]; then
        echo "SKIP_INSTALL=1: using the symmpo_fast already importable"
    elif ! SYMMPO_FAST_NO_EXT=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
        echo "editable install failed; using a copy of the package under /tmp/sfpkg"
        rm -rf /tmp/sfpkg && mkdir -p /tmp/sfpkg && cp -r symmpo_fast /tmp/sfpkg/ \
            && cp -r kernels /tmp/sfpkg/symmpo_fast/kernels || return 1
        echo "export PYTHONPATH=/tmp/sfpkg\${PYTHONPATH:+:\$PYTHONPATH} SYMMPO_FAST_BENCH_DIR=$PWD/benchmarks" \
            >> "$WORK/env.sh"
    fi
    source "$WORK/env.sh"
    if [ "$BUILD_EXT" = 1 ]; then
        # In the background while the tests stage runs; the csrc stage waits for build.rc.
        echo "building the CUDA extension in the background: $BUILD_CMD"
        touch "$WORK/build.started"
        ( eval "$BUILD_CMD" > "$WORK/build.log" 2>&1; echo $? > "$WORK/build.rc" ) &
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
    "$PY" - <<'EOF' | tee -a "$OUT/summary.txt"
import importlib.metadata as md
import os
import torch, triton, transformers
import symmpo_fast as sf
from symmpo_fast.bench import device_name
dev = torch.device(os.environ["DEVICE"])
print(f"device   {device_name(dev)} | torch {torch.__version__} (cuda {torch.version.cuda}) | triton "
      f"{triton.__version__} | transformers {transformers.__version__} | commit "
      f"{os.environ.get('SYMMPO_FAST_COMMIT', '-')}")


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


print("packages " + " ".join(f"{d} {version(d)}" for d in ("liger-kernel", "cut-cross-entropy", "trl", "peft")))
print("backends " + " | ".join(f"{n}: cuda={a.cuda} {a.why_not}".rstrip() for n, a in sf.backends().items()))
EOF
}

stage_tests() {
    # shellcheck disable=SC2086  # a list of paths
    run_pytest tests kernels $KERNEL_TESTS -k "(cuda or triton_ops) and not csrc"
}

stage_csrc() {
    local build=0
    if [ -f "$WORK/build.started" ]; then
        echo "waiting for the extension build (started at setup)"
        while [ ! -f "$WORK/build.rc" ]; do sleep 2; done
        build=$(cat "$WORK/build.rc")
        echo "build exit status $build; the end of its log:"
        tail -n 15 "$WORK/build.log"
    fi
    # shellcheck disable=SC2086
    run_pytest tests csrc $CSRC_TESTS -m gpu -k csrc || return 1
    [ "$build" = 0 ] || { echo "the extension build failed: its CUDA cases were skipped"; return 1; }
}

stage_kernels() {
    # shellcheck disable=SC2086
    "$PY" benchmarks/gpu_kernel_check.py --out "$OUT/kernels.csv" --device "$DEVICE" $KERNELS_ARGS
}

bench_budget() { echo $(( $1 > 60 ? $1 - 25 : $1 * 2 / 3 )); }  # the soft budget inside a stage's limit

bench_stage() {  # scenario extra-args...
    local scenario=$1; shift
    "$PY" -m symmpo_fast.bench --scenario "$scenario" --preset "$PRESET" --device "$DEVICE" --results "$OUT/bench" \
        --budget-s "$(bench_budget "$STAGE_LIMIT")" --no-plot "$@"
}

# shellcheck disable=SC2086  # argument lists
stage_head() { bench_stage head $HEAD_ARGS; }

stage_model() {
    run_pytest tests model tests/test_gpu_model.py -m gpu -rP --durations=0
}

# shellcheck disable=SC2086
stage_step() { bench_stage step $STEP_ARGS; }
# shellcheck disable=SC2086
stage_qwen() { bench_stage step $QWEN_ARGS; }
# shellcheck disable=SC2086
stage_trl() { bench_stage trl $TRL_ARGS; }

export -f elapsed run_pytest bench_budget bench_stage stage_setup stage_tests stage_csrc stage_kernels stage_head \
    stage_model stage_step stage_qwen stage_trl
export T0
failed=0
for entry in $STAGES; do
    name=${entry%%:*}
    limit=${entry##*:}
    left=$(( DEADLINE_S - $(elapsed) ))
    t=$(( limit < left ? limit : left ))
    if [ "$t" -lt $(( limit < MIN_STAGE_S ? limit : MIN_STAGE_S )) ]; then
        printf "%-8s skipped: deadline (%s s left of %s)\n" "$name" "$left" "$DEADLINE_S" | tee -a "$OUT/summary.txt"
        failed=1
        continue
    fi
    echo; echo "== stage $name (limit $t s) at +$(elapsed) s"
    start=$(date +%s)
    STAGE_LIMIT=$t timeout --signal=INT --kill-after=10 "$t" \
        bash -c "set -o pipefail; source '$WORK/env.sh'; stage_$name"
    rc=$?
    secs=$(( $(date +%s) - start ))
    case $rc in
        0) status="ok" ;;
        124|137) status="timeout after $t s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || failed=1
    printf "%-8s %-22s %4d s  at +%d s\n" "$name" "$status" "$secs" "$(elapsed)" | tee -a "$OUT/summary.txt"
done
echo; echo "== files in $OUT"
(cd "$OUT" && find . -type f | sort)
echo "total $(elapsed) s"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log complete before the device copies OUTDIR back
exit $failed
