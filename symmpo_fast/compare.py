"""``symmpo-fast compare``: DPO, DPO without images, mDPO, SymMPO and SymMPO's ablations on the generated task.

One supervised warm-up of the tiny LLaVA (cached on disk) is the policy start and the frozen
reference of every run; every method trains on the same ``train`` records in the same order
(the order is a function of the seed only) with the same optimiser settings, over several
seeds, and is evaluated on the ``heldout`` split, which breaks the training data's language
prior (:mod:`symmpo_fast.synthetic`).  The testbed and its fixed knobs are described in
``docs/testbed.md``; the SymMPO paper's Table 2 (https://arxiv.org/abs/2506.11712) is the model
of the table, the mDPO paper's "DPO without images" (https://arxiv.org/abs/2406.11839, Sec. 3)
the model of the no-image baseline.

    symmpo-fast compare                       # the committed results/compare/, ~10 min on 2 cores
    symmpo-fast compare --seeds 0 --methods dpo symmpo --steps 16 --output-dir /tmp/c

``python -m symmpo_fast.compare`` is the same program.

Writes ``DIR/summary.json`` (every run's metrics, mean/std/min/max per method, the settings,
the command and the run time), ``DIR/table.md`` and ``DIR/chart.png``; models and the warm-up
go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import formats
from .objectives import ObjectiveConfig
from .synthetic import PROMPT_FORMAT, SyntheticConfig, build_split

BLANK_RGB = (235, 235, 235)
"""The no-image baseline's picture: one uniform grey, the mean of the task's background range
(225-245), so that it is in-distribution for the vision tower and says nothing about any answer."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    objective: str
    """The preset (``ObjectiveConfig.preset``); it also decides which columns the collator builds."""
    overrides: tuple[tuple[str, float | bool], ...] = ()
    """ObjectiveConfig fields changed from the preset (the ablations set one weight to 0)."""
    blank_images: bool = False
    """Train on the same records with every image replaced by the uniform :data:`BLANK_RGB` picture."""

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig.preset(self.objective, **dict(self.overrides))


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("dpo", "DPO", "dpo"),
    Method("dpo_noimage", "DPO (no image)", "dpo", blank_images=True),
    Method("mdpo", "mDPO", "mdpo"),
    Method("symmpo", "SymMPO", "symmpo"),
    Method("symmpo_no_pair", "SymMPO w/o pair", "symmpo", (("pair_weight", 0.0),)),
    Method("symmpo_no_margin", "SymMPO w/o margin", "symmpo", (("margin_weight", 0.0),)),
    Method("symmpo_no_anchor", "SymMPO w/o anchor", "symmpo", (("anchor_weight", 0.0),)),
    # Diagnostics, not in the default comparison: they separate SymMPO's two anchors from its
    # pair terms (docs/testbed.md, "Why").
    Method("anchors_only", "DPO + both anchors", "symmpo", (("pair_weight", 0.0), ("margin_weight", 0.0))),
    Method("symmpo_no_contrast_anchor", "SymMPO, anchor on y_w|m only", "symmpo", (("anchor_contrast", False),)),
)}
DEFAULT_METHODS = ("dpo", "dpo_noimage", "mdpo", "symmpo", "symmpo_no_pair", "symmpo_no_margin", "symmpo_no_anchor")


@dataclass(frozen=True)
class CompareConfig:
    """The testbed's knobs.  The defaults were fixed from the time budget before the comparison
    ran (docs/testbed.md) and are not to be tuned towards any method."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the preference stage: data order, mDPO's crops, every runtime RNG."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    sft_seed: int = 0
    """Seed of the tiny model's init and of the one shared warm-up."""
    sft_steps: int = 200
    sft_records: int = 2048
    train_records: int = 2048
    eval_records: int = 256
    steps: int = 128
    """Optimizer steps per run: 128 x 32 records = 2 epochs of the 2048 training records."""
    batch_size: int = 32
    micro_batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    max_length: int = 256

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")


# Held-out metrics of the table: (key in the evaluation, column header, percentage?).
COLUMNS = (("eval/accuracy/dpo", "acc y_w>y_l\\|m (%) ↑", True),
           ("eval/accuracy/pair_m", "acc y_w>y_w'\\|m (%) ↑", True),
           ("eval/accuracy/pair_contrast", "acc y_w'>y_w\\|m' (%) ↑", True),
           ("eval/image_conditioning", "image cond. (nats) ↑", False),
           ("eval/answer_accuracy", "correct answers (%) ↑", True),
           ("eval/hallucination_rate", "hallucinated (%) ↓", True),
           ("eval/no_answer_rate", "no answer (%) ↓", True),
           ("train/accuracy/dpo", "train reward acc (%)", True))
