"""A damaged shard under FSDP2: the process that reads it finds it, and every process falls back to
the same older checkpoint (2 gloo processes under torchrun; issue 14)."""

import pytest

from train_helpers import losses, one_thread, run, torchrun  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = dict(max_steps=4, finetune="full", reference="copy", save_steps=2, learning_rate=1e-3, micro_batch_size=4,
            synthetic_records=16)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_shard_of_one_process_makes_every_process_fall_back(tmp_path):
    run(tmp_path / "one", **FULL)
    out = str(tmp_path / "fsdp")
    shard = "checkpoints/step-00000004/model-rank1.safetensors"  # only process 1 reads it
    proc = torchrun([[out, 0, {**FULL, "parallel": "fsdp"}],
                     [out, 0, {**FULL, "parallel": "fsdp", "resume": True}, shard]])
    # Process 0 says what process 1 found, and both resumed from step 2.
    assert "step-00000004 is damaged (model-rank1.safetensors does not match the sha256" in proc.stderr, \
        proc.stderr[-3000:]
    assert proc.stdout.count("resuming at step 2 from") == 1
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5) and len(losses(out)) == 4
