"""Held-out evaluation: preference accuracy per pair, image conditioning, hallucination of greedy answers.

* ``accuracy/<pair>``: the share of records where the model gives the winner a higher sequence
  log-prob than the loser (the model alone, no reference: comparable before and after
  training): ``dpo`` y_w > y_l given m; ``pair_m`` y_w > y_w' given m; ``pair_contrast``
  y_w' > y_w given m'.
* ``image_conditioning``: mean of log p(y_w | m) - log p(y_w | m') (m' the contrast image, or
  mDPO's crop m_l for data without one), the drop mDPO's paper measures: near 0 when the answer
  ignores the image.  ``image_conditioning_positive`` is the share of records where it is > 0.
* ``hallucination_rate``: the share of greedy answers that name a value the image contradicts
  (generated task only: it needs the record's ground truth, see :func:`symmpo_fast.synthetic.judge`);
  ``answer_accuracy`` the share that state the true value and nothing contradicting it.

Under several processes each one evaluates a strided share of the records and the sums are
all-reduced, so every process gets the same numbers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..data import Images, PreferenceCollator
from ..formats import PreferenceDataset
from ..layouts import sequence_logps
from ..models import adapter_for, unwrap
from ..objectives import CHOSEN, CONTRAST_CHOSEN, CONTRAST_REJECTED, PAIR_REJECTED, REJECTED
from ..synthetic import judge
from . import distributed as dist_utils

PAIRS = {"dpo": (CHOSEN, REJECTED), "pair_m": (CHOSEN, PAIR_REJECTED),
         "pair_contrast": (CONTRAST_CHOSEN, CONTRAST_REJECTED)}


def eval_objective(dataset: PreferenceDataset) -> str:
    """SymMPO's five columns when the data has contrast images and answers, else mDPO's (crop as
    m'); DPO's two for text data."""
    if not dataset.has_fields(("image",)):
        return "dpo"
    return "symmpo" if dataset.has_fields(("contrast_image", "contrast_chosen")) else "mdpo"


@torch.no_grad()
def logp_metrics(logps_fn, dataset: PreferenceDataset, collator: PreferenceCollator, batch_size: int = 16,
                 prefix: str = "eval/") -> dict[str, float]:
    """Accuracy per pair and image conditioning; ``logps_fn(batch) -> [B, 5]`` is the model's forward.

    ``collator`` must be built with :func:`eval_objective`'s objective.
    """
    cols = set(collator.columns)
    pairs = {k: v for k, v in PAIRS.items() if set(v) <= cols}
    images = CONTRAST_REJECTED in cols  # text data (DPO) has no image conditioning to measure
    rank, world = dist_utils.rank(), dist_utils.world_size()
    # sums: [records, image drop, image drop > 0, one per pair]
    sums = torch.zeros(3 + len(pairs), dtype=torch.float64)
    starts = list(range(0, len(dataset), batch_size))
    # Every process runs the same number of forwards (FSDP's collectives need it): a process
    # without a batch of its own re-runs the first one and counts nothing.
    rounds = -(-len(starts) // world)
    for r in range(rounds):
        i = r * world + rank
        own = i < len(starts)
        s = starts[i] if own else 0
        batch = collator([dataset[j] for j in range(s, min(s + batch_size, len(dataset)))])
        if batch.num_records == 0:
            continue
        logps = logps_fn(batch).double().cpu()
        if not own:
            continue
        drop = logps[:, CHOSEN] - logps[:, CONTRAST_REJECTED] if images else torch.zeros(len(logps))
        row = [float(batch.num_records), drop.sum().item(), (drop > 0).double().sum().item()]
        row += [(logps[:, w] > logps[:, lose]).double().sum().item() for w, lose in pairs.values()]
        sums += torch.tensor(row, dtype=torch.float64)
    dist_utils.all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    out = {f"{prefix}records": int(sums[0].item())}
    if images:
        out.update({f"{prefix}image_conditioning": sums[1].item() / n,
                    f"{prefix}image_conditioning_positive": sums[2].item() / n})
    for j, name in enumerate(pairs):
        out[f"{prefix}accuracy/{name}"] = sums[3 + j].item() / n
    return out


@torch.no_grad()
def greedy_answers(model, processor, dataset: PreferenceDataset, batch_size: int = 32, max_new_tokens: int = 16,
                   prompt_format: str = "auto", system_prompt: str | None = None) -> list[str]:
    """The model's greedy answer to each record's question about its image m, asked in the prompt
    format the model was trained with (the collator's prompt for y_w given m, left-padded)."""
    if not hasattr(processor, "image_processor"):
        raise ValueError("greedy answers are judged against the generated task's images; a text model has none")
    base = unwrap(model)
    device = base.get_input_embeddings().weight.device
    tok = processor.tokenizer
    collator = PreferenceCollator(processor, "dpo", max_length=10**9, prompt_format=prompt_format,
                                  system_prompt=system_prompt)
    pad = collator.pad_token_id
    answers: list[str] = []
    for s in range(0, len(dataset), batch_size):
        batch = collator([dataset[j] for j in range(s, min(s + batch_size, len(dataset)))])
        prompts = [row[0] for row in batch.prompt_ids]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # generation continues every row at its end: pad on the left
            ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
        images = batch.images().select([row[0] for row in batch.image_index])
        images = Images(images.pixel_values.to(device, base.dtype), images.grid_thw)
        # The family's own inputs for whole sequences (Qwen-VL: the patch grids and the placeholder
        # mask its M-RoPE positions are computed from).
        rows = SimpleNamespace(input_ids=ids.to(device), attention_mask=mask.to(device))
        out = base.generate(**adapter_for(base).sequence_kwargs(rows, images), max_new_tokens=max_new_tokens,
                            do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        answers += [t.strip() for t in tok.batch_decode(out[:, width:], skip_special_tokens=True)]
    return answers


def hallucination_metrics(answers: list[str], dataset: PreferenceDataset, prefix: str = "eval/") -> dict[str, float]:
    verdicts = [judge(a, dataset.records[i]["meta"]) for i, a in enumerate(answers) if "meta" in dataset.records[i]]
    if not verdicts:
        return {}
    n = len(verdicts)
    return {f"{prefix}hallucination_rate": verdicts.count("hallucinated") / n,
            f"{prefix}answer_accuracy": verdicts.count("correct") / n,
            f"{prefix}no_answer_rate": verdicts.count("no_answer") / n}


def evaluate(model, processor, dataset: PreferenceDataset, batch_size: int = 16, packing: str = "shared_prefix",
             backend: str = "auto", generate: bool = True, max_length: int = 2048, seed: int = 0,
             prefix: str = "eval/", prompt_format: str = "auto", system_prompt: str | None = None,
             truncation: str = "drop") -> dict[str, float]:
    """Every metric of the module docstring for one model on one held-out data set (one process),
    collated as a training run's held-out evaluation is (``TrainConfig.collator_kwargs(evaluation=True)``)."""
    was_training = model.training
    model.eval()
    try:
        collator = PreferenceCollator(processor, eval_objective(dataset), max_length=max_length, seed=seed,
                                      prompt_format=prompt_format, system_prompt=system_prompt, truncation=truncation)
        out = logp_metrics(lambda b: sequence_logps(model, b, packing, backend), dataset, collator, batch_size, prefix)
        if generate and any("meta" in r for r in dataset.records):
            answers = greedy_answers(model, processor, dataset, batch_size=max(batch_size, 32),
                                     prompt_format=prompt_format, system_prompt=system_prompt)
            out.update(hallucination_metrics(answers, dataset, prefix))
    finally:
        model.train(was_training)
    return out


def run_eval(cfg, generate: bool = True) -> dict[str, float]:
    """``symmpo-fast eval``: ``cfg.model`` (a checkpoint, an exported run ``DIR/final`` or a run
    directory) on ``cfg.eval_data``, on one process."""
    from pathlib import Path

    from .loop import load_eval_data
    from .model import compute_dtype, load_base, model_has_images

    name = cfg.model
    if (Path(name) / "final").is_dir():  # a training output directory
        name = str(Path(name) / "final")
    data = load_eval_data(cfg, text_only=not model_has_images(name))
    if data is None:
        raise ValueError("eval needs --eval-data (a data file, or 'synthetic' for the generated held-out split)")
    device = dist_utils.init()
    model, processor = load_base(name, cfg.seed, device, compute_dtype(cfg, device))
    prompt_format, system_prompt = cfg.prompt_format, cfg.system_prompt
    trained = Path(name) / "train_config.yaml"
    if prompt_format == "auto" and system_prompt is None and trained.exists():
        # An exported run is asked in the prompt format it was trained with.
        run_cfg = type(cfg).from_yaml(trained)
        prompt_format, system_prompt = run_cfg.prompt_format, run_cfg.system_prompt
    return evaluate(model, processor, data, batch_size=max(cfg.micro_batch_size, 16), packing=cfg.packing,
                    backend=cfg.backend, generate=generate, max_length=cfg.max_length, seed=cfg.seed,
                    prompt_format=prompt_format, system_prompt=system_prompt, truncation=cfg.truncation)
