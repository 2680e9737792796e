"""What every integration needs from a ``transformers`` model: its backbone's hidden states, its
LM head (gathered when sharded), the logit transform its config declares, the logit-based
per-token statistics trainers log, and the two passes built from them (the fused loss; the
reference's sequence log-probs), each meant to run as the model's forward
(:func:`~symmpo_fast.integrations.call_in_forward`).  No trainer library is imported here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..head import fused_preference_loss, token_logps
from ..models.base import LogitTransform
from ..head import no_autocast
from ..objectives import NUM_ROLES, ObjectiveConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def pretrained(module: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a peft shell (LoRA layers stay inside it)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def last_hidden_state(model: nn.Module, **model_kwargs: Any) -> torch.Tensor:
    """``[rows, T, D]`` final hidden states of a ``transformers`` causal or vision-language LM.

    Runs the backbone (``model.base_model``: ``LlamaModel``, ``LlavaModel``, ``Qwen2VLModel``, ...)
    without the LM head, so no ``[rows, T, V]`` logits are ever made.
    """
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__} exposes no backbone (base_model) to run without its LM head")
    hidden = getattr(backbone(**model_kwargs), "last_hidden_state", None)
    if hidden is None:
        raise TypeError(f"{type(backbone).__name__} returned no last_hidden_state")
    return hidden


GatherContext = Callable[..., contextlib.AbstractContextManager]


@contextlib.contextmanager
def output_head(model: nn.Module,
                gather: GatherContext | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(weight [V, D], bias [V] or None)`` of the model's LM head, whole, for the duration.

    ``gather(weight, bias)``: a context that materialises ZeRO-3 partitioned parameters (TRL's
    ``maybe_gather_lm_head_ctx``).  An FSDP2 head sharded as its own unit is a DTensor outside its
    forward: ``full_tensor`` all-gathers it, differentiably.  Read inside the root module's forward
    (see :func:`call_in_forward`), an FSDP2 root's head is already unsharded.
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}'s output embeddings ({type(head).__name__}) have no [V, D] weight "
                        "for the fused head to read")
    bias = getattr(head, "bias", None)
    with gather(weight, bias) if gather is not None else contextlib.nullcontext():
        if DTensor and isinstance(weight, DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
        yield weight, bias


STATS: tuple[str, ...] = ("logps", "entropy", "mean_logits", "is_top1")
"""Columns of :func:`token_stats`."""


def _stats_rows(vocab: int, device: torch.device) -> int:
    # Two fp32 [rows, V] buffers live at once (lse - z and p): 64 MiB on the CPU,
    # 1 GiB on CUDA, or SYMMPO_FAST_CHUNK_MB.
    mb = int(os.environ.get("SYMMPO_FAST_CHUNK_MB", 1024 if device.type == "cuda" else 64))
    return max(1, mb * 2**20 // (vocab * 4 * 2))


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                transform: LogitTransform) -> torch.Tensor:
    """``[n, 4]`` float32 per token, columns :data:`STATS`, without gradient and never ``[n, V]``.

    ``logps`` = log p(label); ``entropy`` = -sum_v p_v log p_v; ``mean_logits`` = mean_v z_v;
    ``is_top1`` = 1 when the label is the first argmax of z (TRL's tie rule, ``torch.argmax``'s
    too).  ``hidden [n, D]``, ``weight [V, D]``, ``labels [n]`` all real.  The logits come out of
    ``F.linear`` in the inputs' dtype (the passes below call it outside autocast, in the weight's
    dtype, as the fused head computes) and are upcast to fp32.  Costs one head forward, 2nDV FLOPs.
    """
    n, V = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, len(STATS), dtype=torch.float32, device=hidden.device)
    step = _stats_rows(V, hidden.device)
    for s in range(0, n, step):
        lab = labels[s : s + step].long()
        z = transform.apply(F.linear(hidden[s : s + step], weight, bias).float())  # [rows, V]
        lse = torch.logsumexp(z, dim=-1)
        out[s : s + step, 0] = z.gather(1, lab.unsqueeze(1)).squeeze(1) - lse
        out[s : s + step, 2] = z.mean(dim=-1)
        out[s : s + step, 3] = (z.argmax(dim=-1) == lab).float()
        # Entropy as sum_v p_v * (lse - z_v): non-negative terms.  lse - sum_v p_v z_v (TRL's form)
        # cancels two numbers near max z: 2e-5 absolute error at entropy 0.005, against 1e-6 here.
        neg_logp = z.neg_().add_(lse.unsqueeze(1))  # in place: z is done with
        out[s : s + step, 1] = torch.exp(-neg_logp).mul_(neg_logp).sum(dim=-1)
        del z, neg_logp
    return out


def segment_sums(values: torch.Tensor, seq_index: torch.Tensor, n_seq: int) -> torch.Tensor:
    """``[n_seq, ...]`` sums of ``values [n, ...]`` by ``seq_index [n]`` (all in ``[0, n_seq)``)."""
    out = values.new_zeros((n_seq, *values.shape[1:]))
    return out.index_add_(0, seq_index, values)


Select = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``hidden [rows, T, D]`` -> ``(h [n, D], labels [n], seq_index [n])`` of the tokens that go through the head."""


def fused_loss_pass(net: nn.Module, select: Select, ref_logps: torch.Tensor, cfg: ObjectiveConfig, backend: str,
                    stats: bool, gather: GatherContext | None = None, **model_kwargs: Any):
    """Backbone -> :func:`symmpo_fast.fused_preference_loss`: ``(loss, metrics, per_seq)``.

    ``per_seq``: ``[B, 5, len(STATS)]`` sums of :func:`token_stats` per sequence when ``stats``,
    else None.  ``ref_logps [B, 5]`` reduced like ``cfg.average_logps``.
    """
    h, labels, seg = select(last_hidden_state(net, **model_kwargs))
    transform = LogitTransform.from_config(net.config)
    B = ref_logps.shape[0]
    with output_head(net, gather) as (weight, bias), no_autocast(h.device):
        h = h.to(weight.dtype)
        loss, metrics = fused_preference_loss(h, weight, labels, seg, ref_logps, cfg, backend=backend, bias=bias,
                                              **transform.head_kwargs)
        per_seq = None
        if stats:
            per_token = token_stats(h.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
                                    transform)
            per_seq = segment_sums(per_token, seg, B * NUM_ROLES).view(B, NUM_ROLES, -1)
    return loss, metrics, per_seq


def sequence_logps_pass(net: nn.Module, select: Select, records: int, backend: str,
                        gather: GatherContext | None = None, **model_kwargs: Any) -> torch.Tensor:
    """Backbone -> ``[records, 5]`` summed log-probs per sequence by :func:`symmpo_fast.token_logps`."""
    h, labels, seg = select(last_hidden_state(net, **model_kwargs))
    transform = LogitTransform.from_config(net.config)
    with output_head(net, gather) as (weight, bias), no_autocast(h.device):
        lp = token_logps(h.to(weight.dtype), weight, labels, bias=bias, backend=backend, **transform.head_kwargs)
    return segment_sums(lp, seg, records * NUM_ROLES).view(records, NUM_ROLES)
