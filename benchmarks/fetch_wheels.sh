#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on the GPU machine, which has no package index
# (run here, in the repository root; .whl/ is git-ignored and travels with `carry: [".whl"]`).
# All are pure-Python wheels for the machine's Python 3.12; their own needs (torch, triton,
# transformers, accelerate, pyarrow, pandas, xxhash, huggingface-hub) are already there.
#   liger-kernel, cut-cross-entropy   head baselines
#   trl, datasets, dill, multiprocess  TRL's chunked log-prob head and DPOTrainer (importing trl
#                                      imports datasets, which needs dill and multiprocess)
# DEST overrides the folder (the device carries 64 MiB at most, the tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}" \
    "trl==${TRL_VERSION:-1.16.0}" "datasets==${DATASETS_VERSION:-5.2.0}" "dill==0.4.1" "multiprocess==0.70.19"
ls -l "$DEST"
du -sh "$DEST"
