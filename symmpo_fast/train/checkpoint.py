"""Checkpoints that resume a run exactly and never unpickle anything.

A checkpoint is a directory ``output_dir/checkpoints/step-00000100/`` holding

* ``model.safetensors``: the trainable parameters (the frozen ones come back from the base
  model), or under FSDP2 ``model-rank{r}.safetensors``, each process's own shards;
* ``optimizer[-rank{r}].safetensors`` + ``optimizer.json``: the optimizer's tensors and its
  scalar settings, keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s
  flattened form, so it does not depend on the order of the parameter list);
* ``scheduler.json``, ``rng-rank{r}.safetensors`` + ``rng-rank{r}.json`` (torch, CUDA, Python
  and NumPy generators of every process);
* ``trainer_state.json``: step, data position, config fingerprint, written last.

Everything is written into ``.tmp-step-...`` and renamed when complete, so a crash during a save
leaves the previous checkpoint whole; only the newest ``keep`` are kept.  The sharded form
(FSDP2) is read back by the same number of processes: ``torch.distributed.checkpoint``'s own
format would reshard, but its metadata file is a pickle, which this trainer never loads.
Under several nodes, ``output_dir`` must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
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


class Checkpointer:
    """Saves and restores model, optimizer, scheduler, RNG and trainer state; see the module docstring."""

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

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def _suffix(self) -> str:
        return f"-rank{self.rank}" if self.sharded else ""

    # --- save ------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()

        writer = self.sharded or self.rank == 0
        params = {n: _local(p) for n, p in trainable_state(model).items()}
        # Every process takes part: under FSDP2 gathering the state dict is collective.
        optim = get_optimizer_state_dict(model, optimizer, options=_FLAT)
        if writer:
            save_file(params, str(tmp / f"model{self._suffix()}.safetensors"))
            tensors = {k: _local(v) for k, v in optim.items() if isinstance(v, torch.Tensor)}
            save_file(tensors, str(tmp / f"optimizer{self._suffix()}.safetensors"))
        if self.rank == 0:
            scalars = {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}
            _write_json(tmp / "optimizer.json", scalars)
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
        rng_tensors, rng_plain = _rng_state()
        save_file(rng_tensors, str(tmp / f"rng-rank{self.rank}.safetensors"))
        _write_json(tmp / f"rng-rank{self.rank}.json", rng_plain)
        dist_utils.barrier()

        if self.rank == 0:
            _write_json(tmp / "trainer_state.json",
                        {**state, "step": step, "world_size": self.world, "sharded": self.sharded})
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    # --- load ------------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("sharded") and state["world_size"] != self.world:
            raise RuntimeError(f"{path} was written by {state['world_size']} processes under FSDP and is read by "
                               f"{self.world}: resume with --nproc_per_node giving {state['world_size']} processes")
        if state.get("sharded", False) != self.sharded:
            raise RuntimeError(f"{path} was written {'with' if state.get('sharded') else 'without'} FSDP sharding; "
                               f"resume with the same --parallel setting")
        suffix = self._suffix()
        params = trainable_state(model)
        saved = load_file(str(path / f"model{suffix}.safetensors"))
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise RuntimeError(f"{path}: trainable parameters differ from the checkpoint's (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}): resume with the same model and finetune settings")
        with torch.no_grad():
            for name, p in params.items():
                target = p.to_local() if hasattr(p, "to_local") else p
                target.copy_(saved[name].to(target.dtype))

        tensors = load_file(str(path / f"optimizer{suffix}.safetensors"))
        scalars = json.loads((path / "optimizer.json").read_text())
        flat: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in scalars.items()}
        named = dict(model.named_parameters())
        for key, value in tensors.items():
            flat[key] = _as_param_layout(key, value, named)
        set_optimizer_state_dict(model, optimizer, flat, options=_FLAT)
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))

        rng_file = path / f"rng-rank{self.rank}.safetensors"
        if rng_file.exists():  # a DDP run resumed by another number of processes reseeds the extra ranks
            _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-rank{self.rank}.json").read_text()))
        return state


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
