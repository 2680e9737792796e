"""Reference log-probs computed once (``symmpo-fast precompute-ref``) and looked up during training.

The cache is a directory with ``logps.safetensors`` (``[N, 5]`` float32 in ROLES order) and
``index.json`` (the record keys, :attr:`symmpo_fast.data.PreferenceBatch.record_keys`, content
hashes of every used role's token ids and image pixels; the records' ids, file and line, for
messages; a fingerprint of what produced them: the reference weights, the data set, the
objective and the collation settings; the size and sha256 of ``logps.safetensors`` and a sha256
of its own content, as a checkpoint's ``trainer_state.json``).  Opening a cache whose
fingerprint differs from the run's is refused with a message naming what changed; a record
whose key is missing (its text, image or tokenization changed) is refused too.

Opening verifies the cache before one step trains on it: the hashes (flipped bytes), the shape
(``[len(keys), 5]``, keys unique) and the values of the columns the objective uses, finite and
<= 0 (a log-prob; up to :data:`ROUNDING` above 0 for float rounding of a near-certain sequence):
one NaN row would otherwise skip every global batch it falls in, every epoch, and the run
would end with exit 0.  Every bad row is counted and the first ones named by their record.  A
cache written before the hashes existed is checked for its values and used with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ..images import RecordProblem, open_regular
from ..objectives import NUM_ROLES, ROLES

FILES = ("logps.safetensors", "index.json")
ROUNDING = 1e-3  # a positive log-prob beyond this is no rounding error
_FIX = "rerun `symmpo-fast precompute-ref` with the run's config (or train with --reference adapter or copy)"


def _self_hash(index: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in index.items() if k != "sha256"}, sort_keys=True).encode()
                          ).hexdigest()


def _read(path: Path) -> bytes:
    """A cache file's bytes; a FIFO or directory in its place is refused, not waited on."""
    try:
        with open_regular(path, "reference cache file") as fh:
            return fh.read()
    except (OSError, RecordProblem) as e:
        raise RuntimeError(f"the reference cache file {path} cannot be read ({e}): {_FIX}") from None


def cache_fingerprint(model_fingerprint: str, data_fingerprint: str, cfg) -> dict:
    """What the cached numbers depend on, besides each record's own content (in its key)."""
    objective = cfg.objective_config()
    return {"model": model_fingerprint, "data": data_fingerprint, "objective": cfg.objective,
            "average_logps": objective.average_logps, "max_length": cfg.max_length, "truncation": cfg.truncation,
            "crop_seed": cfg.seed, "prompt_format": cfg.prompt_format, "system_prompt": cfg.system_prompt}


