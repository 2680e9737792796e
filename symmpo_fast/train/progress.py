"""Per-step metrics: ``metrics.jsonl``, a progress bar, TensorBoard when installed, and the plot.

``metrics.jsonl`` holds one JSON object per optimizer step with ``step``, ``loss`` and every
metric of :func:`symmpo_fast.preference_loss` (``loss/<term>``, ``rewards/<role>``,
``accuracy/<pair>``, ``margin/<pair>``, ...) plus ``lr``, ``grad_norm``, ``tokens_per_s`` and
``records``; a step skipped for a non-finite loss or gradient has ``"skipped": true``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


def _clean(value):
    """JSON has no NaN or infinity: they are written as null (the step is marked skipped anyway)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends to ``DIR/metrics.jsonl`` (after dropping rows past ``resume_step``) and shows a bar."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.jsonl and the plot carry the same numbers
                pass
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        """A resumed run drops what the interrupted one logged after its checkpoint, so steps never repeat."""
        if not self.path.exists():
            return
        if start_step == 0:
            self.path.unlink()
            return
        keep = [ln for ln, row in _rows(self.path) if row["step"] <= start_step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        if self.bar is not None:
            acc = next((row[k] for k in ("accuracy/dpo", "accuracy/copo", "accuracy/pair_m") if row.get(k) is not None),
                       None)
            post = {"loss": "nan" if row.get("loss") is None else f"{row['loss']:.4f}"}
            if acc is not None:
                post["acc"] = f"{acc:.2f}"
            if row.get("tokens_per_s"):
                post["tok/s"] = f"{row['tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _rows(path: Path, warn: bool = True) -> list[tuple[str, dict]]:
    """``(line, row)`` of every complete row.  A process killed while it appended a row leaves that
    last line torn: it is dropped (its step is run again on resume), with a warning; a broken row
    anywhere else raises, naming the line."""
    if not path.is_file():  # a FIFO named metrics.jsonl would block read_text forever
        raise ValueError(f"{path} is not a regular file: move it away")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row")
            rows.append((ln, row))
        except (ValueError, RecursionError):
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON row with a step, and not a torn last line "
                                 "either: repair or remove it") from None
            if warn:
                warnings.warn(f"{path}: dropping its torn last line (the run was killed while writing it)",
                              RuntimeWarning, stacklevel=3)
    return rows


def check_metrics(path: Path) -> None:
    """Raises when a resume could not truncate ``path`` (a broken row before its last line):
    called before the run writes anything, so that config.yaml is not rewritten for a run that
    then stops.  Every process reads it (all of them must stop alike)."""
    if path.exists():
        _rows(path, warn=False)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a training output directory")
    return [row for _, row in _rows(path)]


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, rewards and reward accuracies over steps, one panel each, to ``DIR/metrics.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("symmpo-fast plot needs matplotlib: pip install matplotlib") from None
    rows = [r for r in read_metrics(run_dir) if not r.get("skipped")]
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl has no completed steps to plot")
    steps = [r["step"] for r in rows]
    # The terms are unweighted: the margin term's square runs orders of magnitude above the
    # others (its weight is 1e-4), hence their own panel on a log scale.
    panels = [("loss", ["loss"], "linear"),
              ("loss terms (unweighted)", sorted(k for k in rows[-1] if k.startswith("loss/")), "log"),
              ("rewards", sorted(k for k in rows[-1] if k.startswith("rewards/")), "linear"),
              ("reward accuracy", sorted(k for k in rows[-1] if k.startswith("accuracy/")), "linear")]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys, scale) in zip(axes[0], panels):
        for k in keys:
            ax.plot(steps, [r.get(k) if r.get(k) is not None else float("nan") for r in rows], label=k, lw=1.2)
        ax.set_yscale(scale)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
