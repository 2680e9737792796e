# Sourced by gpu_runner.sh and gpu_tests.sh (from the repository root, with PY set): installs the
# carried wheels (.whl/) into /tmp/site, installs symmpo-fast from the working tree (no native
# build unless SYMMPO_FAST_BUILD_EXT=1), prints the versions, the device and the backends.
# SKIP_INSTALL=1 uses the symmpo_fast already importable (a dry run on a CPU box).
echo "== setup"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ carried: the liger-kernel and cut-cross-entropy rows will read n/a (run benchmarks/fetch_wheels.sh here)"
fi
if [ "${SYMMPO_FAST_BUILD_EXT:-0}" != 1 ]; then export SYMMPO_FAST_NO_EXT=1; fi
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    echo "SKIP_INSTALL=1: using the symmpo_fast already importable"
elif ! MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    # Fallback: the package laid out as it installs (kernels/ is shipped as symmpo_fast.kernels).
    echo "editable install failed; using a copy of the package under /tmp/sfpkg"
    rm -rf /tmp/sfpkg && mkdir -p /tmp/sfpkg && cp -r symmpo_fast /tmp/sfpkg/ && cp -r kernels /tmp/sfpkg/symmpo_fast/kernels
    export PYTHONPATH=/tmp/sfpkg:$PYTHONPATH SYMMPO_FAST_BENCH_DIR=$PWD/benchmarks
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" - <<'EOF' || exit 1
import importlib.metadata as md, torch, triton, transformers
import symmpo_fast as sf
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers",
      transformers.__version__)
for d in ("liger-kernel", "cut-cross-entropy", "peft", "matplotlib"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "missing")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for n, a in sf.backends().items():
    print(f"  backend {n:9s} cuda={a.cuda!s:5s} {a.why_not}")
EOF
