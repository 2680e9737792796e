"""FusedDPOTrainer under DDP: 2 gloo processes (torchrun, CPU) log stock TRL's per-step losses and
end with identical replicas; the same pass run outside the DDP wrapper does not (the comparison
can fail).  And the fused-loss pass through an FSDP2-sharded model, run as its root's forward,
gives the unsharded model's loss and gradients (accelerate wraps a CPU run in DDP, not FSDP, so
this part calls the pass directly).  One torchrun launch runs every job (start-up and imports
dominate the time)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

HELPER = Path(__file__).with_name("trl_ddp_run.py")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_equal_stock_trl(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    losses = {job: json.loads((tmp_path / f"{job}.json").read_text()) for job in ("stock", "ours", "outside")}
    params = {job: [torch.load(tmp_path / f"{job}-rank{r}.pt") for r in (0, 1)] for job in losses}
    assert len(losses["stock"]) == 3 and len({round(x, 6) for x in losses["stock"]}) == 3
    assert losses["ours"] == pytest.approx(losses["stock"], rel=1e-4)
    for job in ("stock", "ours"):
        assert _max_diff(*params[job]) == 0.0, job  # DDP: both replicas applied the same reduced gradients
    assert _max_diff(params["ours"][0], params["stock"][0]) < 1e-4
    # Outside the wrapper nothing is reduced: each replica trained on its own half of the batch.
    assert _max_diff(*params["outside"]) > 1e-3

    for rank in (0, 1):
        r = torch.load(tmp_path / f"fsdp2-rank{rank}.pt")
        assert r["fsdp2"]["sharded"] and not r["plain"]["sharded"]
        assert "DTensor" in r["outside"]  # the pass called outside the root's forward sees shards
        assert torch.allclose(r["fsdp2"]["loss"], r["plain"]["loss"], rtol=1e-6)
        torch.testing.assert_close(r["fsdp2"]["per_seq"], r["plain"]["per_seq"], rtol=1e-5, atol=1e-5)
        worst = max(float((r["fsdp2"]["grads"][n] - g).norm() / g.norm()) for n, g in r["plain"]["grads"].items())
        assert worst < 1e-5, worst
