"""Checkpoints that resume a run exactly, are verified before they are trusted, and never unpickle.

A checkpoint is a directory ``output_dir/checkpoints/step-00000100/`` holding

* ``model.safetensors``: the trainable parameters (the frozen ones come back from the base
  model), or under FSDP2 ``model-rank{r}.safetensors``, each process's own shards;
* ``optimizer[-rank{r}].safetensors`` + ``optimizer.json``: the optimizer's tensors and its
  scalar settings, keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s
  flattened form, so it does not depend on the order of the parameter list);
* ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json`` (torch, CUDA, Python and NumPy generators
  of every process);
* ``trainer_state.json``, written last: the step, the data position, the run's settings and
  data fingerprint, the size and sha256 of every other file, and a sha256 of its own content.

There is no scheduler state: the learning rate is a function of the step and the settings (see
:mod:`symmpo_fast.train.loop`), which is what lets a resumed run change ``max_steps``.

Everything is written into ``.tmp-step-...`` and renamed when complete, so a crash during a save
leaves the previous checkpoint whole; only the newest ``keep`` are kept.  On resume
:meth:`Checkpointer.choose` takes the newest checkpoint whose ``trainer_state.json`` reads and
matches its own hash and whose every file has the recorded size and hash (each process hashes
the files it reads itself, and the processes agree by an all-reduce); a damaged one (truncated,
a bad header, flipped bytes in the tensor data) is named in a warning and the next older one is
tried, so a requeued job does not crash on the same broken file at every restart.  Once the run's
checks have passed, the damaged ones are moved aside to ``damaged-step-...`` (:meth:`set_aside`):
kept for a post-mortem, but no longer counted among the ``keep`` newest, which would otherwise
delete intact checkpoints and keep a broken one.

A checkpoint written before checkpoints carried hashes (``trainer_state.json`` without
``files`` and ``sha256``) cannot be verified byte for byte: it is resumed with a warning when its
files are there, regular and readable (safetensors headers, JSON), and only the settings it
recorded are compared (:meth:`choose` gives them as ``settings`` with ``legacy``).  Names in
``checkpoints/`` that are not ours (``step-00000002.bak``) are ignored with a warning.

The sharded form (FSDP2) is read back by the same number of processes:
``torch.distributed.checkpoint``'s own format would reshard, but its metadata file is a pickle,
which this trainer never loads.  Under several nodes, ``output_dir`` must be on a file system
every node sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import distributed as dist_utils

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP = re.compile(r"step-(\d+)")
_OURS = re.compile(r"(\.tmp-|damaged-)?step-\d+(-\d+)?")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process's own data: a DTensor's local shard, copied to the CPU contiguous (safetensors needs it)."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.detach().to("cpu", copy=True).contiguous()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _self_hash(doc: dict) -> str:
    """Of trainer_state.json's content without its own hash: a flipped byte in it does not go unseen."""
    return hashlib.sha256(json.dumps({k: v for k, v in doc.items() if k != "sha256"}, sort_keys=True).encode()
                          ).hexdigest()


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"{path} cannot be loaded although it was verified: {e}") from None


