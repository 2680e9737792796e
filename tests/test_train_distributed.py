"""2 gloo processes under torchrun, FSDP2 and DDP, give the losses of 1 process on the same global batch.

One torchrun launch runs every distributed job (process start-up and imports dominate the time):
DDP and FSDP2 with LoRA (reference = adapters off), FSDP2 full fine-tuning with a sharded frozen
copy as reference, and that FSDP2 run interrupted and resumed from its sharded checkpoint.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_helpers import losses, one_thread, run, torchrun  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def last_row(output_dir) -> dict:
    return json.loads((Path(output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
# Evaluation at the last step: 6 held-out records are one batch, so the second process has
# none of its own and must still take part in the forwards.
LORA = dict(max_steps=3, lora_dropout=0.0, eval_data="synthetic", synthetic_eval_records=6, eval_steps=3)
FULL = dict(max_steps=4, finetune="full", reference="copy", save_steps=2, learning_rate=1e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_fsdp_and_ddp_equal_one(tmp_path):
    run(tmp_path / "one_lora", **LORA)
    run(tmp_path / "one_full", **FULL)
    jobs = [
        [str(tmp_path / "ddp_lora"), 0, {**LORA, "parallel": "ddp"}],
        [str(tmp_path / "fsdp_lora"), 0, {**LORA, "parallel": "fsdp"}],
        [str(tmp_path / "fsdp_full"), 0, {**FULL, "parallel": "fsdp"}],
        [str(tmp_path / "fsdp_full_resumed"), 3, {**FULL, "parallel": "fsdp"}],
    ]
    torchrun(jobs)

    one_lora, one_full = losses(tmp_path / "one_lora"), losses(tmp_path / "one_full")
    assert len(one_lora) == 3 and len(one_full) == 4
    assert losses(tmp_path / "ddp_lora") == pytest.approx(one_lora, rel=1e-5)
    assert losses(tmp_path / "fsdp_lora") == pytest.approx(one_lora, rel=1e-5)
    evals = [{k: v for k, v in last_row(tmp_path / name).items() if k.startswith("eval/")}
             for name in ("one_lora", "ddp_lora", "fsdp_lora")]
    assert evals[0]["eval/records"] == 6
    for got in evals[1:]:  # sums of about -50 nats per sequence: fp32 noise is absolute
        assert got == pytest.approx(evals[0], rel=1e-5, abs=1e-5)
    assert losses(tmp_path / "fsdp_full") == pytest.approx(one_full, rel=1e-5)
    assert losses(tmp_path / "fsdp_full_resumed") == pytest.approx(losses(tmp_path / "fsdp_full"), rel=1e-6)
    shards = sorted(p.name for p in (tmp_path / "fsdp_full" / "checkpoints" / "step-00000004").glob("model*"))
    assert shards == ["model-rank0.safetensors", "model-rank1.safetensors"]
    # The exports gathered from the shards equal the one-process models.
    for one, sharded, name in (("one_lora", "fsdp_lora", "adapter_model"), ("one_full", "fsdp_full", "model")):
        a = load_file(str(tmp_path / one / "final" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / sharded / "final" / f"{name}.safetensors"))
        assert sorted(a) == sorted(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # The comparison can fail: half of each global batch (one process's share alone) trains differently.
    run(tmp_path / "half", **{**LORA, "global_batch_size": 4})
    assert losses(tmp_path / "half")[1:] != pytest.approx(one_lora[1:], rel=1e-5)
