"""Smoke test of the benchmark suite: the smallest scenarios end to end on the CPU, the CSV row
schema, and the CPU peak-memory meter against allocations of known size.  Timings here mean
nothing (tiny shapes, a shared machine); only that every piece runs and writes what it should."""

from __future__ import annotations

import csv

import pytest
import torch

from symmpo_fast import bench

MiB = 2**20

if not (bench.Path(bench.__file__).resolve().parents[1] / "benchmarks" / "bench_head.py").exists():
    pytest.skip("the benchmark scenarios live in a source checkout's benchmarks/", allow_module_level=True)


def test_cpu_memory_meter_sees_known_allocations():
    def fn():
        a = torch.empty(MiB, dtype=torch.float32)  # 4 MiB
        b = torch.empty(MiB // 2, dtype=torch.float32)  # 2 MiB, peak 6 MiB
        del a
        c = torch.empty(MiB // 4, dtype=torch.float32)  # 1 MiB, total 3 MiB
        return b, c

    assert bench.peak_extra_bytes(fn, torch.device("cpu")) == 6 * MiB

    def wrong():
        torch.empty(MiB, dtype=torch.float32)
        torch.empty(MiB, dtype=torch.float32)  # the first is freed before: peak 4 MiB, not 8

    assert bench.peak_extra_bytes(wrong, torch.device("cpu")) == 4 * MiB


def test_time_fn_reports_median_and_spread():
    t = bench.time_fn(lambda: torch.ones(1000).sum(), torch.device("cpu"), reps=5, warmup=1)
    assert t.reps == 5 and 0 < t.lo <= t.q1 <= t.median <= t.q3 <= t.hi


def _read(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    return header, rows


def _check_rows(rows, scenario):
    assert rows
    for r in rows:
        for k in ("run_id", "date", "commit", "device", "device_type", "torch", "command", "scenario", "case",
                  "method", "status"):
            assert r[k], f"empty {k} in {r}"
        assert r["scenario"] == scenario and r["device_type"] == "cpu"
        assert r["command"].startswith("symmpo-fast bench")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, [r["status"] for r in rows]
    for r in ok:
        assert float(r["time_ms"]) > 0 and float(r["time_ms_min"]) <= float(r["time_ms"]) <= float(r["time_ms_max"])
        assert float(r["peak_mib"]) >= 0
    assert len({r["run_id"] for r in rows}) == 1
    return ok


@pytest.fixture(scope="module")
def head_results(tmp_path_factory):
    """One smoke run of scenario (a), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--scenario", "head", "--preset", "smoke", "--device", "cpu", "--results", str(out),
                     "--methods", "symmpo-fast[torch]", "--reps", "1"])
    assert rc == 0
    return out


def test_head_scenario_smoke(head_results):
    header, rows = _read(head_results / "head_loss.csv")
    assert tuple(header) == bench.SCHEMA
    ok = _check_rows(rows, "head")
    methods = {r["method"] for r in ok}
    assert "naive" in methods and any(m.startswith("symmpo-fast[torch]") for m in methods)
    tasks = {r["extra"] for r in ok}
    assert {"task=token_logps", "task=loss", "task=loss_dpo"} <= tasks
    for r in ok:
        if r["method"] == "matmul":
            continue
        assert float(r["rel_err"]) < 1e-4, r  # every method against the float64 reference
        assert r["flop_formula"].endswith("NDV") and float(r["tflops"]) > 0
        assert r["time_vs_naive"] and r["mem_vs_naive"]
    ours = [r for r in ok if r["method"].startswith("symmpo-fast[torch]") and r["pass"] == "fwd+bwd"
            and r["extra"] == "task=token_logps"]
    assert ours and ours[0]["flop_formula"] == "8NDV"  # token_logps recomputes the logits in its backward


def test_second_run_appends(tmp_path):
    path = tmp_path / "r.csv"
    for run in ("a", "b"):
        env = bench.environment(torch.device("cpu"), f"symmpo-fast bench {run}")
        bench.append_rows(path, [{**env, "method": "m", "status": "ok"}, {**env, "method": "n", "status": "ok"}])
    header, rows = _read(path)
    assert tuple(header) == bench.SCHEMA and len(rows) == 4 and len({r["run_id"] for r in rows}) == 2
    assert [r["command"] for r in rows] == ["symmpo-fast bench a"] * 2 + ["symmpo-fast bench b"] * 2


def test_step_scenario_smoke(tmp_path):
    pytest.importorskip("transformers")
    rc = bench.main(["--scenario", "step", "--preset", "smoke", "--device", "cpu", "--results", str(tmp_path),
                     "--methods", "auto", "--reps", "1", "--no-plot"])
    assert rc == 0
    header, rows = _read(tmp_path / "step.csv")
    assert tuple(header) == bench.SCHEMA
    ok = _check_rows(rows, "step")
    assert {"official"} < {r["method"] for r in ok}
    for r in ok:
        assert float(r["records_per_s"]) > 0 and float(r["tokens_per_s"]) > 0
        # Same model, same batch, same cached reference: the layouts give the same loss.
        assert float(r["rel_err"]) < 1e-4, r


def test_csv_refuses_another_layout(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="column layout"):
        bench.append_rows(path, [{"run_id": "r"}])


def test_plots_and_latest_table(head_results):
    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in head_results.glob("*.png"))
    assert pngs and pngs[0].startswith("head_")
    md = (head_results / "latest.md").read_text()
    assert "| case |" in md and "command: `symmpo-fast bench" in md


ROOT = bench.Path(bench.__file__).resolve().parents[1]


def _gpu_script(name, tmp_path, **env):
    import os
    import subprocess
    import sys

    env = dict(os.environ, SKIP_INSTALL="1", PYTHON=sys.executable, OUT=str(tmp_path), **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / name)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_runner_dry_run(tmp_path):
    """The GPU runner's shell logic on the CPU (smoke preset, short budgets): each scenario writes
    its CSV, the charts and latest.md are drawn, results.tar.gz and the log land in $OUT."""
    import tarfile

    results = tmp_path / "results"
    p = _gpu_script("gpu_runner.sh", tmp_path, PRESET="smoke", DEVICE="cpu", RESULTS=str(results),
                    HEAD_S="1", STEP_S="60", LENGTHS_S="60")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name, scenario in (("head_loss.csv", "head"), ("step.csv", "step"), ("lengths.csv", "lengths")):
        _, rows = _read(results / name)
        assert rows and {r["scenario"] for r in rows} == {scenario}
        assert any(r["status"] == "ok" for r in rows), name
    assert "ended with status" not in p.stdout
    _, head = _read(results / "head_loss.csv")  # 1 s: the first point runs, the rest are skipped rows
    assert head[-1]["status"] == "skipped: time budget"
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"head_loss.csv", "step.csv", "lengths.csv", "latest.md"} <= names
    assert "== acceptance checks" in (tmp_path / "gpu_runner.log").read_text()


def test_gpu_tests_script_dry_run(tmp_path):
    p = _gpu_script("gpu_tests.sh", tmp_path, TESTS="tests/test_nn.py")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 passed" in p.stdout and (tmp_path / "junit.xml").exists()
    failing = _gpu_script("gpu_tests.sh", tmp_path, TESTS="tests/no_such_test.py")
    assert failing.returncode != 0  # pytest's failure is the script's
