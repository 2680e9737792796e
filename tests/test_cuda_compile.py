"""The CUDA sources build wherever nvcc exists, GPU or not, so a CUDA syntax error fails CI.

Each csrc/cuda/*.cu is compiled alone, with no torch headers (the launchers take raw pointers),
for A100 (sm_80) and H100/H200 (sm_90a), warnings as errors.  The torch-facing wrapper
csrc/cuda_bindings.cpp is syntax-checked against torch's headers with SYMMPO_FAST_WITH_CUDA on.
All compiles run at once; -O1 keeps them short (the real build, setup.py, uses -O3).
"""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GENCODES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")


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
    return proc.returncode, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> (returncode, log) of every compile, run concurrently; 'bindings' may hold a skip reason."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    jobs = {src.name: [NVCC, "-c", str(src), "-o", str(tmp / f"{src.stem}.o"), "-std=c++17", "-O1", *GENCODES,
                       "-Werror", "all-warnings", "-Xcompiler", "-Wall"] for src in CUDA_SOURCES}
    bindings, why_not = _bindings_command(tmp)
    if bindings:
        jobs["bindings"] = bindings
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    if not bindings:
        results["bindings"] = (None, why_not)
    return results


def test_every_cuda_source_compiles_alone(compiled):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    failed = [log for name, (rc, log) in compiled.items() if name != "bindings" and rc != 0]
    assert not failed, "\n\n".join(failed)


def test_cuda_bindings_compile_against_torch_headers(compiled):
    rc, log = compiled["bindings"]
    if rc is None:
        pytest.skip(log)
    assert rc == 0, log
