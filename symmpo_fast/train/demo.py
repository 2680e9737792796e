"""``symmpo-fast demo`` (``make demo``): the whole pipeline on one CPU in a few minutes, no download.

1. a tiny random-init LLaVA (:func:`symmpo_fast.models.build_tiny_llava`);
2. supervised warm-up on the generated task's ``sft`` split (y_w given m), short enough that
   the model leans on the task's language prior (see :mod:`symmpo_fast.synthetic`);
3. SymMPO with the real trainer (:func:`symmpo_fast.train.train`, config :func:`demo_config`)
   on the ``train`` split, the warmed-up model as policy start and frozen reference;
4. evaluation before and after on the ``heldout`` split, which breaks the language prior:
   preference accuracy, image conditioning, hallucination rate of greedy answers.

Everything is written under the output directory: ``sft/`` (the warmed-up model), ``symmpo/``
(the run: metrics.jsonl, metrics.png, checkpoints, final model) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..data import PreferenceCollator
from ..layouts import sequence_logps
from ..models import build_tiny_llava
from ..synthetic import PROMPT_FORMAT, SyntheticConfig, build_split
from .config import TrainConfig
from .evaluate import evaluate
from .model import load_base

SFT_RECORDS, SFT_STEPS, SFT_BATCH, SFT_LR = 2048, 200, 32, 3e-3
EVAL_RECORDS = 256


def demo_config(output_dir: str | Path, sft_dir: str | Path, seed: int = 0, quick: bool = False) -> TrainConfig:
    """The SymMPO stage of the demo; ``configs/demo.yaml`` holds the same settings."""
    return TrainConfig(
        output_dir=str(output_dir), model=str(sft_dir), seed=seed, finetune="full", reference="copy",
        objective="symmpo", data="synthetic", synthetic_records=256 if quick else 2048,
        eval_data="synthetic", synthetic_eval_records=64 if quick else EVAL_RECORDS, eval_steps=0,
        learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.1, global_batch_size=32, micro_batch_size=16,
        max_steps=8 if quick else 192, max_length=256, prompt_format=PROMPT_FORMAT, save_steps=0, keep_checkpoints=1,
        tensorboard=False,
    )


def supervised_warmup(model, processor, steps: int, seed: int, records: int = SFT_RECORDS, log=print) -> list[float]:
    """Maximise log p(y_w | m, x) per token on the sft split; returns the loss per step."""
    data = build_split("sft", records, SyntheticConfig())
    collator = PreferenceCollator(processor, "dpo", max_length=256, seed=seed, prompt_format=PROMPT_FORMAT)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SFT_LR, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    losses = []
    for step in range(steps):
        idx = [order[(step * SFT_BATCH + j) % len(order)] for j in range(SFT_BATCH)]
        batch = collator([data[i] for i in idx])
        logps = sequence_logps(model, batch)  # [B, 5]; column 0 is y_w given m
        tokens = sum(len(r[0]) for r in batch.response_ids)
        loss = -logps[:, 0].sum() / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  sft step {step + 1}/{steps}: loss per token {loss.item():.3f}")
    return losses


_ROWS = [("accuracy/dpo", "preference accuracy  y_w > y_l | m", "{:.1%}"),
         ("accuracy/pair_m", "preference accuracy  y_w > y_w' | m", "{:.1%}"),
         ("accuracy/pair_contrast", "preference accuracy  y_w' > y_w | m'", "{:.1%}"),
         ("image_conditioning", "image conditioning (nats)", "{:.2f}"),
         ("answer_accuracy", "greedy answers correct", "{:.1%}"),
         ("hallucination_rate", "hallucination rate (greedy)", "{:.1%}")]


def format_table(before: dict, after: dict) -> str:
    lines = [f"  {'held-out, prior broken (n=' + str(before['eval/records']) + ')':<40} {'before':>8} {'after':>8}"]
    for key, label, fmt in _ROWS:
        k = f"eval/{key}"
        if k in before and k in after:
            lines.append(f"  {label:<40} {fmt.format(before[k]):>8} {fmt.format(after[k]):>8}")
    return "\n".join(lines)


def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False, log=print) -> dict:
    """Run the four stages; returns (and writes to ``summary.json``) the before/after metrics."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the demo's own lines
    # The tiny model's tensors are far too small to share between threads: a second thread only
    # adds barriers, and when the other core is busy each barrier can wait a whole time slice
    # (measured: 50 ms per warm-up step on one thread, 3 s on two with the other core loaded).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(output_dir), seed, quick, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seed: int, quick: bool, log) -> dict:
    from .loop import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    heldout = build_split("heldout", 64 if quick else EVAL_RECORDS, SyntheticConfig())

    log(f"[1/4] tiny LLaVA (random init, seed {seed}) and supervised warm-up on the generated task")
    model, processor = build_tiny_llava(seed=seed)
    supervised_warmup(model, processor, steps=30 if quick else SFT_STEPS, seed=seed, log=log)
    sft_dir = out / "sft"
    model.save_pretrained(str(sft_dir))
    processor.save_pretrained(str(sft_dir))

    log(f"[2/4] evaluating the warmed-up model on {len(heldout)} held-out records (the prior is broken there)")
    before = evaluate(model, processor, heldout, batch_size=32, max_length=256, seed=seed, prompt_format=PROMPT_FORMAT)

    cfg = demo_config(out / "symmpo", sft_dir, seed=seed, quick=quick)
    log(f"[3/4] SymMPO: {cfg.max_steps} steps of {cfg.global_batch_size} records, reference = the warmed-up model")
    train(dataclasses.replace(cfg, overwrite=True))  # `make demo` again trains again

    log("[4/4] evaluating the SymMPO model")
    trained, processor = load_base(str(out / "symmpo" / "final"), seed, torch.device("cpu"), torch.float32)
    after = evaluate(trained, processor, heldout, batch_size=32, max_length=256, seed=seed,
                     prompt_format=PROMPT_FORMAT)

    seconds = time.perf_counter() - t0
    table = format_table(before, after)
    log("\n" + table)
    log(f"\n  plot: {out / 'symmpo' / 'metrics.png'}    time: {seconds:.0f} s")
    summary = {"before": before, "after": after, "seconds": seconds, "config": cfg.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
