"""torchrun, FSDP2 and DDP: process group set-up, wrapping, and the few collectives the loop needs.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is NCCL on CUDA and gloo on the CPU.
FSDP2 follows torchtitan's order: ``fully_shard`` on every decoder block of the language model,
on the vision tower as one unit (one group of its children), then on the root, the module whose ``forward`` computes the
loss, so that the root's parameters (embeddings, LM head) are unsharded exactly while the fused
head reads them.  Without torchrun every helper here is a no-op on one process.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init(device: str = "auto") -> torch.device:
    """Start the process group under torchrun and return this process's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (gloo and NCCL both; a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------
# wrapping


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder blocks (e.g. ``LlamaDecoderLayer``), whatever wraps them (peft)."""
    blocks = [m for n, m in model.named_modules()
              if type(m).__name__.endswith("DecoderLayer") and "vision" not in n]
    if not blocks:
        raise RuntimeError(f"found no decoder blocks in {type(model).__name__} to shard")
    return blocks


def shard_fsdp(root: nn.Module, model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over all processes: each decoder block, the vision tower, then ``root`` (which holds ``model``).

    ``param_dtype`` (e.g. bfloat16) is the dtype parameters are gathered in for compute; the
    sharded parameters, the optimizer and the gradient reduction stay in their own dtype (fp32).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for block in decoder_blocks(model):
        fully_shard(block, **kw)
    from ..models import adapter_for

    tower = adapter_for(model).vision_tower
    if tower is not None:
        # One unit, but made of the tower's children: fully_shard swaps the class of the module it
        # wraps, and transformers (5.x) looks the tower's output-capture rules up by class name,
        # so a wrapped CLIPVisionModel would stop returning the hidden states LLaVA selects from.
        fully_shard(list(tower.children()), **kw)
    fully_shard(root, **kw)
    return root


def wrap_ddp(root: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Columns an objective does not use leave no parameter unused: every step reaches every
    # trainable weight, so the unused-parameter search (a full graph walk) stays off.
    return DistributedDataParallel(root, device_ids=ids)


def gather_to_rank0(obj) -> list:
    """Every process's ``obj`` in rank order on process 0 (``[obj]`` on one process), None elsewhere.

    Objects travel pickled between the processes of one job; nothing read from disk is unpickled.
    """
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
