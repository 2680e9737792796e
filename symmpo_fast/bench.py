"""Benchmark harness and the ``symmpo-fast bench`` command.

The scenarios live in the repository's ``benchmarks/`` folder (they compare against other
projects' code and write results into the repository); this module holds what they share:

* :func:`time_fn`: on CUDA ``triton.testing.do_bench`` quantiles (events, L2 flushed between
  runs); on the CPU ``reps`` timed calls after ``warmup`` calls, median with quartiles and min/max.
* :func:`peak_extra_bytes`: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``
  minus what was allocated before the call (the inputs); on the CPU the allocation events of
  ``torch.profiler`` (``profile_memory=True``) replayed in time order into a running total whose
  maximum is the peak.  Exact for every allocation that goes through torch's allocator;
  library-internal scratch (oneDNN/MKL workspaces, OpenMP stacks) is not seen.
* :func:`environment` and :func:`append_rows`: every CSV row carries the device, the versions of
  torch, triton, transformers, liger-kernel and cut-cross-entropy, the git commit, the date and
  the command line, in the fixed column order :data:`SCHEMA`.

``symmpo-fast bench --help`` lists the scenarios and presets; ``benchmarks/README.md`` says
which command produced the committed tables.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import gc
import importlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

MiB = 2**20

# Column order of every results CSV (one schema for all scenarios; a field a scenario does not
# measure stays empty).
SCHEMA: tuple[str, ...] = (
    "run_id", "date", "commit", "device", "device_type", "threads",
    "torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy", "command",
    "scenario", "case", "method", "pass", "dtype", "N", "D", "V", "records", "extra",
    "reps", "time_ms", "time_ms_q1", "time_ms_q3", "time_ms_min", "time_ms_max", "peak_mib",
    "time_vs_naive", "mem_vs_naive", "flops", "flop_formula", "tflops", "tflops_useful", "pct_of_mm",
    "records_per_s", "tokens_per_s", "mfu", "rel_err", "status",
)


class Unavailable(Exception):
    """A method that cannot run here; its message becomes the row's ``n/a: ...`` status."""


# ----------------------------------------------------------------------------------------------
# environment


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


@functools.lru_cache(maxsize=None)
def _git(repo: str) -> str:
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return (sha + ("+dirty" if dirty else "")) if sha else "-"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment(device: torch.device, command: str, repo: Path | None = None) -> dict[str, str]:
    """The columns every row of one run shares."""
    repo = repo or Path(__file__).resolve().parents[1]
    return {
        "run_id": _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6],
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # A copy of the tree without .git (the GPU machine) is told its commit by the caller.
        "commit": os.environ.get("SYMMPO_FAST_COMMIT") or _git(str(repo)),
        "device": device_name(device),
        "device_type": device.type,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "command": command,
    }


# ----------------------------------------------------------------------------------------------
# timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds: median, quartiles and extremes of the timed runs."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    reps: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the runs were."""
        return (self.hi - self.lo) / self.median if self.median else float("nan")


def _quartiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], q[2]


