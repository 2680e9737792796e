"""The CUDA sources build wherever nvcc exists, GPU or not, and what they build is checked.

Each csrc/cuda/*.cu is compiled alone, with no torch headers (the launchers take raw pointers),
for A100 (sm_80) and H100/H200 (sm_90a), with setup.py's own nvcc flags (``NVCC_FLAGS``, read
from setup.py) and warnings as errors.  On what ptxas reports (``-Xptxas -v``) every kernel has
0 spill bytes, a 0-byte stack frame (no local memory) and at most ``MAX_REGISTERS`` registers;
the PTX holds no hardware ``tanh.approx`` and the SASS (where a cuobjdump is found) no
``MUFU.TANH``, which ``--use_fast_math`` would make of a ``tanhf``.  The torch-facing wrapper
csrc/cuda_bindings.cpp is syntax-checked against torch's headers with SYMMPO_FAST_WITH_CUDA on.
All compiles run at once.
"""

import ast
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90a")
GENCODES = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
# 256-thread blocks (every kernel's __launch_bounds__): at most 64 registers keeps 4 blocks, half
# the threads an SM can hold, resident.  Seen with nvcc 13.0: 22 to 32.
MAX_REGISTERS = 64
# A tanhf compiled with the same flags: shows that the tanh checks below can fail.
CANARY = """
__global__ void canary(const float* x, float* y) { y[threadIdx.x] = tanhf(x[threadIdx.x]); }
"""


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")


def nvcc_flags() -> list[str]:
    """setup.py's ``NVCC_FLAGS``, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS list")


def _cuobjdump():
    """A cuobjdump: the toolkit's, else the one Triton's wheel ships; None if neither is found."""
    for cand in (shutil.which("cuobjdump"), str(Path(NVCC).resolve().parent / "cuobjdump")):
        if cand and os.path.isfile(cand):
            return cand
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        return path if path and os.path.isfile(path) else None
    except Exception:  # noqa: BLE001 - no triton, or a Triton without knobs: no SASS check
        return None


def _bindings_command(tmp):
    """The host compiler's syntax check of cuda_bindings.cpp, or the reason it cannot run here."""
    try:
        import torch
        from torch.utils.cpp_extension import include_paths
    except ImportError as e:
        return None, f"torch is not importable: {e}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx})"
    # nvcc may be a wrapper script outside the toolkit, so its own path does not say where the
    # headers are.
    homes = [os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        return None, f"no CUDA runtime headers (cuda_runtime_api.h) under {homes}"
    torch_includes = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAStream.h").exists() for p in torch_includes):
        return None, f"torch {torch.__version__} ships no c10/cuda headers"
    # A CPU build of torch ships c10/cuda's headers but not the one CMake generates for a CUDA
    # build; an empty stand-in (after the real include paths) is enough to check our code.
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-DSYMMPO_FAST_WITH_CUDA",
            "-DTORCH_EXTENSION_NAME=_C", str(ROOT / "csrc" / "cuda_bindings.cpp"),
            *[f"-I{p}" for p in torch_includes], f"-I{found[0]}", f"-I{sysconfig.get_paths()['include']}",
            f"-idirafter{tmp / 'stub'}"], ""


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (returncode, log) of every compile, run concurrently; 'bindings' may hold a skip
    reason.  Objects (with ptxas's report) and PTX land in ``results["dir"]``."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    (tmp / "canary.cu").write_text(CANARY)
    flags = [*nvcc_flags(), "-std=c++17", "-Werror", "all-warnings", "-Xcompiler", "-Wall"]
    jobs = {}
    for src in [*CUDA_SOURCES, tmp / "canary.cu"]:
        jobs[f"{src.stem}.o"] = [NVCC, "-c", str(src), "-o", str(tmp / f"{src.stem}.o"), *flags, *GENCODES,
                                 "-Xptxas", "-v"]
        for arch in ARCHS:
            jobs[f"{src.stem}.{arch}.ptx"] = [NVCC, "-ptx", str(src), "-o", str(tmp / f"{src.stem}.{arch}.ptx"),
                                              *flags, f"-arch=compute_{arch}"]
    bindings, why_not = _bindings_command(tmp)
    if bindings:
        jobs["bindings"] = bindings
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    if not bindings:
        results["bindings"] = (None, why_not)
    failed = [log for name, (rc, log) in results.items() if name != "bindings" and rc != 0]
    assert not failed, "\n\n".join(failed)
    results["dir"] = tmp
    return results


def ptxas_report(log: str) -> list[dict]:
    """Per kernel entry and target: registers, stack frame and spill bytes, from ``-Xptxas -v``."""
    out, cur = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            out.append(cur)
        elif cur is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                 r"(\d+) bytes spill loads", line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := re.search(r"Used (\d+) registers", line)):
            cur["registers"] = int(m.group(1))
    return out


def test_every_cuda_source_compiles_alone(compiled):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    assert all(f"{src.stem}.o" in compiled for src in CUDA_SOURCES)


def test_kernels_do_not_spill(compiled):
    """0 spill bytes, no stack frame (no local memory), registers within the bound, every kernel
    for both targets.  Expected: lse_gather 3 dtypes x 2 paths, softmax_grad 3 x 3 x 2,
    segment_sum, loss_pass: 26 per target."""
    report = [r for src in CUDA_SOURCES for r in ptxas_report(compiled[f"{src.stem}.o"][1])]
    for arch in ARCHS:
        assert sum(r["arch"] == f"sm_{arch}" for r in report) == 26, [r["kernel"] for r in report]
    bad = [r for r in report if r.get("spill_stores", 1) or r.get("spill_loads", 1) or r.get("stack", 1)
           or not 0 < r.get("registers", 0) <= MAX_REGISTERS]
    assert not bad, bad


def _has_hardware_tanh(compiled, stem, cuobjdump):
    """(PTX of every target holds tanh.approx, SASS holds MUFU.TANH or None without cuobjdump)."""
    ptx = [(compiled["dir"] / f"{stem}.{arch}.ptx").read_text() for arch in ARCHS]
    sass = None
    if cuobjdump:
        rc, log = _run([cuobjdump, "-sass", str(compiled["dir"] / f"{stem}.o")])
        assert rc == 0, log
        assert "Function : " in log, log[-2000:]  # it did disassemble something
        sass = "MUFU.TANH" in log
    return [("tanh.approx" in p) for p in ptx], sass


def test_no_hardware_tanh_under_fast_math(compiled):
    """Softcap's tanh goes through exp: no tanh.approx in the PTX, no MUFU.TANH in the SASS (its
    ~1e-5 relative error is above the softcap tests' budget); a plain tanhf with the same flags
    shows both, so the check can fail."""
    cuobjdump = _cuobjdump()
    assert _has_hardware_tanh(compiled, "canary", cuobjdump) == ([True] * len(ARCHS), True if cuobjdump else None)
    for src in CUDA_SOURCES:
        ptx, sass = _has_hardware_tanh(compiled, src.stem, cuobjdump)
        assert not any(ptx) and not sass, f"{src.name}: hardware tanh in PTX {ptx}, SASS {sass}"
    if cuobjdump is None:
        pytest.skip("PTX checked; no cuobjdump (toolkit or Triton's) for the SASS")


def test_cuda_bindings_compile_against_torch_headers(compiled):
    rc, log = compiled["bindings"]
    if rc is None:
        pytest.skip(log)
    assert rc == 0, log
