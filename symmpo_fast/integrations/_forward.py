"""Run a loss function as the forward of a wrapped model, so that the wrapper sees it.

DDP all-reduces gradients only for a forward that went through ``DistributedDataParallel.forward``
(it arms the reducer there); FSDP2 and DeepSpeed ZeRO-3 unshard a module's parameters in hooks
around that module's ``__call__``.  A trainer that calls the backbone and the fused head from
outside (``model.module.model(...)`` then ``sf.fused_preference_loss``) trains each replica on its
own batch without a word: the gradients are never reduced.

:func:`call_in_forward` swaps the inner module's ``forward`` for the loss function for the
duration of one call of the wrapper, as PyTorch Lightning's and TRL's forward redirection do,
so every hook and the reducer run exactly as for an ordinary forward.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

# Wrappers whose forward calls ``self.module(...)``; FSDP2 (``fully_shard``) wraps nothing: the
# module is its own wrapper.
_WRAPPER_NAMES = ("DeepSpeedEngine", "FullyShardedDataParallel")


def inner_module(model: nn.Module) -> nn.Module:
    """The module a DDP / FSDP1 / DeepSpeed wrapper calls; ``model`` itself for anything else."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in _WRAPPER_NAMES:
        return model.module
    return model


def call_in_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run as the forward of the module ``model`` wraps, by calling ``model``.

    ``model`` is what the trainer was handed (DDP, FSDP2, DeepSpeed, or a bare module); its
    pre-forward work (DDP's reducer, FSDP's unshard, input casts) happens before ``fn`` and its
    post-forward work on ``fn``'s result.  Pass tensors through ``args`` / ``kwargs`` (the
    wrapper may move them to the device) and bind everything else into ``fn``.  The module's own
    ``forward`` is restored before ``fn`` runs, so ``fn`` may call it.
    """
    inner = inner_module(model)
    # An instance attribute (TRL's fused head patches one onto the model) is put back as it was;
    # without one, the class's forward shows through again once ours is deleted.
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")

    def restore() -> None:
        if had_own:
            inner.forward = own
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*a: Any, **k: Any) -> Any:
        restore()
        return fn(*a, **k)

    inner.forward = redirected
    try:
        return model(*args, **kwargs)
    finally:
        restore()

