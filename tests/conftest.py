"""Shared test setup. The Triton kernels run on the CPU under the interpreter: that switch must be
set before triton decorates any kernel, hence here, before the package is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker itself, not `"gpu" in item.keywords`: keywords hold the names of the parent
        # folders too, and a checkout in a folder named gpu would skip the whole suite.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
