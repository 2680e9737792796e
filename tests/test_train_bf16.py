"""The trainer end to end with ``--dtype bfloat16`` on the CPU: bf16 autocast over fp32 master
weights (full fine-tune: the CUDA default of ``dtype=auto``) and a bf16 base with fp32 LoRA
adapters.  Before the head switched autocast off, the full fine-tune died at step 1 in the fused
loss (``index_copy_``: a bf16 chunk gradient into the fp32 accumulator)."""

import json
import math

import pytest
import torch

from symmpo_fast.train import train
from symmpo_fast.train.model import build, compute_dtype

from train_helpers import config, losses, one_thread  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_bf16_training_runs_with_finite_losses(tmp_path, finetune):
    out = tmp_path / finetune
    train(config(out, finetune=finetune, dtype="bfloat16", max_steps=3, synthetic_records=16, global_batch_size=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), rows
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    # Step 1: the policy equals the reference (LoRA: the adapters start at zero; full: the frozen
    # copy is the same weights in bf16), so every log-ratio is ~0 and the SymMPO loss ~4 ln 2;
    # the full fine-tune's copy is rounded to bf16, hence the looser bound.
    assert rows[0]["loss"] == pytest.approx(4 * math.log(2), abs=1e-5 if finetune == "lora" else 5e-3)
    assert losses(out)[-1] != pytest.approx(losses(out)[0], abs=1e-5)  # it trained


def test_bf16_full_finetune_keeps_fp32_master_weights():
    """What the run above trains: fp32 weights under bf16 autocast, a bf16 frozen reference."""
    cfg = config("unused", finetune="full", dtype="bfloat16")
    models = build(cfg, torch.device("cpu"))
    assert models.dtype == compute_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    trained = [p for p in models.policy.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert models.reference is not None and all(p.dtype == torch.bfloat16 for p in models.reference.parameters())