def time_fn(fn: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 1,
            rep_ms: float = 200.0, warmup_ms: float = 50.0) -> Timing:
    """Time ``fn``; its results are dropped between runs so memory does not pile up."""
    if device.type == "cuda":
        import triton.testing

        def call():
            fn()

        qs = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75, 0.0, 1.0])
        # do_bench picks its own repetition count from rep_ms; report how many it could have run.
        est = max(qs[0], 1e-3)
        return Timing(qs[0], qs[1], qs[2], qs[3], qs[4], max(1, int(rep_ms / est)))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q1, q3 = _quartiles(samples)
    return Timing(statistics.median(samples), q1, q3, min(samples), max(samples), reps)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started.

    Whatever ``fn`` returns is dropped inside the measured region, after the peak.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_extra_bytes(fn)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    # Allocation (+) and free (-) events of every thread, replayed in time order.
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort()
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_memory_bytes(device: torch.device) -> int:
    """Free memory for a rough "would the naive path fit" guard."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# ----------------------------------------------------------------------------------------------
# rows, CSV and the printed table


@dataclass
class Run:
    """One invocation: where rows go, what they share, and the time budget."""

    device: torch.device
    env: dict[str, str]
    reps: int = 5
    warmup: int = 1
    rep_ms: float = 200.0
    deadline: float = float("inf")
    methods: tuple[str, ...] = ()
    cases: tuple[str, ...] = ()
    """Substrings: a scenario runs only the cases whose label contains one (all when empty)."""
    csv_path: Path | None = None
    """Where :meth:`add` appends each row as it is made (None: keep them in memory only), so a
    run stopped half way keeps what it measured."""
    checks_path: Path | None = None
    rows: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def wants(self, method: str) -> bool:
        return not self.methods or any(m in method for m in self.methods)

    def wants_case(self, label: str) -> bool:
        # "a+b" wants a label holding both (labels have spaces: "llava-1.5-7b+lora")
        return not self.cases or any(all(w in label for w in c.split("+")) for c in self.cases)

    def timing(self, fn: Callable[[], object], warmup: int | None = None) -> Timing:
        return time_fn(fn, self.device, self.reps, self.warmup if warmup is None else warmup, self.rep_ms)

    def add(self, **fields) -> dict:
        unknown = set(fields) - set(SCHEMA)
        if unknown:
            raise KeyError(f"not in the results schema: {sorted(unknown)}")
        row = {**self.env, **{k: _fmt(v) for k, v in fields.items()}}
        self.rows.append(row)
        if self.csv_path is not None:
            append_rows(self.csv_path, [row])
        return row

    @staticmethod
    def vs_naive(naive_row: dict | None, time_ms: float, peak_mib: float, is_naive: bool = False) -> dict:
        """``time_vs_naive`` and ``mem_vs_naive`` against the naive row of the same point."""
        if is_naive:
            return {"time_vs_naive": 1.0, "mem_vs_naive": 1.0}
        if not naive_row or naive_row.get("status") != "ok":
            return {}
        t, m = float(naive_row["time_ms"]), float(naive_row["peak_mib"] or "nan")
        return {"time_vs_naive": time_ms / t, "mem_vs_naive": peak_mib / m if m else None}

    def check(self, name: str, value: float, threshold: float, op: str, note: str = "") -> bool:
        """Record an acceptance check ``value op threshold`` (op '<=' or '>=' or '<')."""
        ok = {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op]
        self.checks.append({"run_id": self.env["run_id"], "date": self.env["date"], "commit": self.env["commit"],
                            "device": self.env["device"], "check": name, "value": _fmt(value),
                            "op": op, "threshold": _fmt(threshold), "passed": "yes" if ok else "NO", "note": note})
        if self.checks_path is not None:
            append_rows(self.checks_path, self.checks[-1:], CHECK_SCHEMA)
        return ok


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.6g}"
    return str(v)


CHECK_SCHEMA = ("run_id", "date", "commit", "device", "check", "value", "op", "threshold", "passed", "note")


def append_rows(path: Path, rows: Iterable[dict], schema: tuple[str, ...] = SCHEMA) -> None:
    """Append rows to ``path`` (header written once); refuses a file with another header."""
    rows = list(rows)
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != schema:
            raise ValueError(f"{path} has another column layout than this version writes; "
                             "move it aside (keep it for the history) and run again")
        mode = "a"
    else:
        mode = "w"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=schema)
        if mode == "w":
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in schema})


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


_TABLE = (("case", 26), ("task", 11), ("method", 30), ("pass", 16), ("time_ms", 10), ("spread", 15),
          ("time_vs_naive", 8), ("peak_mib", 9), ("mem_vs_naive", 8), ("tflops", 7), ("rel_err", 8), ("status", 18))


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (what the bench prints)."""
    head = {"time_ms": "ms (med)", "spread": "min..max ms", "time_vs_naive": "x naive", "peak_mib": "peak MiB",
            "mem_vs_naive": "x naive", "tflops": "TFLOP/s", "rel_err": "rel err"}
    lines = ["  ".join(head.get(k, k).ljust(w) for k, w in _TABLE)]
    for r in rows:
        cells = []
        for k, w in _TABLE:
            if k == "spread":
                v = f"{_short(r.get('time_ms_min'))}..{_short(r.get('time_ms_max'))}" if r.get("time_ms_min") else ""
            elif k == "tflops":
                v = _short(r.get("tflops_useful") or r.get("tflops"))
            elif k == "task":
                v = r.get("extra", "")[5:] if r.get("extra", "").startswith("task=") else ""
            elif k in ("case", "method", "pass", "status"):
                v = r.get(k, "")
            else:
                v = _short(r.get(k))
            cells.append(str(v)[: w + 12].ljust(w))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _short(v) -> str:
    if v in (None, ""):
        return ""
    try:
        x = float(v)
    except ValueError:
        return str(v)
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 0.01:
        return f"{x:.3g}"
    return f"{x:.1e}"


# ----------------------------------------------------------------------------------------------
# the command


