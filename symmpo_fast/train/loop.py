"""The training loop, top to bottom: data, model, reference, sharding, optimizer, steps, checkpoints.

One optimizer step consumes one global batch of ``global_batch_size`` records, the same records
whatever the number of processes: the data order is a function of ``(seed, epoch)`` only,
process ``r`` takes its contiguous share of each global batch and splits it into micro-batches.
The loss is the mean over the records the step actually kept (a record dropped by truncation
counts nowhere): each micro-batch's mean loss is weighted by its records over the global count,
which one all-reduce per step gives every process before the backward, and by the number of
processes, since DDP and FSDP2 average gradients.  So 1 process and N processes compute the
same loss and the same update.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import formats
from .. import prompts
from ..data import PreferenceCollator
from ..synthetic import SyntheticConfig, build_split, build_text_split
from . import distributed as dist_utils
from . import rundir
from .checkpoint import Checkpointer
from .config import TrainConfig
from .evaluate import eval_objective, logp_metrics
from .model import Models, PreferenceModule, autocast, build, export, model_has_images
from .prepare import record_check
from .progress import MetricsLogger, check_metrics
from .refcache import ReferenceCache, cache_fingerprint


# ----------------------------------------------------------------------------------------------
# data


def check_model_and_objective(cfg: TrainConfig) -> None:
    """mDPO and SymMPO on a text-only model are refused here, before anything is loaded."""
    if cfg.objective != "dpo" and not model_has_images(cfg.model):
        raise ValueError(f"objective {cfg.objective} needs images (m, and m' or mDPO's crop m_l), and {cfg.model} is a "
                         "text-only model: train it with --objective dpo")


def _check(cfg: TrainConfig, processor, crop: bool, objective: str):
    """The trainer's read-time checks (:func:`symmpo_fast.train.prepare.record_check`) under the
    run's collator options (the held-out evaluation's for ``objective="eval"``)."""
    if processor is None:
        return None
    evaluation = objective == "eval"
    collate = cfg.collator_kwargs(evaluation=evaluation)
    return record_check(processor, cfg.seed, crop=crop and collate["mdpo_crop"] == "seeded", objective=objective,
                        collate=collate)


def load_data(cfg: TrainConfig, processor=None) -> formats.PreferenceDataset:
    """The training records; with the run's ``processor`` they are also checked for what the
    collator would refuse mid-run (see :func:`symmpo_fast.train.prepare.record_check`).  A text
    model (its processor a tokenizer) reads text preference data."""
    text_only = processor is not None and not hasattr(processor, "image_processor")
    if cfg.data == "synthetic" or cfg.data_format == "synthetic":
        n = cfg.max_records or cfg.synthetic_records
        return build_text_split("train", n) if text_only else build_split("train", n, SyntheticConfig())
    return formats.load_dataset(cfg.data, cfg.data_format, objective=cfg.objective, image_root=cfg.image_root,
                                skip_bad_records=cfg.skip_bad_records, max_records=cfg.max_records,
                                images=cfg.image_policy,
                                check=_check(cfg, processor, cfg.objective == "mdpo", cfg.objective),
                                text_only=text_only)


def load_eval_data(cfg: TrainConfig, processor=None, text_only: bool = False) -> formats.PreferenceDataset | None:
    if not cfg.eval_data:
        return None
    if processor is not None:
        text_only = not hasattr(processor, "image_processor")
    if cfg.eval_data == "synthetic":
        if text_only:
            return build_text_split("heldout", cfg.synthetic_eval_records)
        return build_split("heldout", cfg.synthetic_eval_records, SyntheticConfig())
    # Evaluation needs y_w, y_l and m; contrast fields are used when every record has them, else
    # mDPO's crop stands in for m', hence the crop check.
    return formats.load_dataset(cfg.eval_data, "auto", objective="dpo", image_root=cfg.image_root,
                                skip_bad_records=cfg.skip_bad_records, images=cfg.image_policy,
                                check=_check(cfg, processor, not text_only, "eval"), text_only=text_only)


def data_counts(dataset: formats.PreferenceDataset) -> dict[str, int]:
    """Skipped records by kind and kept duplicates, as flat metrics (none when there are none)."""
    counts = {f"bad_records/{k}": n for k, n in dataset.skipped_by_kind().items()}
    if counts:
        counts["bad_records"] = len(dataset.skipped)
    if dataset.duplicates:
        counts["duplicate_records"] = len(dataset.duplicates)
    return counts


class _Indexed:
    """The data set as (index, record) pairs, so a batch knows which records it holds."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _Collate:
    def __init__(self, collator: PreferenceCollator):
        self.collator = collator

    def __call__(self, items):
        return [i for i, _ in items], self.collator([r for _, r in items])


