"""Shared by the trainer tests: tiny configs, reading metrics, an interruption hook, and the
worker that ``torchrun`` starts for the distributed tests (``torchrun ... tests/train_helpers.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symmpo_fast.train import TrainConfig, train

TINY = dict(model="tiny", data="synthetic", synthetic_records=32, global_batch_size=8, micro_batch_size=2,
            max_length=256, learning_rate=2e-3, lora_r=8, lora_alpha=16, progress=False, tensorboard=False)


@pytest.fixture
def one_thread():
    """The tiny model's tensors gain nothing from a second thread, and a busy second core stalls
    every barrier of one (tests run beside other work on 2 cores): import this as autouse."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(output_dir, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(output_dir), **{**TINY, **overrides})


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def interrupt_at(step_to_stop: int):
    def hook(step, row):
        if step == step_to_stop:
            raise Interrupt
    return hook


def run(output_dir, interrupt: int = 0, **overrides) -> None:
    """A run, optionally interrupted after ``interrupt`` steps and then resumed to the end."""
    if not interrupt:
        train(config(output_dir, **overrides))
        return
    try:
        train(config(output_dir, **overrides), on_step=interrupt_at(interrupt))
    except Interrupt:
        pass
    train(config(output_dir, resume=True, **overrides))


def torchrun(jobs: list, nproc: int = 2) -> subprocess.CompletedProcess:
    """This file's ``__main__`` under ``torchrun --nproc_per_node nproc``: every process runs every job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__,
         json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def flip_last_bytes(path, n: int = 8) -> None:
    """Damage a file the way bit rot does: same size, other bytes (the end of a safetensors file is tensor data)."""
    data = bytearray(Path(path).read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


if __name__ == "__main__":
    # argv[1]: JSON list of [output_dir, interrupt, overrides] or [..., file to damage first];
    # every process runs every job.
    from symmpo_fast.train import distributed

    for job in json.loads(sys.argv[1]):
        out, interrupt, overrides = job[:3]
        if len(job) > 3:  # after a first job, so the process group exists for the barrier
            if distributed.rank() == 0:
                flip_last_bytes(Path(out) / job[3])
            distributed.barrier()
        run(out, interrupt, **overrides)
    distributed.shutdown()
