"""What a run leaves in ``output_dir``, and the rule that two runs never share one.

A directory holds a run when it has any of :data:`RUN_FILES`.  Training into it needs
``resume`` (continue from its newest intact checkpoint, or from scratch when it has none yet)
or ``overwrite`` (delete those files first); without either it is refused before anything is
written, so that a new run can never delete the old one's metrics and keep its newer
checkpoints, which a later ``--resume`` would then continue.  Other files (a reference cache
that ``precompute-ref`` wrote there, the user's own) are left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.png", "checkpoints", "final", "tensorboard")


def run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def check(out: Path, resume: bool, overwrite: bool, has_checkpoint: bool) -> None:
    """Raises when training into ``out`` would mix two runs; writes nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a directory")
    found = run_files(out)
    if found and not (resume or overwrite):
        raise RuntimeError(f"output_dir {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                           "--overwrite to delete it and start over, or choose another --output-dir")
    if resume and not has_checkpoint and (out / "final").exists():
        raise RuntimeError(f"output_dir {out} holds a finished run (final/) but no checkpoint to resume from: pass "
                           "--overwrite to train it again from scratch, or choose another --output-dir")


def start(out: Path, overwrite: bool, config_yaml: str) -> None:
    """After every check has passed (process 0 only): clear an overwritten run, record the config."""
    if overwrite:
        for name in run_files(out):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml)
