"""The trainer end to end on the CPU with the tiny Qwen2.5-VL and Qwen3-VL: LoRA and full fine-tune,
an interrupted run resumed exactly, the exported model evaluated by ``symmpo-fast eval``."""

import json
import math

import pytest

from symmpo_fast.train import train
from symmpo_fast.train.evaluate import run_eval

from train_helpers import config, losses, one_thread, run  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")


@pytest.mark.parametrize("model", FAMILIES)
def test_lora_end_to_end(tmp_path, model):
    """3 SymMPO steps of LoRA on the language model, eval at the end, the exported adapters
    evaluated again on their rebuilt base: the same held-out accuracy."""
    out = tmp_path / "run"
    kw = dict(model=model, max_steps=3, save_steps=2, eval_data="synthetic", synthetic_eval_records=8, eval_steps=3)
    train(config(out, **kw))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The adapters start at zero: the policy is the reference, every log-ratio 0, the loss 4 ln 2.
    assert rows[0]["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    assert rows[-1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)
    assert (out / "final" / "adapter_model.safetensors").exists()
    adapter_cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert "language_model" in adapter_cfg["target_modules"]
    evaluated = run_eval(config(out, model=str(out), eval_data="synthetic", synthetic_eval_records=8), generate=False)
    assert evaluated["eval/accuracy/dpo"] == pytest.approx(rows[-1]["eval/accuracy/dpo"])


@pytest.mark.parametrize("model", FAMILIES)
def test_full_finetune_resumes_exactly(tmp_path, model):
    """Full fine-tune (language model, mergers, lm_head) interrupted after step 3 with a checkpoint
    at step 2, then resumed: the same losses as an uninterrupted run; the exported full model
    loads back through the Qwen loader."""
    kw = dict(model=model, finetune="full", max_steps=4, save_steps=2, micro_batch_size=4)
    run(tmp_path / "straight", **kw)
    run(tmp_path / "resumed", interrupt=3, **kw)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 4 and len(set(losses(tmp_path / "straight"))) > 1
    evaluated = run_eval(config(tmp_path / "straight", model=str(tmp_path / "straight"), eval_data="synthetic",
                                synthetic_eval_records=4), generate=True)
    assert evaluated["eval/records"] == 4 and "eval/hallucination_rate" in evaluated
