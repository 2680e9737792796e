"""Build of symmpo-fast: the pure-Python package, the Triton kernels (``kernels/`` shipped as
``symmpo_fast.kernels``) and the optional native extension ``symmpo_fast._C``.

Environment switches (read at build time):

* ``SYMMPO_FAST_NO_EXT=1``   build no native code at all (the package works without it).
* ``SYMMPO_FAST_NO_CUDA=1``  build the C++ CPU ops only, even where torch has CUDA and nvcc exists.
* ``MAX_JOBS=N``             parallel compile jobs (nvcc is memory-hungry: the default stays small).
* ``TORCH_CUDA_ARCH_LIST``   CUDA targets; default "8.0;9.0a" (A100, H100/H200).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

NO_EXT = os.environ.get("SYMMPO_FAST_NO_EXT", "0") == "1"
NO_CUDA = os.environ.get("SYMMPO_FAST_NO_CUDA", "0") == "1"
# --use_fast_math: approximate division, logf and the __expf the kernels call anyway.  It would
# also turn tanhf into the hardware tanh.approx, so csrc/cuda/common.cuh computes tanh through
# exp.  tests/test_cuda_compile.py compiles the .cu files with these flags (read from here).
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def _extensions():
    if NO_EXT:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("symmpo-fast: torch is not importable at build time; building no native extension "
              "(install torch first and use --no-build-isolation to get it)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("symmpo-fast: no C++ compiler found; building no native extension")
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std: torch's BuildExtension picks the standard its headers need.  -fno-trapping-math
    # (as torch's own build): without it GCC keeps the selects of the CPU kernels' exp as
    # branches and those loops do not vectorise (~7x slower).  No -ffast-math: the exp rounds
    # with a magic-constant add/subtract that it would fold away.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    define = []
    cuda_ok = (not NO_CUDA and torch.version.cuda is not None and CUDA_HOME is not None)
    if cuda_ok:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define.append(("SYMMPO_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "symmpo_fast._C", sources, define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("symmpo_fast._C", sources, define_macros=define, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    if not sources:
        return [], {}
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="symmpo-fast",
    version="0.1.0",
    description="Fused kernels, shared-prefix batching and a minimal trainer for multimodal preference optimisation",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repo (the design card) and ships as symmpo_fast.kernels.
    packages=find_packages(include=["symmpo_fast", "symmpo_fast.*"]) + ["symmpo_fast.kernels"],
    package_dir={"symmpo_fast": "symmpo_fast", "symmpo_fast.kernels": "kernels"},
    package_data={"symmpo_fast": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4", "triton>=3.0", "transformers>=5.0", "peft>=0.13", "liger-kernel>=0.5",
        "pybind11>=2.12", "safetensors", "pyyaml", "pillow", "numpy", "tqdm",
        "pyarrow",  # the official SymMPO data ships as parquet
    ],
    extras_require={
        "data": ["datasets"],
        # sentencepiece: the tests build a Llama-style (SentencePiece) tokenizer offline.
        "test": ["pytest", "pytest-benchmark", "datasets", "sentencepiece", "protobuf"],
        "trl": ["trl>=1.16"],
        "plot": ["matplotlib"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["symmpo-fast=symmpo_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
