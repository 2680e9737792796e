"""``nn.Module`` wrappers of the fused ops, for trainers that shard or wrap their model.

Under FSDP2 (``fully_shard``) a parameter is only unsharded inside the forward of the module it
was sharded with: reading ``model.lm_head.weight`` from outside that forward sees a shard (a
DTensor), not the [V, D] weight.  These modules take the LM head as a submodule and read its
weight inside their own ``forward``, so wrapping them (or a module that calls them from its
forward) with ``fully_shard`` unshards the head exactly when the fused pass needs it, and the
weight gradient the pass returns flows into FSDP's reduce-scatter like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from .head import fused_preference_loss, token_logps
from .objectives import ObjectiveConfig


class _HeadOptions(nn.Module):
    def __init__(self, lm_head: nn.Linear, backend: str, softcap: float | None, temperature: float, ignore_index: int):
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear, got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.backend, self.softcap, self.temperature, self.ignore_index = backend, softcap, temperature, ignore_index

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, softcap={self.softcap}, temperature={self.temperature}"


class TokenLogps(_HeadOptions):
    """``forward(hidden [..., D], labels [...]) -> [...]`` float32 log p(label), never [N, V]."""

    def __init__(self, lm_head: nn.Linear, backend: str = "auto", softcap: float | None = None,
                 temperature: float = 1.0, ignore_index: int = -100):
        super().__init__(lm_head, backend, softcap, temperature, ignore_index)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_logps(hidden, self.lm_head.weight, labels, bias=self.lm_head.bias, ignore_index=self.ignore_index,
                           softcap=self.softcap, temperature=self.temperature, backend=self.backend)


class FusedPreferenceLoss(_HeadOptions):
    """``forward(hidden [N, D], labels [N], seq_index [N], ref_logps [B, 5]) -> (loss, metrics)``.

    The module form of :func:`symmpo_fast.fused_preference_loss` with the objective fixed.
    """

    def __init__(self, lm_head: nn.Linear, cfg: ObjectiveConfig, backend: str = "auto", softcap: float | None = None,
                 temperature: float = 1.0, ignore_index: int = -100):
        super().__init__(lm_head, backend, softcap, temperature, ignore_index)
        self.cfg = cfg

    def forward(self, hidden, labels, seq_index, ref_logps):
        return fused_preference_loss(hidden, self.lm_head.weight, labels, seq_index, ref_logps, self.cfg,
                                     backend=self.backend, bias=self.lm_head.bias, ignore_index=self.ignore_index,
                                     softcap=self.softcap, temperature=self.temperature)