class StepSchedule:
    """Which records process ``rank`` collates at each step: a function of ``(seed, step)`` only."""

    def __init__(self, num_records: int, global_batch: int, micro_batch: int, world: int, rank: int, seed: int):
        if global_batch % world:
            raise ValueError(f"global_batch_size={global_batch} must be a multiple of the {world} processes")
        self.per_rank = global_batch // world
        if self.per_rank % micro_batch:
            raise ValueError(f"each process gets {self.per_rank} records per step, not a multiple of "
                             f"micro_batch_size={micro_batch}")
        if num_records < global_batch:
            raise ValueError(f"the data has {num_records} records, fewer than one global batch of {global_batch}: "
                             "lower global_batch_size")
        self.n, self.global_batch, self.micro, self.rank, self.seed = num_records, global_batch, micro_batch, rank, seed
        self.steps_per_epoch = num_records // global_batch  # the last partial batch of an epoch is left out
        self._perm: tuple[int, list[int]] | None = None

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.per_rank
        mine = self._order(epoch)[start: start + self.per_rank]
        return [mine[i: i + self.micro] for i in range(0, self.per_rank, self.micro)]

    def step_records(self, step: int) -> list[int]:
        """Every record of the global batch of ``step`` (0-based), over all processes."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[k * self.global_batch: (k + 1) * self.global_batch]

    def loader(self, dataset, collator: PreferenceCollator, start: int, stop: int, num_workers: int = 0):
        """Yields, for each step in ``[start, stop)``, this process's micro-batches ``[(indices, batch), ...]``."""
        sampler = [mb for s in range(start, stop) for mb in self.micro_batches(s)]
        # Its own generator: a DataLoader draws a seed when it starts, which from the global RNG
        # would shift the dropout masks of a resumed run against an uninterrupted one.
        loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_sampler=sampler, collate_fn=_Collate(collator),
                                             num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(self.seed))
        step_batches = []
        for item in loader:
            step_batches.append(item)
            if len(step_batches) == self.accumulation:
                yield step_batches
                step_batches = []


def make_scheduler(optimizer, cfg: TrainConfig, total: int, start: int):
    """The learning rate of step ``start + k``: ``learning_rate * lr_lambda(total)(start + k)``.

    A function of the step and this run's settings alone, never of what a checkpoint stored: a
    run resumed with a new peak ``learning_rate`` uses it from ``start`` on, and one resumed with
    a larger ``max_steps`` continues on the schedule of the new total at the same step (the
    learning rate an uninterrupted run of that length has there), instead of the old schedule's
    end, lr 0.  The optimizer state read from a checkpoint carries the old rates, hence the reset.
    """
    f = lr_lambda(total, cfg.warmup_ratio, cfg.lr_scheduler)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.learning_rate
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: f(start + k))


