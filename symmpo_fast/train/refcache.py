"""Reference log-probs computed once (``symmpo-fast precompute-ref``) and looked up during training.

The cache is a directory with ``logps.safetensors`` (``[N, 5]`` float32 in ROLES order) and
``index.json`` (the record keys, :attr:`symmpo_fast.data.PreferenceBatch.record_keys`, content
hashes of every used role's token ids and image pixels, and a fingerprint of what produced
them: the reference weights, the data set, the objective and the collation settings).  Opening a
cache whose fingerprint differs from the run's is refused with a message naming what changed;
a record whose key is missing (its text, image or tokenization changed) is refused too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..objectives import NUM_ROLES

FILES = ("logps.safetensors", "index.json")


def cache_fingerprint(model_fingerprint: str, data_fingerprint: str, cfg) -> dict:
    """What the cached numbers depend on, besides each record's own content (in its key)."""
    objective = cfg.objective_config()
    return {"model": model_fingerprint, "data": data_fingerprint, "objective": cfg.objective,
            "average_logps": objective.average_logps, "max_length": cfg.max_length, "truncation": cfg.truncation,
            "crop_seed": cfg.seed}


def write_cache(directory: str | Path, keys: list[str], logps: torch.Tensor, fingerprint: dict) -> Path:
    """Write atomically: files go to a temporary name first, the index (which makes the cache valid) last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if logps.shape != (len(keys), NUM_ROLES):
        raise ValueError(f"logps must be [{len(keys)}, {NUM_ROLES}], got {tuple(logps.shape)}")
    tmp = d / "logps.safetensors.tmp"
    save_file({"logps": logps.float().contiguous().cpu()}, str(tmp))
    tmp.replace(d / "logps.safetensors")
    tmp = d / "index.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "keys": keys}))
    tmp.replace(d / "index.json")
    return d


class ReferenceCache:
    def __init__(self, directory: str | Path, expected: dict):
        d = Path(directory)
        if not all((d / f).exists() for f in FILES):
            raise FileNotFoundError(f"no reference cache in {d}: run `symmpo-fast precompute-ref` with the same "
                                    "config first (or use reference=adapter/copy)")
        index = json.loads((d / "index.json").read_text())
        changed = [k for k in sorted(set(expected) | set(index["fingerprint"]))
                   if expected.get(k) != index["fingerprint"].get(k)]
        if changed:
            detail = ", ".join(f"{k}: cached {index['fingerprint'].get(k)!r} vs now {expected.get(k)!r}"
                               if k not in ("model", "data") else f"{k} changed" for k in changed)
            raise RuntimeError(f"the reference cache in {d} was computed for another setting ({detail}); "
                               "rerun `symmpo-fast precompute-ref` for this model and data")
        self.directory = d
        self.logps = load_file(str(d / "logps.safetensors"))["logps"]
        self.row = {k: i for i, k in enumerate(index["keys"])}

    def __len__(self) -> int:
        return len(self.row)

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """``[B, 5]`` float32 reference log-probs for the batch's record keys."""
        missing = [k for k in keys if k not in self.row]
        if missing:
            raise RuntimeError(f"{len(missing)} record(s) of this batch are not in the reference cache "
                               f"{self.directory} (e.g. key {missing[0][:16]}...): the data or its tokenization "
                               "changed since precompute-ref; rerun it")
        return self.logps[[self.row[k] for k in keys]]


def precompute(cfg) -> Path:
    """Reference log-probs of every training record, written to ``cfg.ref_cache`` (default output_dir/ref_cache).

    Under torchrun each process takes every ``world``-th micro-batch of an unsharded replica (a
    no-grad forward fits where training needed sharding) and process 0 gathers and writes.
    """
    from tqdm.auto import tqdm

    from ..data import PreferenceCollator
    from ..layouts import reference_logps
    from . import distributed as dist_utils
    from .loop import check_model_and_objective, load_data
    from .model import autocast, build_reference

    device = dist_utils.init()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    check_model_and_objective(cfg)
    model, processor, dtype, fingerprint = build_reference(cfg, device)
    dataset = load_data(cfg, processor)  # checked as training checks it: the same records, the same fingerprint
    collator = PreferenceCollator(processor, cfg.objective, **cfg.collator_kwargs())
    average = cfg.objective_config().average_logps
    keys: list[str] = []
    rows: list[torch.Tensor] = []
    step = cfg.micro_batch_size
    starts = list(range(0, len(dataset), step))[rank::world]
    for s in tqdm(starts, desc="reference", disable=rank != 0):
        batch = collator([dataset[i] for i in range(s, min(s + step, len(dataset)))])
        if batch.num_records == 0:
            continue
        with autocast(device, dtype):
            logps = reference_logps(model, batch.to(device), cfg.packing, cfg.backend, average=average)
            rows.append(logps.float().cpu())
        keys += batch.record_keys
    logps = torch.cat(rows) if rows else torch.zeros(0, NUM_ROLES)
    parts = dist_utils.gather_to_rank0((keys, logps.tolist()))
    out = Path(cfg.ref_cache or Path(cfg.output_dir) / "ref_cache")
    if rank == 0:
        all_keys = [k for ks, _ in parts for k in ks]
        all_logps = torch.tensor([v for _, vs in parts for v in vs], dtype=torch.float32).reshape(-1, NUM_ROLES)
        write_cache(out, all_keys, all_logps, cache_fingerprint(fingerprint, dataset.fingerprint(), cfg))
    dist_utils.barrier()
    return out