def write_cache(directory: str | Path, keys: list[str], logps: torch.Tensor, fingerprint: dict,
                ids: list[str] | None = None) -> Path:
    """Write atomically: files go to a temporary name first, the index (which makes the cache valid) last.
    ``ids``: each row's record id (file and line), for messages."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if logps.shape != (len(keys), NUM_ROLES):
        raise ValueError(f"logps must be [{len(keys)}, {NUM_ROLES}], got {tuple(logps.shape)}")
    if ids is not None and len(ids) != len(keys):
        raise ValueError(f"{len(ids)} ids for {len(keys)} keys")
    tmp = d / "logps.safetensors.tmp"
    save_file({"logps": logps.float().contiguous().cpu()}, str(tmp))
    data = tmp.read_bytes()  # hashed as it reached the file system
    tmp.replace(d / "logps.safetensors")
    index = {"fingerprint": fingerprint, "keys": keys, "ids": ids,
             "logps": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    index["sha256"] = _self_hash(index)
    tmp = d / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(d / "index.json")
    return d


def _load_index(d: Path) -> dict:
    try:
        index = json.loads(_read(d / "index.json"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RuntimeError(f"the reference cache index {d / 'index.json'} does not read ({e}): {_FIX}") from None
    if not isinstance(index, dict) or not isinstance(index.get("keys"), list) \
            or not isinstance(index.get("fingerprint"), dict):
        raise RuntimeError(f"the reference cache index {d / 'index.json'} lacks its keys or fingerprint: {_FIX}")
    if "sha256" in index and index["sha256"] != _self_hash(index):
        raise RuntimeError(f"the reference cache index {d / 'index.json'} does not match its own hash (damaged or "
                           f"edited): {_FIX}")
    return index


def _load_logps(d: Path, index: dict) -> torch.Tensor:
    path = d / "logps.safetensors"
    data = _read(path)
    meta = index.get("logps")
    if meta is None:
        warnings.warn(f"the reference cache {d} was written before caches carried hashes: its values are checked, "
                      "its bytes cannot be verified", RuntimeWarning, stacklevel=3)
    elif len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise RuntimeError(f"the reference cache file {path} does not match the size and sha256 recorded when it was "
                           f"written (damaged): {_FIX}")
    try:
        logps = load(data)["logps"]
    except (SafetensorError, KeyError, ValueError) as e:
        raise RuntimeError(f"the reference cache file {path} does not load ({e}): {_FIX}") from None
    n = len(index["keys"])
    if logps.dtype != torch.float32 or tuple(logps.shape) != (n, NUM_ROLES):
        raise RuntimeError(f"the reference cache file {path} holds {logps.dtype} {tuple(logps.shape)}, not float32 "
                           f"[{n}, {NUM_ROLES}] for its {n} keys: {_FIX}")
    if len(set(index["keys"])) != n:
        raise RuntimeError(f"the reference cache index {d / 'index.json'} repeats record keys: {_FIX}")
    return logps


def _check_values(d: Path, index: dict, logps: torch.Tensor, columns: tuple[int, ...]) -> None:
    """Finite and <= ROUNDING in every used column; raises naming the first bad records."""
    used = logps[:, list(columns)]  # [N, used]
    bad_cell = ~torch.isfinite(used) | (used > ROUNDING)
    rows = bad_cell.any(1).nonzero().flatten().tolist()
    if not rows:
        return
    ids = index.get("ids") or [f"key {k[:16]}..." for k in index["keys"]]

    def what(r: int) -> str:
        j = int(bad_cell[r].nonzero()[0])
        return f"row {r} ({ids[r]}): {ROLES[columns[j]]} is {used[r, j].item()!r}"

    shown = "; ".join(what(r) for r in rows[:5]) + (f"; and {len(rows) - 5} more" if len(rows) > 5 else "")
    raise RuntimeError(f"the reference cache {d} holds {len(rows)} record(s) whose reference log-probs are not finite "
                       f"numbers <= 0 ({shown}); a step would be skipped for each: {_FIX}, after fixing or removing "
                       "the records it names")


class ReferenceCache:
    """A verified cache (see the module docstring); ``columns``: the ones the run's objective uses."""

    def __init__(self, directory: str | Path, expected: dict, columns: tuple[int, ...] = tuple(range(NUM_ROLES))):
        d = Path(directory)
        if not all((d / f).exists() for f in FILES):
            raise FileNotFoundError(f"no reference cache in {d}: run `symmpo-fast precompute-ref` with the same "
                                    "config first (or use reference=adapter/copy)")
        index = _load_index(d)
        changed = [k for k in sorted(set(expected) | set(index["fingerprint"]))
                   if expected.get(k) != index["fingerprint"].get(k)]
        if changed:
            detail = ", ".join(f"{k}: cached {index['fingerprint'].get(k)!r} vs now {expected.get(k)!r}"
                               if k not in ("model", "data") else f"{k} changed" for k in changed)
            raise RuntimeError(f"the reference cache in {d} was computed for another setting ({detail}); "
                               "rerun `symmpo-fast precompute-ref` for this model and data")
        self.directory = d
        self.logps = _load_logps(d, index)
        _check_values(d, index, self.logps, columns)
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
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    step = cfg.micro_batch_size
    starts = list(range(0, len(dataset), step))[rank::world]
    for s in tqdm(starts, desc="reference", disable=rank != 0):
        indices = range(s, min(s + step, len(dataset)))
        batch = collator([dataset[i] for i in indices])
        if batch.num_records == 0:
            continue
        # Which records the rows are: all of them, or (a record dropped by truncation: the data
        # was not read with the run's checks) those whose own key the batch holds.
        kept = list(indices) if batch.num_dropped == 0 else [
            i for i in indices if set(collator([dataset[i]]).record_keys) & set(batch.record_keys)]
        ids += [str(dataset.records[i].get("id", i)) for i in kept]
        with autocast(device, dtype):
            logps = reference_logps(model, batch.to(device), cfg.packing, cfg.backend, average=average)
            rows.append(logps.float().cpu())
        keys += batch.record_keys
    logps = torch.cat(rows) if rows else torch.zeros(0, NUM_ROLES)
    parts = dist_utils.gather_to_rank0((keys, ids, logps.tolist()))
    out = Path(cfg.ref_cache or Path(cfg.output_dir) / "ref_cache")
    if rank == 0:
        # A duplicate record (kept by the reader, reported) has its first copy's key: one row each.
        first: dict[str, tuple[str, list[float]]] = {}
        for ks, part_ids, vs in parts:
            for k, i, v in zip(ks, part_ids, vs, strict=True):
                first.setdefault(k, (i, v))
        all_logps = torch.tensor([v for _, v in first.values()], dtype=torch.float32).reshape(-1, NUM_ROLES)
        write_cache(out, list(first), all_logps, cache_fingerprint(fingerprint, dataset.fingerprint(), cfg),
                    [i for i, _ in first.values()])
    dist_utils.barrier()
    return out
