"""The TRL benchmarks end to end at smoke size: scenario ``trl`` (stock DPOTrainer step vs
FusedDPOTrainer step) writes its rows, table and chart; TRL's ChunkedLogProbFunction is a head
baseline of scenario (a) for every task, equal to the float64 reference."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from symmpo_fast import bench

pytest.importorskip("trl")
BENCH = bench.Path(bench.__file__).resolve().parents[1] / "benchmarks"
if not (BENCH / "bench_trl.py").exists():
    pytest.skip("the benchmark scenarios live in a source checkout's benchmarks/", allow_module_level=True)
sys.path.insert(0, str(BENCH))

import bench_head as bh  # noqa: E402
from symmpo_fast import reference  # noqa: E402


def test_trl_step_scenario_smoke(tmp_path):
    rc = bench.main(["--scenario", "trl", "--preset", "smoke", "--device", "cpu", "--results", str(tmp_path),
                     "--reps", "1"])
    assert rc == 0
    with open(tmp_path / "trl_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["trl DPOTrainer", "symmpo-fast FusedDPOTrainer",
                                           "symmpo-fast FusedDPOTrainer logit_metrics=off"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["scenario"] == "trl" and float(r["time_ms"]) > 0 and float(r["records_per_s"]) > 0
        assert float(r["rel_err"]) < 1e-5, r  # the same loss as stock TRL on the same batch
        assert r["time_vs_naive"] and r["mem_vs_naive"]
    assert "## trl on" in (tmp_path / "latest.md").read_text()
    assert list(tmp_path.glob("trl_*.png"))


@pytest.mark.parametrize("task", bh.TASKS)
def test_trl_chunked_head_is_registered(task):
    names = [m.name if isinstance(m, bh.Method) else m[0] for m in bh.methods(task, torch.device("cpu"))]
    assert "trl chunked" in names and "trl selective" not in names


def test_trl_chunked_head_matches_the_reference():
    import baselines

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, requires_grad=True)
    w = (torch.randn(1001, 24, generator=g) / 5).requires_grad_(True)
    labels = torch.randint(0, 1001, (37,), generator=g)
    up = torch.randn(37, generator=g)
    got = baselines.trl_chunked_logps(h, w, labels)
    want = reference.token_logps_reference(h.double(), w.double(), labels).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got, (h, w), up)
    wants = torch.autograd.grad(want, (h, w), up.double())
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