SCENARIOS = {
    "head": ("bench_head", "(a) LM head + loss alone: naive, symmpo-fast backends, TRL 1.16's chunked head, Liger, CCE"),
    "step": ("bench_step", "(b)/(d) a whole SymMPO training step: official layout vs shared prefix + fused loss"),
    "lengths": ("bench_step", "(c) speed-up of the step as the prefix and the responses grow"),
    "trl": ("bench_trl", "a DPO training step: stock TRL 1.16 DPOTrainer vs FusedDPOTrainer"),
}
RESULT_FILES = {"head": "head_loss.csv", "step": "step.csv", "lengths": "lengths.csv", "trl": "trl_step.csv"}


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (``SYMMPO_FAST_BENCH_DIR`` overrides)."""
    env = os.environ.get("SYMMPO_FAST_BENCH_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks"
    if not (d / "bench_head.py").exists():
        raise SystemExit(f"symmpo-fast bench runs from a source checkout: no benchmarks/ scenarios at {d} "
                         "(git clone the repository, or set SYMMPO_FAST_BENCH_DIR)")
    return d


def _import_bench(module: str):
    d = str(benchmarks_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="symmpo-fast bench",
        description="Benchmarks: symmpo-fast against the naive path and other projects, side by side in one "
                    "process. Prints a table, appends CSV rows to the results folder and draws PNG charts.",
        epilog="Scenarios: " + "; ".join(f"{k}: {v[1]}" for k, v in SCENARIOS.items()),
    )
    p.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all"], help="which scenario (default all)")
    p.add_argument("--preset", default=None, choices=["smoke", "cpu", "gpu"],
                   help="grid size: smoke (seconds, for tests), cpu (the CPU acceptance points and small shapes), "
                        "gpu (the GPU grid); default gpu on CUDA, else cpu")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per point (CPU; whole steps on CUDA); default 2 for smoke, else 3")
    p.add_argument("--rep-ms", type=float, default=200.0, help="do_bench rep window in ms on CUDA")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new points after this many seconds; what is left gets 'skipped' rows")
    p.add_argument("--methods", default="", help="comma-separated substrings: only methods whose name contains one")
    p.add_argument("--cases", default="", help="comma-separated substrings: only the whole-step cases whose label "
                                               "contains one, words joined by + all in it (e.g. qwen2.5-vl: the Qwen2.5-VL-shaped step; llava-1.5-7b+lora)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG charts")
    p.add_argument("--plot-only", action="store_true", help="only draw the charts from the CSVs already there")
    p.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    results = args.results or benchmarks_dir() / "results"
    if args.plot_only:
        for png in _import_bench("bench_plots").plot_all(results):
            print(f"wrote {png}")
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    reps = args.reps or {"smoke": 2, "cpu": 3, "gpu": 3}[preset]
    command = "symmpo-fast bench " + " ".join(shlex.quote(a) for a in argv)
    run = Run(device=device, env=environment(device, command), reps=reps,
              warmup=1, rep_ms=args.rep_ms,
              deadline=time.monotonic() + args.budget_s if args.budget_s else float("inf"),
              methods=tuple(m for m in args.methods.split(",") if m),
              cases=tuple(c for c in args.cases.split(",") if c),
              checks_path=None if args.no_csv else results / "checks.csv")
    print(f"# {run.env['device']} ({device.type}, {run.env['threads']} threads) | torch {run.env['torch']} "
          f"triton {run.env['triton']} transformers {run.env['transformers']} liger {run.env['liger_kernel']} "
          f"cce {run.env['cut_cross_entropy']} | commit {run.env['commit']} | {run.env['date']}")
    print(f"# {command}")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    failed = False
    for name in names:
        start = len(run.rows)
        mod = _import_bench(SCENARIOS[name][0])
        print(f"\n## {name}: {SCENARIOS[name][1]} [preset {preset}]")
        run.csv_path = None if args.no_csv else results / RESULT_FILES[name]
        getattr(mod, f"run_{name}")(run, preset)
        print(format_table(run.rows[start:]))
    if run.checks:
        print("\n## acceptance checks")
        for c in run.checks:
            print(f"  [{'pass' if c['passed'] == 'yes' else 'FAIL'}] {c['check']}: {c['value']} {c['op']} "
                  f"{c['threshold']}  {c['note']}")
            failed |= c["passed"] != "yes"
    if not args.no_csv:
        print(f"\nappended {len(run.rows)} rows under {results}")
        if not args.no_plot:
            for png in _import_bench("bench_plots").plot_all(results):
                print(f"wrote {png}")
    return 1 if failed and os.environ.get("SYMMPO_FAST_BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