class Checkpointer:
    """Saves, verifies and restores model, optimizer, RNG and trainer state; see the module docstring."""

    def __init__(self, output_dir: str | Path, keep: int = 2, sharded: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.sharded = sharded
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()

    # --- where -----------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (an interrupted save has no trainer_state.json); only
        ``step-N`` directories count, whatever else a person left in ``checkpoints/``."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP.fullmatch(p.name) and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name)[1]))

    def strangers(self) -> list[str]:
        """Names in ``checkpoints/`` that this trainer never writes (ignored)."""
        return sorted(p.name for p in self.root.iterdir() if not _OURS.fullmatch(p.name)) if self.root.is_dir() else []

    def set_aside(self, damaged: list[str]) -> list[Path]:
        """Rename damaged checkpoints to ``damaged-step-...`` (process 0; after the run's checks):
        kept to look at, never resumed, never counted among the ``keep`` newest."""
        moved = []
        if self.rank == 0:
            for path in map(Path, damaged):
                target, n = path.with_name(f"damaged-{path.name}"), 1
                while target.exists():  # damaged again after a resume saved the same step anew
                    n += 1
                    target = path.with_name(f"damaged-{path.name}-{n}")
                os.replace(path, target)
                moved.append(target)
        dist_utils.barrier()
        return moved

    def _suffix(self) -> str:
        return f"-rank{self.rank}" if self.sharded else ""

    def _reads(self) -> list[str]:
        """The files this process reads back (trainer_state.json aside)."""
        suffix = self._suffix()
        return [f"model{suffix}.safetensors", f"optimizer{suffix}.safetensors", "optimizer.json",
                f"rng-rank{self.rank}.safetensors", f"rng-rank{self.rank}.json"]

    # --- save ------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer, state: dict) -> Path:
        """``state``: what the loop needs back (JSON); step, layout and file hashes are added here."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()

        writer = self.sharded or self.rank == 0
        mine = []
        params = {n: _local(p) for n, p in trainable_state(model).items()}
        # Every process takes part: under FSDP2 gathering the state dict is collective.
        optim = get_optimizer_state_dict(model, optimizer, options=_FLAT)
        if writer:
            mine += [f"model{self._suffix()}.safetensors", f"optimizer{self._suffix()}.safetensors"]
            save_file(params, str(tmp / mine[-2]))
            tensors = {k: _local(v) for k, v in optim.items() if isinstance(v, torch.Tensor)}
            save_file(tensors, str(tmp / mine[-1]))
        if self.rank == 0:
            scalars = {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}
            _write_json(tmp / "optimizer.json", scalars)
            mine.append("optimizer.json")
        rng_tensors, rng_plain = _rng_state()
        save_file(rng_tensors, str(tmp / f"rng-rank{self.rank}.safetensors"))
        _write_json(tmp / f"rng-rank{self.rank}.json", rng_plain)
        mine += [f"rng-rank{self.rank}.safetensors", f"rng-rank{self.rank}.json"]
        # Each process hashes what it wrote (read back: what reached the file system).
        parts = dist_utils.gather_to_rank0({name: _describe(tmp / name) for name in mine})

        if self.rank == 0:
            doc = {**state, "step": step, "world_size": self.world, "sharded": self.sharded,
                   "files": {k: v for part in parts for k, v in sorted(part.items())}}
            doc["sha256"] = _self_hash(doc)
            _write_json(tmp / "trainer_state.json", doc)
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    # --- choose ----------------------------------------------------------------------------------
    def _verify(self, path: Path) -> tuple[dict | None, str | None]:
        """``(trainer state, None)`` when every file this process reads is as written, else ``(None, why)``."""
        try:
            doc = json.loads((path / "trainer_state.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            return None, f"trainer_state.json does not read: {e}"
        if isinstance(doc, dict) and "sha256" not in doc and "files" not in doc:
            return self._verify_legacy(path, doc)
        if not isinstance(doc, dict) or doc.get("sha256") != _self_hash(doc):
            return None, "trainer_state.json does not match its own hash (damaged or edited)"
        files = doc.get("files")
        if not isinstance(files, dict):
            return None, "trainer_state.json lists no file hashes although it has its own hash (edited)"
        for name, meta in sorted(files.items()):
            f = path / name
            if not f.is_file():
                return None, f"{name} is missing"
            if f.stat().st_size != meta["bytes"]:
                return None, f"{name} has {f.stat().st_size} bytes where {meta['bytes']} were written"
        for name in self._reads():
            if name in files and _sha256(path / name) != files[name]["sha256"]:
                return None, f"{name} does not match the sha256 recorded when it was written"
        return doc, None

    def _verify_legacy(self, path: Path, doc: dict) -> tuple[dict | None, str | None]:
        """A checkpoint of the trainer before hashes: complete and readable is all that can be checked."""
        if isinstance(doc.get("step"), bool) or not isinstance(doc.get("step"), int):
            return None, "trainer_state.json has no step"
        # A DDP run resumed by more processes than wrote it reseeds the extra ones (see load).
        reads = [n for n in self._reads() if not (n.startswith("rng-") and self.rank >= doc.get("world_size", 1))]
        for name in reads:
            f = path / name
            if not f.is_file():
                return None, f"{name} is missing"
            try:
                if name.endswith(".safetensors"):
                    with safe_open(str(f), "pt") as st:  # the header and the data's extent, not its bytes
                        list(st.keys())
                else:
                    json.loads(f.read_text())
            except (OSError, SafetensorError, UnicodeDecodeError, ValueError, RecursionError) as e:
                return None, f"{name} does not read: {e}"
        try:
            settings = json.loads(doc.get("fingerprint") or "{}")  # the settings that old trainer compared
        except (TypeError, ValueError):
            settings = {}
        return {**doc, "settings": settings if isinstance(settings, dict) else {}, "data": None,
                "legacy": True}, None

    def choose(self) -> dict | None:
        """The trainer state of the newest intact checkpoint (``state["path"]``: where; ``state["damaged"]``:
        the newer ones found damaged, for :meth:`set_aside`), or None when there is no checkpoint;
        every process gets the same one.  Raises when every one is damaged."""
        if self.rank == 0 and self.strangers():
            warnings.warn(f"{self.root}: ignoring {', '.join(self.strangers())}, not checkpoints of this trainer",
                          RuntimeWarning, stacklevel=2)
        damaged, why = [], []
        for path in reversed(self.complete()):
            doc, problem = self._verify(path)
            # Every process must pick the same checkpoint: one damaged shard rules it out for all.
            flags = dist_utils.all_reduce_sum(torch.tensor([float(problem is not None)]))
            problems = [p for p in dist_utils.gather_to_rank0(problem) or [] if p]
            if not flags.item():
                if damaged and self.rank == 0:
                    aside = ", ".join(f"damaged-{Path(p).name}" for p in damaged)
                    warnings.warn(f"{'; '.join(why)}: resuming from the newest intact checkpoint, {path}; the damaged "
                                  f"one(s) are moved aside to {aside} once the run's checks have passed",
                                  RuntimeWarning, stacklevel=2)
                if doc.get("legacy") and self.rank == 0:
                    warnings.warn(f"checkpoint {path} was written before checkpoints carried hashes: its files are "
                                  "complete and readable but cannot be verified byte for byte, and only the settings "
                                  f"it recorded ({', '.join(sorted(doc['settings'])) or 'none'}) are compared; the "
                                  "records' content is not (their path and number are)",
                                  RuntimeWarning, stacklevel=2)
                self._check_layout(path, doc)
                return {**doc, "path": str(path), "damaged": damaged}
            damaged.append(str(path))
            why.append(f"checkpoint {path} is damaged ({'; '.join(problems) or 'another process found it so'})")
        if damaged:
            raise RuntimeError(f"{'; '.join(why)}; no intact checkpoint is left to resume from: pass --overwrite "
                               "to start over")
        return None

    def _check_layout(self, path: Path, state: dict) -> None:
        if state.get("sharded") and state.get("world_size") != self.world:
            raise RuntimeError(f"{path} was written by {state['world_size']} processes under FSDP and is read by "
                               f"{self.world}: resume with --nproc_per_node giving {state['world_size']} processes")
        if state.get("sharded", False) != self.sharded:
            raise RuntimeError(f"{path} was written {'with' if state.get('sharded') else 'without'} FSDP sharding; "
                               f"resume with the same --parallel setting")

    # --- load ------------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer) -> None:
        """Model, optimizer and RNG state of a checkpoint :meth:`choose` verified."""
        suffix = self._suffix()
        params = trainable_state(model)
        saved = _load(path / f"model{suffix}.safetensors")
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise RuntimeError(f"{path}: trainable parameters differ from the checkpoint's (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}): resume with the same model and finetune settings")
        with torch.no_grad():
            for name, p in params.items():
                target = p.to_local() if hasattr(p, "to_local") else p
                target.copy_(saved[name].to(target.dtype))

        tensors = _load(path / f"optimizer{suffix}.safetensors")
        scalars = json.loads((path / "optimizer.json").read_text())
        flat: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in scalars.items()}
        named = dict(model.named_parameters())
        for key, value in tensors.items():
            flat[key] = _as_param_layout(key, value, named)
        set_optimizer_state_dict(model, optimizer, flat, options=_FLAT)

        rng_file = path / f"rng-rank{self.rank}.safetensors"
        if rng_file.exists():  # a DDP run resumed by another number of processes reseeds the extra ranks
            _set_rng_state(_load(rng_file), json.loads((path / f"rng-rank{self.rank}.json").read_text()))


def _as_param_layout(key: str, value: torch.Tensor, named: dict[str, torch.Tensor]) -> torch.Tensor:
    """An optimizer tensor back on its parameter's device, as a DTensor where the parameter is one.

    Keys are ``state.<param fqn>.<name>``; per-parameter tensors (exp_avg, ...) share the
    parameter's sharding, scalars (step) are plain.
    """
    fqn = key[len("state."):].rsplit(".", 1)[0]
    param = named.get(fqn)
    if param is None:
        raise RuntimeError(f"optimizer state for unknown parameter {fqn!r}: resume with the same model")
    if value.dim() == 0:  # Adam's step: the optimizer places it (on the CPU unless capturable)
        return value
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())
    return value.to(param.device)
