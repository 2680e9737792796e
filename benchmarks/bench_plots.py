"""Charts and markdown tables from the results CSVs (the latest run of each device).

    symmpo-fast bench --plot-only          # or: python benchmarks/bench_plots.py [results_dir]

writes ``<scenario>_<device>.png`` and ``latest.md`` (the tables the README quotes, each with its
device, versions, date and command) into the results folder.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from symmpo_fast.bench import RESULT_FILES, read_rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """device -> the rows of that device's most recent run."""
    last: dict[str, str] = {}
    for r in rows:
        d = r["device"]
        if r["run_id"] > last.get(d, ""):
            last[d] = r["run_id"]
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["run_id"] == last[r["device"]]:
            out[r["device"]].append(r)
    return out


def _f(r: dict, k: str) -> float | None:
    try:
        v = float(r.get(k, ""))
    except ValueError:
        return None
    return v if v == v else None


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("method") != "matmul"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_head(rows: list[dict], out: Path, device: str) -> Path | None:
    """For each task of the largest checked case: time and peak memory of every method, fwd+bwd."""
    rows = [r for r in _ok(rows) if r["pass"] == "fwd+bwd"]
    if not rows:
        return None
    plt = _plt()
    cases = sorted({r["case"] for r in rows}, key=lambda c: -max(int(r["N"]) * int(r["V"]) * int(r["D"])
                                                                  for r in rows if r["case"] == c))
    tasks = [t for t in ("token_logps", "loss", "loss_dpo") if any(r["extra"] == f"task={t}" for r in rows)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 3.2 * len(tasks)), squeeze=False)
    case = next((c for c in cases if any(r["case"] == c and r.get("rel_err") for r in rows)), cases[0])
    for i, task in enumerate(tasks):
        sel = [r for r in rows if r["case"] == case and r["extra"] == f"task={task}"]
        names = [r["method"] for r in sel]
        for j, (key, label) in enumerate((("time_ms", "time (ms, median; bars: min..max)"),
                                          ("peak_mib", "peak extra memory (MiB)"))):
            ax = axes[i][j]
            vals = [_f(r, key) or 0 for r in sel]
            colors = ["tab:gray" if n == "naive" else "tab:blue" if n.startswith("symmpo-fast") else "tab:orange"
                      for n in names]
            if key == "time_ms":
                lo = [v - (_f(r, "time_ms_min") or v) for v, r in zip(vals, sel)]
                hi = [(_f(r, "time_ms_max") or v) - v for v, r in zip(vals, sel)]
                ax.barh(names, vals, xerr=[lo, hi], color=colors)
            else:
                ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{task}, fwd+bwd: {label}", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.suptitle(f"LM head + loss, {case} on {device}", fontsize=10)
    return _save(plt, fig, out / f"head_{_slug(device)}.png")


