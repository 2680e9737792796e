"""A damaged shard under FSDP2: the process that reads it finds it, and every process falls back to
the same older checkpoint (2 gloo processes under torchrun; issue 14)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import losses, one_thread, run  # noqa: F401  (one_thread: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

HELPER = Path(__file__).with_name("train_helpers.py")
FULL = dict(max_steps=4, finetune="full", reference="copy", save_steps=2, learning_rate=1e-3, micro_batch_size=4,
            synthetic_records=16)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_shard_of_one_process_makes_every_process_fall_back(tmp_path):
    run(tmp_path / "one", **FULL)
    out = str(tmp_path / "fsdp")
    shard = "checkpoints/step-00000004/model-rank1.safetensors"  # only process 1 reads it
    jobs = [[out, 0, {**FULL, "parallel": "fsdp"}],
            [out, 0, {**FULL, "parallel": "fsdp", "resume": True}, shard]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
         json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # Process 0 says what process 1 found, and both resumed from step 2.
    assert "step-00000004 is damaged (model-rank1.safetensors does not match the sha256" in proc.stderr, \
        proc.stderr[-3000:]
    assert proc.stdout.count("resuming at step 2 from") == 1
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5) and len(losses(out)) == 4