# A model whose text degenerates names no value at all, which lowers its hallucination rate:
# the three answer columns are read together, "correct answers" is the one that cannot be gamed.


# ----------------------------------------------------------------------------------------------
# the shared warm-up and the data


def warmup(work: Path, cfg: CompareConfig, log=print) -> Path:
    """The supervised warm-up in ``work/sft``, trained once and reused while its settings match."""
    from .models import build_tiny_llava
    from .train.demo import SFT_BATCH, SFT_LR, supervised_warmup

    sft = work / "sft"
    key = {"model": "tiny", "seed": cfg.sft_seed, "steps": cfg.sft_steps, "records": cfg.sft_records,
           "batch": SFT_BATCH, "lr": SFT_LR, "synthetic": dataclasses.asdict(SyntheticConfig())}
    key = json.loads(json.dumps(key))  # as it reads back: JSON has lists where the config has tuples
    marker = sft / "warmup.json"
    if marker.exists() and json.loads(marker.read_text()) == key:
        log(f"supervised warm-up: reusing {sft}")
        return sft
    marker.unlink(missing_ok=True)  # the weights are about to change: never pair them with the old key
    log(f"supervised warm-up: {cfg.sft_steps} steps of {SFT_BATCH} records on the sft split -> {sft}")
    model, processor = build_tiny_llava(seed=cfg.sft_seed)
    supervised_warmup(model, processor, steps=cfg.sft_steps, seed=cfg.sft_seed, records=cfg.sft_records, log=log)
    model.save_pretrained(str(sft))
    processor.save_pretrained(str(sft))
    marker.write_text(json.dumps(key))  # written last: an interrupted save is never reused
    return sft


def write_blank_split(out: Path, records: int) -> Path:
    """The ``train`` split with every image (m and m') replaced by the one uniform picture: the
    same questions and answers in the same order, so a preference learned from it is a function
    of the text alone."""
    data = build_split("train", records, SyntheticConfig())
    blank = Image.new("RGB", (SyntheticConfig().image_size,) * 2, BLANK_RGB)
    rows = [{**data[i], "image": blank, "contrast_image": blank} for i in range(len(data))]
    return formats.write_jsonl(formats.PreferenceDataset(rows, "synthetic:train:blank"), out)


def train_config(method: Method, seed: int, cfg: CompareConfig, sft: Path, run_dir: Path, blank_data: Path | None):
    """The trainer's config of one run: everything but the objective, the data and the seed is shared."""
    from .train import TrainConfig

    data = dict(data=str(blank_data), data_format="jsonl") if method.blank_images else dict(data="synthetic")
    return TrainConfig(
        output_dir=str(run_dir), model=str(sft), seed=seed, finetune="full", reference="copy",
        objective=method.objective, **dict(method.overrides), **data, synthetic_records=cfg.train_records,
        learning_rate=cfg.learning_rate, lr_scheduler="cosine", warmup_ratio=cfg.warmup_ratio,
        global_batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, max_steps=cfg.steps,
        max_length=cfg.max_length, prompt_format=PROMPT_FORMAT, save_steps=0, keep_checkpoints=1, tensorboard=False,
        progress=False, overwrite=True,  # a rerun of the testbed in the same work directory trains every run again
    )


# ----------------------------------------------------------------------------------------------
# runs


