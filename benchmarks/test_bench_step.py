"""pytest-benchmark: one whole SymMPO training step of the small LLaVA-shaped model on the CPU.

The model, batch and step of scenario (b)/(d) of ``symmpo-fast bench`` (:mod:`bench_step`):
hidden 512, 4 layers, vocabulary 32000, 64 image tokens, question 32, responses 48, 4 records,
reference log-probs cached; the official layout against shared prefix + fused loss.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import bench_step as bs  # noqa: E402
import symmpo_fast as sf  # noqa: E402
from symmpo_fast.bench import MiB, peak_extra_bytes  # noqa: E402
from symmpo_fast.objectives import ObjectiveConfig  # noqa: E402

CPU = torch.device("cpu")
CASE = bs.step_grid("cpu")[0]


@pytest.fixture(scope="module")
def setup():
    model, tok = bs.build_model(CASE, CPU, "sdpa")
    opt = bs._optimizer(model, CASE)
    batch = bs.synthetic_batch(CASE, tok)
    with torch.no_grad():
        ref = sf.models.reference_logps(model, batch, "none")
    return model, opt, batch, ref


@pytest.mark.parametrize("variant", [v for v in bs.variants(CASE, CPU) if not v.ref_online], ids=lambda v: v.name)
def test_train_step(benchmark, setup, variant):
    model, opt, batch, ref = setup
    step = bs.make_step(model, opt, batch, ObjectiveConfig.symmpo(), ref, variant, lora=False)
    step()
    benchmark.group = f"train step {CASE.label()}"
    benchmark.extra_info["peak_extra_mib"] = peak_extra_bytes(step, CPU) / MiB
    benchmark.extra_info["records"] = CASE.records
    benchmark.pedantic(step, rounds=3, warmup_rounds=0, iterations=1)
