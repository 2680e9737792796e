"""Naive full-logits implementations: the oracle of the tests and the baseline of the benchmarks.

These materialise ``[N, V]`` logits and a ``[N, V]`` log-softmax exactly as the official SymMPO
and mDPO code do (logits -> log_softmax -> gather), so they are the "before" of every
comparison and, run in float64, the ground truth every backend is checked against.

:mod:`symmpo_fast.head` runs their forward with autocast off (the head decides its own
precision); their backward is plain autograd, which follows the autocast state it is called
under, so call ``backward`` outside autocast (as PyTorch recommends) for an fp32 backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .objectives import NUM_ROLES, ObjectiveConfig, preference_loss


def transform_logits(logits: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    """logits / temperature, then ``softcap * tanh(. / softcap)`` (Gemma-2 style) when set."""
    if temperature != 1.0:
        logits = logits / temperature
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def logits_token_logps_reference(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(label) from full logits: upcast, log_softmax over V, gather; 0 at ignore_index."""
    z = transform_logits(logits.float() if logits.dtype != torch.float64 else logits, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def token_logps_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, softcap: float | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """The naive head: ``F.linear`` to full [N, V] logits in the input dtype, then the above."""
    return logits_token_logps_reference(F.linear(hidden, weight, bias), labels, ignore_index, softcap, temperature)


def sequence_logps(
    token_logps: torch.Tensor, seq_index: torch.Tensor, num_records: int, average: bool = False
) -> torch.Tensor:
    """Per-sequence sums (or means) ``[B, 5]`` of token log-probs; ``seq_index`` is ``b * 5 + column`` or -1."""
    keep = seq_index >= 0
    idx = seq_index[keep]
    sums = token_logps.new_zeros(num_records * NUM_ROLES).index_add(0, idx, token_logps[keep])
    if average:
        counts = torch.bincount(idx, minlength=num_records * NUM_ROLES).to(sums.dtype)
        sums = sums / counts.clamp(min=1)
    return sums.view(num_records, NUM_ROLES)


def fused_preference_loss_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, seq_index: torch.Tensor,
    ref_logps: torch.Tensor, cfg: ObjectiveConfig, bias: torch.Tensor | None = None, ignore_index: int = -100,
    softcap: float | None = None, temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The composition the fused pass must equal: naive token log-probs -> per-sequence sums -> loss.

    Tokens whose label is ``ignore_index`` count neither in the sum nor in the mean's length.
    """
    logps = token_logps_reference(hidden, weight, labels, bias, ignore_index, softcap, temperature)
    seq = torch.where(labels != ignore_index, seq_index, torch.full_like(seq_index, -1))
    policy = sequence_logps(logps, seq, ref_logps.shape[0], cfg.average_logps)
    return preference_loss(policy, ref_logps.to(policy.dtype), cfg)