def _train_accuracy(run_dir: Path) -> float:
    """Mean reward accuracy y_w > y_l (against the reference) over the last quarter of the steps:
    what the objective reached on its own training data."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tail = rows[-max(1, len(rows) // 4):]
    return statistics.fmean(r["accuracy/dpo"] for r in tail)


def run_one(method: Method, seed: int, cfg: CompareConfig, sft: Path, work: Path, heldout,
            blank_data: Path | None) -> dict:
    from .train import train
    from .train.evaluate import evaluate
    from .train.model import load_base

    t0 = time.perf_counter()
    run_dir = work / "runs" / method.key / f"seed{seed}"
    tcfg = train_config(method, seed, cfg, sft, run_dir, blank_data)
    train(tcfg)
    model, processor = load_base(str(run_dir / "final"), seed, torch.device("cpu"), torch.float32)
    metrics = evaluate(model, processor, heldout, batch_size=32, max_length=cfg.max_length, seed=seed,
                       prompt_format=PROMPT_FORMAT)
    metrics["train/accuracy/dpo"] = _train_accuracy(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only resume needs them; final/ stays
    return {"seed": seed, "metrics": metrics, "seconds": time.perf_counter() - t0}


def aggregate(runs: list[dict]) -> dict:
    """Mean, sample standard deviation (0 for one seed), min and max over seeds of every metric."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0]["metrics"]:
        values = [r["metrics"][key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
    return out


def _fmt(stats: dict | float | None, percent: bool) -> str:
    if stats is None:
        return "–"
    scale = 100.0 if percent else 1.0
    if isinstance(stats, float):
        return f"{stats * scale:.1f}" if percent else f"{stats:.2f}"
    if percent:
        return f"{stats['mean'] * scale:.1f} ± {stats['std'] * scale:.1f}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def format_table(summary: dict) -> str:
    """Markdown: one row per method, mean ± sample std over seeds (the warm-up start has no spread)."""
    head = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    start = summary["start"]
    lines.append("| SFT start | " + " | ".join(_fmt(start.get(k), p) for k, _, p in COLUMNS) + " |")
    for entry in summary["methods"].values():
        label = entry["label"].replace("|", "\\|")  # a bare | would split the cell
        lines.append(f"| {label} | " + " | ".join(_fmt(entry["stats"].get(k), p) for k, _, p in COLUMNS)
                     + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """Greedy answers as stacked shares (correct / hallucinated / no answer), then the held-out
    y_w > y_l accuracy and the image conditioning with their spread and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [{"label": "SFT start", "stats": {k: {"mean": v, "std": 0.0} for k, v in summary["start"].items()},
                "runs": []}] + list(summary["methods"].values())
    x = list(range(len(methods)))
    labels = [m["label"] for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))

    bottom = [0.0] * len(methods)
    for key, name, colour in (("eval/answer_accuracy", "correct", "#4c9a5b"),
                              ("eval/hallucination_rate", "hallucinated", "#c0392b"),
                              ("eval/no_answer_rate", "no answer (degenerate text)", "#b0b0b0")):
        share = [100.0 * m["stats"][key]["mean"] for m in methods]
        axes[0].bar(x, share, bottom=bottom, color=colour, label=name)
        bottom = [b + s for b, s in zip(bottom, share)]
    axes[0].set_title("greedy answers on the held-out split (%, mean over seeds)", fontsize=10)
    axes[0].set_ylim(0, 118)  # room for the legend above the bars
    axes[0].legend(fontsize=8, loc="upper center", ncol=3)

    for ax, (key, title, scale) in zip(axes[1:], (("eval/accuracy/dpo", "held-out acc y_w > y_l | m (%) ↑", 100.0),
                                                  ("eval/image_conditioning", "image conditioning (nats)", 1.0))):
        ax.bar(x, [m["stats"][key]["mean"] * scale for m in methods],
               yerr=[m["stats"][key]["std"] * scale for m in methods], capsize=3, color="#8fb3d9",
               edgecolor="#3a5f8a")
        for i, m in enumerate(methods):  # each seed as a dot: three seeds are too few for error bars alone
            ax.plot([i] * len(m["runs"]), [r["metrics"][key] * scale for r in m["runs"]], "k.", ms=4)
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    seeds = len(summary["config"]["seeds"])
    fig.suptitle(f"held-out split that breaks the language prior (n={summary['config']['eval_records']}); "
                 f"mean ± std over {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _commit() -> str:
    """The commit, marked when the package's code differs from it: untracked files count too
    (``git describe --dirty`` ignores them, and a new module is exactly what it would miss)."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+uncommitted" if head and git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def compare(cfg: CompareConfig, output_dir: Path, work: Path, command: str = "", log=print) -> dict:
    """Warm up once, train and evaluate every (method, seed), write summary.json, table.md and chart.png."""
    from .train.evaluate import evaluate
    from .train.model import load_base

    t0 = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sft = warmup(work, cfg, log)
    heldout = build_split("heldout", cfg.eval_records, SyntheticConfig())
    model, processor = load_base(str(sft), cfg.sft_seed, torch.device("cpu"), torch.float32)
    start = evaluate(model, processor, heldout, batch_size=32, max_length=cfg.max_length, seed=cfg.sft_seed,
                     prompt_format=PROMPT_FORMAT)
    methods = [METHODS[k] for k in cfg.methods]
    blank = write_blank_split(work / "data" / "train_blank", cfg.train_records) if any(
        m.blank_images for m in methods) else None

    results: dict[str, list[dict]] = {m.key: [] for m in methods}
    total, done = len(methods) * len(cfg.seeds), 0
    for seed in cfg.seeds:
        for m in methods:
            run = run_one(m, seed, cfg, sft, work, heldout, blank)
            results[m.key].append(run)
            done += 1
            e = run["metrics"]
            log(f"[{done}/{total}] {m.label}, seed {seed}: held-out hallucination {e['eval/hallucination_rate']:.1%}, "
                f"acc y_w>y_l {e['eval/accuracy/dpo']:.1%}, image conditioning {e['eval/image_conditioning']:.2f} "
                f"({run['seconds']:.0f} s)")

    summary = {
        "command": command,
        "seconds": time.perf_counter() - t0,
        "config": dataclasses.asdict(cfg),
        "synthetic": dataclasses.asdict(SyntheticConfig()),
        "blank_rgb": BLANK_RGB,
        "environment": {"commit": _commit(), "torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "start": start,
        "methods": {m.key: {"label": m.label, "objective": dataclasses.asdict(m.objective_config()),
                            "preset": m.objective, "blank_images": m.blank_images,
                            "runs": results[m.key], "stats": aggregate(results[m.key])} for m in methods},
    }
    table = write_report(summary, output_dir)
    log("\n" + table)
    log(f"\ntotal run time: {summary['seconds']:.0f} s ({summary['seconds'] / 60:.1f} min); wrote "
        f"{output_dir}/summary.json, table.md, chart.png")
    return summary


def write_report(summary: dict, output_dir: Path) -> str:
    """``summary.json``, ``table.md`` (the table under a line naming the command, time and versions)
    and ``chart.png``; returns the table."""
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = format_table(summary)
    cfg, env = summary["config"], summary["environment"]
    (output_dir / "table.md").write_text(
        f"Held-out split (n={cfg['eval_records']}, the language prior broken), mean ± sample std over seeds "
        f"{', '.join(map(str, cfg['seeds']))}; `{summary['command']}`, {summary['seconds'] / 60:.1f} min on "
        f"{env['machine']} ({env['threads']} thread), torch {env['torch']}, commit {env['commit']}.\n\n{table}\n")
    plot(summary, output_dir / "chart.png")
    return table


# ----------------------------------------------------------------------------------------------
# command line


def _prog() -> str:
    """How this process was started, for --help and the command recorded with the results:
    the CLI passes only the arguments after ``compare``."""
    return "symmpo-fast compare" if Path(sys.argv[0]).name in ("symmpo-fast", "cli.py") else \
        "python -m symmpo_fast.compare"


def parser(prog: str) -> argparse.ArgumentParser:
    d = CompareConfig()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--output-dir", default="results/compare", help="where summary.json, table.md, chart.png go")
    p.add_argument("--work-dir", default="runs/compare", help="the cached warm-up, the runs' models and metrics")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="seeds of the preference stage")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS), metavar="METHOD",
                   help=f"default: {' '.join(d.methods)}; diagnostics: "
                        f"{' '.join(k for k in METHODS if k not in d.methods)}")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--train-records", type=int, default=d.train_records)
    p.add_argument("--eval-records", type=int, default=d.eval_records)
    p.add_argument("--sft-steps", type=int, default=d.sft_steps)
    p.add_argument("--sft-records", type=int, default=d.sft_records)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    args = parser(prog).parse_args(argv)
    cfg = CompareConfig(seeds=tuple(args.seeds), methods=tuple(args.methods), steps=args.steps,
                        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        learning_rate=args.learning_rate, train_records=args.train_records,
                        eval_records=args.eval_records, sft_steps=args.sft_steps, sft_records=args.sft_records)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per run would bury the log
    # The tiny model's tensors are too small to share between threads, and with the other core
    # busy every intra-op barrier can wait a whole time slice (the demo measured 50 ms vs 3 s a step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare(cfg, Path(args.output_dir), Path(args.work_dir), command=" ".join([prog, *argv]))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