def plot_head_scaling(rows: list[dict], out: Path, device: str) -> Path | None:
    """Useful TFLOP/s of each method over the grid's shapes (fwd+bwd), one panel per task."""
    rows = [r for r in _ok(rows) if r["pass"] == "fwd+bwd"]
    cases = sorted({r["case"] for r in rows}, key=lambda c: next(int(r["N"]) * int(r["D"]) * int(r["V"])
                                                                  for r in rows if r["case"] == c))
    if len(cases) < 2:
        return None
    plt = _plt()
    tasks = [t for t in ("token_logps", "loss") if any(r["extra"] == f"task={t}" for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sel = [r for r in rows if r["extra"] == f"task={task}"]
        for m in dict.fromkeys(r["method"] for r in sel):
            pts = [(cases.index(r["case"]), _f(r, "tflops_useful")) for r in sel if r["method"] == m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    ls="-" if m.startswith("symmpo-fast") else "--")
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("useful TFLOP/s (6NDV / time)")
        ax.set_title(f"{task}, fwd+bwd", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"LM head + loss over the grid on {device}", fontsize=10)
    return _save(plt, fig, out / f"head_scaling_{_slug(device)}.png")


def plot_step(rows: list[dict], out: Path, device: str, name: str = "step",
              title: str = "whole SymMPO training step") -> Path | None:
    rows = _ok(rows)
    if not rows:
        return None
    plt = _plt()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 2.8 * len(cases)), squeeze=False)
    for i, case in enumerate(cases):
        sel = [r for r in rows if r["case"] == case]
        names = [r["method"] for r in sel]
        colors = ["tab:gray" if n.startswith(("official", "trl ")) else "tab:blue" for n in names]
        for j, (key, label) in enumerate((("records_per_s", "records/s"), ("peak_mib", "peak extra memory (MiB)"))):
            ax = axes[i][j]
            ax.barh(names, [_f(r, key) or 0 for r in sel], color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{case}: {label}", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.suptitle(f"{title} on {device}", fontsize=10)
    return _save(plt, fig, out / f"{name}_{_slug(device)}.png")


def plot_trl(rows: list[dict], out: Path, device: str) -> Path | None:
    return plot_step(rows, out, device, "trl", "DPO training step, TRL DPOTrainer vs FusedDPOTrainer")


def _kv(extra: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in extra.split() if "=" in p)


def plot_lengths(rows: list[dict], out: Path, device: str) -> Path | None:
    rows = [r for r in _ok(rows) if r["method"] != "official" and r.get("time_vs_naive")]
    if not rows:
        return None
    plt = _plt()
    by_prefix: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        kv = _kv(r["extra"])
        by_prefix[int(kv["prefix"])].append((int(kv["response"]), 1 / float(r["time_vs_naive"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix in sorted(by_prefix):
        pts = sorted(by_prefix[prefix])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"prefix {prefix} tokens")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("step speed-up vs official layout (x)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.set_title(f"shared prefix + fused loss vs official layout, {device}", fontsize=9)
    return _save(plt, fig, out / f"lengths_{_slug(device)}.png")


_MD_COLS = {
    "head": ("case", "extra", "method", "pass", "time_ms", "time_ms_min", "time_ms_max", "time_vs_naive", "peak_mib",
             "mem_vs_naive", "tflops_useful", "tflops", "flop_formula", "pct_of_mm", "rel_err", "status"),
    "step": ("case", "method", "time_ms", "time_ms_min", "time_ms_max", "records_per_s", "tokens_per_s",
             "time_vs_naive", "peak_mib", "mem_vs_naive", "mfu", "rel_err", "status"),
    "lengths": ("case", "method", "extra", "time_ms", "time_ms_min", "time_ms_max", "time_vs_naive", "peak_mib",
                "mem_vs_naive", "status"),
    "trl": ("case", "method", "N", "time_ms", "time_ms_min", "time_ms_max", "records_per_s", "tokens_per_s",
            "time_vs_naive", "peak_mib", "mem_vs_naive", "rel_err", "status"),
}


def markdown(rows: list[dict], scenario: str) -> str:
    cols = _MD_COLS[scenario]
    r0 = rows[0]
    head = (f"**{r0['device']}** ({r0['device_type']}, {r0['threads']} threads), torch {r0['torch']}, "
            f"triton {r0['triton']}, transformers {r0['transformers']}, liger-kernel {r0['liger_kernel']}, "
            f"cut-cross-entropy {r0['cut_cross_entropy']}, commit `{r0['commit']}`, {r0['date']}  \n"
            f"command: `{r0['command']}`\n")
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c == "extra" and scenario == "head":
                v = v.replace("task=", "")
            elif c == "extra":
                kv = _kv(v)
                v = " ".join(f"{k}={kv[k]}" for k in ("prefix", "response", "speedup") if k in kv)
            else:
                try:
                    x = float(v)
                    v = f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
                except ValueError:
                    pass
            cells.append(str(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_all(results: Path) -> list[Path]:
    """Draw every chart and write ``latest.md``; returns the files written."""
    results = Path(results)
    written: list[Path] = []
    md = ["# Latest benchmark results\n", "Generated by `symmpo-fast bench` from the CSVs in this folder "
          "(the latest run of each device). Timings: median of the runs, min..max beside it.\n"]
    for scenario, fname in RESULT_FILES.items():
        rows = read_rows(results / fname)
        for device, run_rows in sorted(latest_runs(rows).items()):
            fns = {"head": (plot_head, plot_head_scaling), "step": (plot_step,), "lengths": (plot_lengths,),
                   "trl": (plot_trl,)}[scenario]
            paths = [p for p in (fn(run_rows, results, device) for fn in fns) if p]
            written += paths
            md.append(f"\n## {scenario} on {device}\n")
            md.append(markdown(run_rows, scenario))
            md += [f"\n![{scenario}]({p.name})\n" for p in paths]
    checks = read_rows(results / "checks.csv")
    if checks:
        md.append("\n## acceptance checks (latest run of each device)\n")
        last: dict[str, str] = {}
        for c in checks:
            last[c["device"]] = max(last.get(c["device"], ""), c["run_id"])
        md.append("| device | date | check | value | op | threshold | passed | where |")
        md.append("|---|---|---|---|---|---|---|---|")
        for c in checks:
            if c["run_id"] == last[c["device"]]:
                md.append(f"| {c['device']} | {c['date']} | {c['check']} | {c['value']} | {c['op']} | "
                          f"{c['threshold']} | {c['passed']} | {c['note']} |")
        md.append("")
    if len(md) > 2:
        path = results / "latest.md"
        path.write_text("\n".join(md))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in plot_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"):
        print(f"wrote {p}")
