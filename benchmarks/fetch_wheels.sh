#!/usr/bin/env bash
# Fetch the wheels the GPU runner installs on a machine with no package index (run here, in the
# repository root; .whl/ is git-ignored and travels with `carry: [".whl"]`).  Both are pure-Python
# wheels; their own needs (torch, triton) are already on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
ls -l .whl
