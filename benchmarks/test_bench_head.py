"""pytest-benchmark: the LM head and the loss alone on the CPU, every method at one shape.

The same methods, inputs and naive reference as scenario (a) of ``symmpo-fast bench``
(:mod:`bench_head`); pytest-benchmark does the timing statistics, and the peak extra memory
(torch allocator, profiler replay) and the float64 error go into ``extra_info``.
"""

from __future__ import annotations

import os

import pytest
import torch

import bench_head as bh
from symmpo_fast.bench import MiB, Unavailable, peak_extra_bytes

SIZES = {"small": bh.Case(1024, 512, 32000, check=True), "accept": bh.Case(4096, 1024, 32000, check=True)}
CASE = SIZES[os.environ.get("SYMMPO_BENCH_SIZE", "small")]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inputs():
    return bh.make_inputs(CASE, CPU)


@pytest.fixture(scope="module")
def truths():
    """float64 ground truth per task, computed on first use."""
    return {}


def _methods(task):
    return [pytest.param(m, id=m.name.replace(" ", "_")) for m in bh.methods(task, CPU) if isinstance(m, bh.Method)]


def _bench(benchmark, inputs, truths, task, pass_, m):
    call = bh._call(inputs, task, pass_, m)
    try:
        got = call()
    except Unavailable as e:
        pytest.skip(str(e))
    if task not in truths:
        truths[task] = bh.truth(inputs, task, need_w=True)
    want = truths[task][: {bh.FWD: 1, bh.FROZEN: 2, bh.FWD_BWD: 3}[pass_]]
    benchmark.group = f"{task} {pass_} {CASE.name}"
    benchmark.extra_info["rel_err_vs_float64"] = bh.rel_err(got, want)
    del got
    benchmark.extra_info["peak_extra_mib"] = peak_extra_bytes(call, CPU) / MiB
    flops, formula, useful = bh._flops(CASE, pass_, m)
    benchmark.extra_info["flops"] = f"{formula} = {flops:.3g}"
    benchmark.pedantic(call, rounds=3, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("pass_", [bh.FWD, bh.FWD_BWD])
@pytest.mark.parametrize("m", _methods("token_logps"))
def test_token_logps(benchmark, inputs, truths, m, pass_):
    _bench(benchmark, inputs, truths, "token_logps", pass_, m)


@pytest.mark.parametrize("pass_", [bh.FWD_BWD, bh.FROZEN])
@pytest.mark.parametrize("m", _methods("loss"))
def test_symmpo_loss(benchmark, inputs, truths, m, pass_):
    _bench(benchmark, inputs, truths, "loss", pass_, m)


@pytest.mark.parametrize("m", _methods("loss_dpo"))
def test_dpo_loss(benchmark, inputs, truths, m):
    _bench(benchmark, inputs, truths, "loss_dpo", bh.FWD_BWD, m)