def lr_lambda(total: int, warmup_ratio: float, kind: str) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step, as transformers' schedules give it
    (``get_{cosine,linear,constant}_schedule_with_warmup`` with ``ceil(warmup_ratio * total)``
    warm-up steps, as HF's Trainer and so the official SymMPO scripts use them): ``step / warmup``
    during the warm-up, so the first step runs at 0, then cosine or linear decay to 0 at
    ``total``, or constant."""
    warmup = math.ceil(warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# ----------------------------------------------------------------------------------------------
# reference


class DatasetReference:
    """Reference log-probs shipped with the data (the official parquet's ``logps`` column)."""

    def __init__(self, dataset, collator: PreferenceCollator, average: bool):
        missing = [r["id"] for r in dataset.records if "ref_logps" not in r]
        if missing:
            raise ValueError(f"reference=dataset but {len(missing)} records have no precomputed logps "
                             f"(e.g. {missing[0]}): use reference=adapter, copy or cache")
        # The official logps are the official input's: llava_v1's, its system text, y_w given m'
        # in column 3 (mDPO's column 3 is y_w given the crop m_l), cut only as the official code cuts.
        if collator.prompt_format != "llava_v1" or collator.format.system != prompts.LLAVA_V1_SYSTEM:
            raise ValueError("reference=dataset: the official logps were computed on the official llava_v1 input; this "
                             f"run's prompt is {collator.prompt_format!r} (or another system text): use "
                             "reference=adapter, copy or cache")
        self.dataset, self.collator, self.kind = dataset, collator, "mean" if average else "sum"

    def __call__(self, indices: list[int], batch) -> torch.Tensor:
        if batch.num_dropped:  # align by key: which records survived truncation
            keys = set(batch.record_keys)
            indices = [i for i in indices
                       if set(self.collator([self.dataset[i]]).record_keys) & keys]
        return torch.tensor([self.dataset.records[i]["ref_logps"][self.kind] for i in indices], dtype=torch.float32)


def make_reference(cfg: TrainConfig, models: Models, dataset, collator, root, ref_root, device):
    """A function ``(indices, batch) -> [B, 5]`` reference log-probs for the run's reference mode."""
    mode = cfg.reference_mode
    dtype = models.dtype
    if mode == "adapter":
        def adapter_ref(indices, batch):
            with autocast(device, dtype):
                return root(batch, mode="reference")
        return adapter_ref
    if mode == "copy":
        def copy_ref(indices, batch):
            with autocast(device, dtype):
                return ref_root(batch, mode="reference")
        return copy_ref
    if mode == "cache":
        directory = cfg.ref_cache or str(Path(cfg.output_dir) / "ref_cache")
        cache = ReferenceCache(directory, cache_fingerprint(models.fingerprint, dataset.fingerprint(), cfg),
                               collator.columns)
        return lambda indices, batch: cache.lookup(batch.record_keys)
    return DatasetReference(dataset, collator, cfg.objective_config().average_logps)


# ----------------------------------------------------------------------------------------------
# the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_parallel(cfg: TrainConfig, world: int) -> str:
    if world == 1:
        return "none"
    return "fsdp" if cfg.parallel == "auto" else cfg.parallel


@dataclass
class _Step:
    """What one optimizer step produced, summed over micro-batches and processes."""

    records: int
    metrics: dict[str, float]
    tokens: int
    dropped: int
    truncated: int


def _sequence_tokens(batch) -> int:
    """Tokens of every used role as a separate sequence: the work an unpacked trainer would do."""
    return sum(len(p) + len(r) for ps, rs in zip(batch.prompt_ids, batch.response_ids)
               for p, r in zip(ps, rs) if p is not None)


def _grad_sync(train_root, parallel: str, last: bool):
    """Gradients are reduced across processes on the last micro-batch of a step only."""
    if parallel == "ddp" and not last:
        return train_root.no_sync()
    if parallel == "fsdp":
        train_root.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def record_names(dataset, indices: list[int], most: int = 8) -> str:
    """``indices``' record ids (file and line or row), the first ``most`` of them, for messages."""
    names = [str(dataset.records[i].get("id", i)) for i in indices]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return "; ".join(names[:most]) + more


def _run_step(micro, train_root, reference, parallel: str, device, dtype, world: int,
              names: Callable[[list[int]], str]) -> _Step:
    counts = torch.tensor([sum(b.num_records for _, b in micro), sum(b.num_dropped for _, b in micro),
                           sum(b.num_truncated for _, b in micro), sum(_sequence_tokens(b) for _, b in micro)],
                          dtype=torch.float64)
    dist_utils.all_reduce_sum(counts)  # one host sync per step: the global record count scales every loss
    n_global = int(counts[0])
    # Unreachable for data read with the run's processor (a record too long to keep is a bad
    # record, too_long, when it is read); the generated data is not checked so.
    if n_global == 0:
        raise RuntimeError(f"every record of this step was dropped by truncation (this process's: "
                           f"{names([i for ix, _ in micro for i in ix])}): raise max_length or use truncation=question")
    keys, sums = None, None
    for i, (indices, batch) in enumerate(micro):
        if batch.num_records == 0:
            if parallel != "none":  # the other processes would wait in a collective forever
                raise RuntimeError(f"a whole micro-batch ({names(indices)}) was dropped by truncation, which a "
                                   "multi-process run cannot skip: raise max_length or micro_batch_size, or use "
                                   "truncation=question")
            continue
        batch = batch.to(device)
        ref = reference(indices, batch).to(device)
        with _grad_sync(train_root, parallel, last=i == len(micro) - 1), autocast(device, dtype):
            loss, metrics = train_root(batch, ref)
            (loss * (batch.num_records * world / n_global)).backward()
        if keys is None:
            keys = sorted(k for k in metrics if k != "loss")
            sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
        values = torch.stack([loss.detach().float()] + [metrics[k].detach().float().reshape(()) for k in keys])
        sums += values.cpu().double() * batch.num_records
    if sums is None:  # only reachable on one process, every micro-batch empty
        raise RuntimeError("every micro-batch of this step was empty")
    dist_utils.all_reduce_sum(sums)
    sums /= n_global
    row = {"loss": sums[0].item(), **{k: sums[j + 1].item() for j, k in enumerate(keys)}}
    return _Step(n_global, row, int(counts[3]), int(counts[1]), int(counts[2]))


def _clip(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)


def nonfinite_tensors(params) -> int:
    """How many trainable tensors hold a NaN or an infinity, over every process (a collective;
    one host sync): checked before every checkpoint and export, never per step."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    if not local:
        return 0
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).sum().double().cpu().reshape(1)
    return int(dist_utils.all_reduce_sum(bad).item())


def _refuse_nonfinite(params, step: int, what: str, ckpt: Checkpointer) -> None:
    n = nonfinite_tensors(params)
    if n:
        kept = ckpt.complete()
        raise RuntimeError(f"after step {step}, {n} of {len(params)} trainable tensors hold NaN or inf: {what} (the "
                           f"newest checkpoint is {kept[-1] if kept else 'none'}). Lower learning_rate, check the data "
                           "for broken records, or train in dtype float32")


def _oom_message(cfg: TrainConfig) -> str:
    return (f"out of memory with micro_batch_size={cfg.micro_batch_size}: lower --micro-batch-size (gradient "
            f"accumulation keeps global_batch_size={cfg.global_batch_size}), add --gradient-checkpointing, use "
            "--finetune lora, or shard over more GPUs with torchrun and --parallel fsdp")


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) one training job; returns the last logged row and where the model went.

    ``on_step(step, row)`` is called after every logged step (tests use it to interrupt a run).
    """
    device = dist_utils.init()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    parallel = resolve_parallel(cfg, world)
    out = Path(cfg.output_dir)
    # Check first, write after: nothing in output_dir changes until every check below has passed
    # (the run directory, the settings against the checkpoint's, the data, the reference cache).
    ckpt = Checkpointer(out, cfg.keep_checkpoints, sharded=parallel == "fsdp")
    resumed = ckpt.choose() if cfg.resume else None
    rundir.check(out, cfg.resume, cfg.overwrite, has_checkpoint=resumed is not None)
    changes = cfg.resume_changes(resumed["settings"], resumed["path"], bool(resumed.get("legacy"))) if resumed else []
    start = resumed["step"] if resumed else 0
    if start:  # a row broken in the middle of metrics.jsonl stops here, before anything is written
        check_metrics(out / "metrics.jsonl")
    seed_everything(cfg.seed)
    objective = cfg.objective_config()

    check_model_and_objective(cfg)  # before any weight is loaded
    models = build(cfg, device)
    dataset = load_data(cfg, models.processor)
    eval_data = load_eval_data(cfg, models.processor)
    if resumed and resumed["data"] is not None and resumed["data"] != dataset.fingerprint():
        raise RuntimeError(f"{resumed['path']} was trained on other records than {cfg.data} now gives (their content "
                           "fingerprint differs): resume with the same data, or pass --overwrite to start over")
    schedule = StepSchedule(len(dataset), cfg.global_batch_size, cfg.micro_batch_size, world, rank, cfg.seed)
    total = cfg.max_steps or max(1, int(cfg.num_epochs * schedule.steps_per_epoch))
    if start > total:
        raise ValueError(f"{resumed['path']} is at step {start}, past this run's {total} steps: raise max_steps")
    collator = PreferenceCollator(models.processor, cfg.objective, **cfg.collator_kwargs())

    def names(indices: list[int]) -> str:
        return record_names(dataset, indices)

    root = PreferenceModule(models.policy, objective, cfg.packing, cfg.backend)
    ref_root = PreferenceModule(models.reference, objective, cfg.packing, cfg.backend) if models.reference else None
    reference = make_reference(cfg, models, dataset, collator, root, ref_root, device)
    dist_utils.barrier()  # every process has checked before process 0 writes
    if rank == 0:
        rundir.start(out, cfg.overwrite, cfg.to_yaml())
    if resumed and resumed["damaged"]:
        ckpt.set_aside(resumed["damaged"])  # collective: process 0 renames, every process waits
    dist_utils.barrier()

    train_root = root
    if parallel == "fsdp":
        gather = models.dtype if device.type == "cuda" and models.dtype != torch.float32 else None
        train_root = dist_utils.shard_fsdp(root, models.policy, gather)
        if ref_root is not None:
            dist_utils.shard_fsdp(ref_root, models.reference, gather)
    elif parallel == "ddp":
        train_root = dist_utils.wrap_ddp(root, device)
    # Dropout and other runtime randomness differ per process, the model init did not.
    seed_everything(cfg.seed + rank)

    params = [p for p in root.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    bad = 0
    if resumed:
        ckpt.load(Path(resumed["path"]), root, optimizer)
        bad = resumed.get("bad_steps", 0)
    scheduler = make_scheduler(optimizer, cfg, total, start)
    logger = MetricsLogger(out, total, start, progress=cfg.progress, tensorboard=cfg.tensorboard, enabled=rank == 0)
    counts = data_counts(dataset)
    if rank == 0:
        problems = f" ({dataset.problems()})" if dataset.problems() else ""
        logger.write(f"symmpo-fast: {cfg.objective} on {len(dataset)} records{problems}, {total} steps of "
                     f"{cfg.global_batch_size} records ({world} process(es) x {schedule.accumulation} micro-batches "
                     f"of {cfg.micro_batch_size}), {parallel if parallel != 'none' else 'one process'}, "
                     f"{'resuming at step ' + str(start) + ' from ' + resumed['path'] if resumed else 'from scratch'}")
        for change in changes:
            logger.write(f"  resumed with {change}")
        if eval_data is not None and eval_data.problems():
            logger.write(f"  evaluation data {cfg.eval_data}: {eval_data.problems()}")

    row: dict = {}
    t_last = time.perf_counter()
    try:
        for step, micro in zip(range(start, total), schedule.loader(dataset, collator, start, total, cfg.num_workers)):
            try:
                res = _run_step(micro, train_root, reference, parallel, device, models.dtype, world, names)
                grad_norm = _clip(params, cfg.max_grad_norm)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(_oom_message(cfg)) from e
            finite = math.isfinite(res.metrics["loss"]) and math.isfinite(grad_norm)
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
                bad = 0
            else:
                bad += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            now = time.perf_counter()
            row = {"step": step + 1, **res.metrics, "lr": lr, "grad_norm": grad_norm, "records": res.records,
                   "tokens_per_s": res.tokens / max(now - t_last, 1e-9)}
            t_last = now
            if res.dropped or res.truncated:
                row.update(dropped=res.dropped, truncated=res.truncated)
            if counts:  # what the data set lost, once per (re)start
                row.update(counts)
                counts = {}
            if not finite:
                row["skipped"] = True
                logger.write(f"step {step + 1}: non-finite loss or gradient (loss {res.metrics['loss']}, grad norm "
                             f"{grad_norm}); step skipped ({bad} in a row); its records: "
                             f"{names(schedule.step_records(step))}")
            if eval_data is not None and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0:
                row.update(_evaluate(root, eval_data, models, cfg, device))
            logger.log(row)
            if on_step is not None:
                on_step(step + 1, row)
            if not finite:  # a bad batch is skipped; non-finite weights are gone, no later step recovers them
                _refuse_nonfinite(params, step + 1, "stopping", ckpt)
            if bad >= cfg.max_bad_steps:
                raise RuntimeError(f"{bad} steps in a row had a non-finite loss or gradient (last: step {step + 1}); "
                                   "stopping. Lower learning_rate, check the data for broken records, or train in "
                                   "dtype float32")
            last = step + 1 == total
            if last or (cfg.save_steps and (step + 1) % cfg.save_steps == 0):
                _refuse_nonfinite(params, step + 1, "no checkpoint saved", ckpt)
                state = {"bad_steps": bad, "records_seen": (step + 1) * cfg.global_batch_size,
                         "settings": cfg.to_dict(), "data": dataset.fingerprint()}
                ckpt.save(step + 1, root, optimizer, state)
    finally:
        logger.close()

    final = out / "final"
    _refuse_nonfinite(params, total, "the model is not exported", ckpt)
    _export(root, models, cfg, final, parallel)
    if rank == 0:
        try:
            from .progress import plot

            if (out / "metrics.jsonl").exists():
                plot(out)
        except ImportError:
            pass
    dist_utils.barrier()
    return {"last": row, "final": str(final), "steps": total, "bad_records": dataset.skipped_by_kind(),
            "duplicate_records": len(dataset.duplicates)}


def _evaluate(root, eval_data, models: Models, cfg: TrainConfig, device) -> dict:
    collator = PreferenceCollator(models.processor, eval_objective(eval_data), **cfg.collator_kwargs(evaluation=True))
    root.eval()
    try:
        def fwd(batch):
            with autocast(device, models.dtype):
                return root(batch.to(device), mode="logps")
        with torch.no_grad():
            return logp_metrics(fwd, eval_data, collator, max(cfg.micro_batch_size, 8))
    finally:
        root.train()


def _export(root, models: Models, cfg: TrainConfig, final: Path, parallel: str) -> None:
    state_dict = None
    if parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(root, options=options)  # collective: every process takes part
        state_dict = {k[len("model."):]: v for k, v in full.items()}
    if dist_utils.rank() == 0:
        export(models.policy, models.processor, cfg, final, state_dict=state_dict)
    dist_utils.barrier()
