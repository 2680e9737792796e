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
tried, so a requeued job does not crash on the same broken file at every restart.

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
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import distributed as dist_utils

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


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
        raise RuntimeError(f"{path} cannot be loaded although its hash matched: {e}") from None


class Checkpointer:
    """Saves, verifies and restores model, optimizer, RNG and trainer state; see the module docstring."""

    def __init__(self, output_dir: str | Path, keep: int = 2, sharded: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.sharded = sharded
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()

    # --- where -----------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (an interrupted save has no trainer_state.json)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

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
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return None, f"trainer_state.json does not read: {e}"
        if not isinstance(doc, dict) or doc.get("sha256") != _self_hash(doc):
            return None, "trainer_state.json does not match its own hash (damaged or edited)"
        files = doc.get("files")
        if not isinstance(files, dict):
            return None, "trainer_state.json lists no file hashes (written by an older symmpo-fast)"
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

    def choose(self) -> dict | None:
        """The trainer state of the newest intact checkpoint (``state["path"]``: where), or None when
        there is no checkpoint; every process gets the same one.  Raises when every one is damaged."""
        damaged = []
        for path in reversed(self.complete()):
            doc, problem = self._verify(path)
            # Every process must pick the same checkpoint: one damaged shard rules it out for all.
            flags = dist_utils.all_reduce_sum(torch.tensor([float(problem is not None)]))
            problems = [p for p in dist_utils.gather_to_rank0(problem) or [] if p]
            if not flags.item():
                if damaged and self.rank == 0:
                    warnings.warn(f"{'; '.join(damaged)}: resuming from the newest intact checkpoint, {path}",
                                  RuntimeWarning, stacklevel=2)
                self._check_layout(path, doc)
                return {**doc, "path": str(path)}
            damaged.append(f"checkpoint {path} is damaged ({'; '.join(problems) or 'another process found it so'})")
        if damaged:
            raise RuntimeError(f"{'; '.join(damaged)}; no intact checkpoint is left to resume from: pass --overwrite "
                               "to start over")
        return None

    def _check_layout(self, path: Path, state: dict) -> None:
        if state.get("sharded") and state["world_size"] != self.world:
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
