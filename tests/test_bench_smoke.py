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


def _gpu_check(tmp_path, **env):
    """benchmarks/gpu_check.sh on the CPU: nothing installed, cheap selections, the bench stages
    under a budget that skips every point (their commands and files, not their numbers: the
    smoke runs above measure)."""
    import os
    import subprocess
    import sys

    defaults = dict(DEVICE="cpu", PRESET="smoke", SKIP_INSTALL="1", PYTHON=sys.executable, BUILD_CMD="sleep 2",
                    WORK=str(tmp_path / "work"),
                    KERNEL_TESTS="tests/test_head.py tests/test_triton_ops.py::test_head_ops_empty",
                    KERNELS_ARGS="--smoke --backends torch", HEAD_ARGS="--budget-s 0.001",
                    STEP_ARGS="--budget-s 0.001 --cases tiny+img16", QWEN_ARGS="--budget-s 0.001 --cases qwen2.5-vl",
                    TRL_ARGS="--budget-s 0.001")
    (tmp_path / "work").mkdir()
    full = {**os.environ, **defaults, **env}
    full.pop("TRITON_INTERPRET", None)  # as on the device: the script's children decide
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return p, out, {line.split()[0]: line for line in summary.splitlines()}


def _files(out):
    return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())


def test_kernel_check_flags_an_error_above_budget(tmp_path, monkeypatch):
    """benchmarks/gpu_kernel_check.py: a correct backend's rows pass their budget, one whose lse
    is 1e-4 off does not (FAIL rows, counted for the exit status)."""
    import importlib

    from symmpo_fast import registry

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    kc = importlib.import_module("gpu_kernel_check")
    check = kc.Check(torch.device("cpu"), tmp_path / "k.csv", {}, reps=1, warmup=0)
    kc.check_point(check, "torch", 1001, torch.float32, 30.0, 64)
    assert check.failed == 0
    good = registry.row_ops("torch")
    off = registry.RowOps(lambda *a: tuple(t + 1e-4 for t in good.lse_gather(*a)), good.softmax_grad,
                          good.segment_sum, good.loss_pass)
    monkeypatch.setattr(registry, "row_ops", lambda name: good if name == "torch" else off)  # the spec stays right
    kc.check_point(check, "csrc", 1001, torch.float32, 30.0, 64)
    _, rows = _read(tmp_path / "k.csv")
    # The softmax gradient, computed from that lse, fails too.
    assert [r["status"] for r in rows] == ["ok", "ok"] + ["FAIL: error above budget"] * 2
    assert check.failed == 2


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """Every stage runs in order and writes its files; at most 8 files, 2 folders down, names the
    device tool returns; the log holds each stage; the background build was waited for."""
    import re
    import xml.etree.ElementTree as ET

    p, out, stages = _gpu_check(tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    order = ["setup", "tests", "csrc", "kernels", "head", "model", "step", "qwen", "trl"]
    assert [k for k in stages if k in order] == order and all(" ok " in stages[k] for k in order), stages
    assert {"device", "packages", "backends"} <= set(stages)
    files = _files(out)
    assert files == ["bench/head_loss.csv", "bench/step.csv", "bench/trl_step.csv", "gpu_check.log", "kernels.csv",
                     "summary.txt", "tests.xml"], files
    assert len(files) <= 8 and all(f.count("/") <= 2 and re.fullmatch(r"[\w./-]+", f) for f in files)
    suites = {s.get("name"): s for s in ET.parse(out / "tests.xml").getroot()}
    assert set(suites) == {"tests_kernels", "tests_csrc", "tests_model"}  # every run, merged
    cases = [c.get("name") for c in suites["tests_kernels"].iter("testcase")]
    # test_head's CUDA cases (skipped on the CPU) and the Triton one selected; no CPU or csrc case.
    assert "test_head_ops_empty" in cases and len(cases) > 100
    assert not [c for c in cases if "cpu-" in c or "csrc" in c]
    assert int(suites["tests_kernels"].get("failures")) == 0 and int(suites["tests_kernels"].get("errors")) == 0
    csrc = [c.get("classname") + "::" + c.get("name") for c in suites["tests_csrc"].iter("testcase")]
    assert csrc and all("csrc" in c and "cuda" in c for c in csrc), csrc
    _, kernels = _read(out / "kernels.csv")
    assert kernels and {r["status"] for r in kernels} == {"ok"} and {r["backend"] for r in kernels} == {"torch"}
    for name, scenario in (("head_loss.csv", "head"), ("step.csv", "step"), ("trl_step.csv", "trl")):
        _, rows = _read(out / "bench" / name)
        assert rows and {r["scenario"] for r in rows} == {scenario}
        assert {r["status"] for r in rows} == {"skipped: time budget"}
    _, steps = _read(out / "bench" / "step.csv")  # the step and qwen stages' cases, each selected
    assert {r["case"].split()[0] for r in steps} == {"tiny", "qwen2.5-vl-tiny"}
    log = (out / "gpu_check.log").read_text()
    assert all(f"== stage {k}" in log for k in order) and "build exit status 0" in log


@pytest.mark.slow
def test_gpu_check_deadline_and_stage_limits(tmp_path):
    """A stage past its limit is stopped and the next one still runs; one that the deadline
    leaves too little time is skipped; the exit status says not everything ended ok."""
    # The full kernel check on the CPU runs far past 3 s; after it (stopped at 3 s, 13 s at the
    # latest with the kill) less than MIN_STAGE_S of the 20 s deadline is left.
    p, out, stages = _gpu_check(tmp_path, STAGES="kernels:3 head:60 step:60", DEADLINE_S="20", MIN_STAGE_S="18",
                                KERNELS_ARGS="", BUILD_EXT="0")
    assert p.returncode == 1, p.stdout[-4000:]
    assert "timeout after 3 s" in stages["kernels"], stages
    assert "skipped: deadline" in stages["head"] and "skipped: deadline" in stages["step"], stages
    assert "bench/head_loss.csv" not in _files(out)
