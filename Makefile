# Two commands from a fresh clone: `make test` and `make demo`. Each builds its own virtual
# environment in $(VENV), installs torch (unless one >= 2.4 is already there), the package with
# its native extension, and runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CUDA machine gets the newest torch pip finds (the user's own CUDA build). A machine with no
# GPU asks for a release that pip may serve as a small CPU build where one is offered locally.
HAS_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
STAMP  := $(VENV)/.symmpo-fast-installed
PYTEST_ARGS ?=

.PHONY: all install test test-fast demo bench bench-gpu-wheels clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11 ninja
	$(PY) -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 4) else 1)" 2>/dev/null \
		|| $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,plot,trl]" --no-build-isolation
	$(PY) -c "import symmpo_fast as sf; [print(f'  {n:9s} cpu={a.cpu!s:5s} cuda={a.cuda!s:5s} {a.why_not}') for n, a in sf.backends().items()]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/symmpo-fast demo

# The CPU benchmark suite; cut-cross-entropy is a baseline only, never a dependency.
bench: $(STAMP)
	$(PIP) install -q cut-cross-entropy || echo "cut-cross-entropy not installable: its rows will say n/a"
	$(VENV)/bin/symmpo-fast bench --preset cpu

# Downloads the wheels the GPU machine lacks into .whl/ (see benchmarks/README.md).
bench-gpu-wheels:
	bash benchmarks/fetch_wheels.sh

clean:
	rm -rf build *.egg-info symmpo_fast/*.so .pytest_cache
