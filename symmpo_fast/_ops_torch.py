"""The ``torch`` backend's row ops: pure PyTorch on one chunk of rows at a time.

The driver hands these ops one chunk of logits, so the fp32 temporaries here are bounded by
the chunk, never [N, V].
"""

from __future__ import annotations

import torch

from .objectives import ObjectiveConfig, loss_pass_reference


def _transform(logits: torch.Tensor, softcap: float | None, inv_temp: float) -> torch.Tensor:
    z = logits.float()
    if inv_temp != 1.0:
        z = z * inv_temp
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def lse_gather(logits, labels, softcap, inv_temp):
    # logits: [n, V] any float dtype; labels: [n] int64 with -1 for rows to skip
    z = _transform(logits, softcap, inv_temp)
    lse = torch.logsumexp(z, dim=-1)
    V = z.shape[1]
    valid = (labels >= 0) & (labels < V)  # labels >= V lie in another vocabulary tile
    picked = z.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, picked - lse, torch.zeros_like(lse))
    return logp, lse


def softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out):
    # d logp_i / d z_iv = onehot - softmax; then chain through softcap and temperature.
    z = _transform(logits, softcap, inv_temp)
    valid = labels >= 0
    g = torch.where(valid, grad, torch.zeros_like(grad))
    dz = torch.exp(z - lse.unsqueeze(1)).mul_(-g.unsqueeze(1))
    here = labels < z.shape[1]  # the one-hot only where the label lies in this slice of the vocabulary
    dz.scatter_add_(1, torch.where(here, labels, 0).clamp(min=0).unsqueeze(1), torch.where(here, g, 0).unsqueeze(1))
    if softcap is not None:
        dz.mul_(1.0 - (z / softcap) ** 2)  # tanh' = 1 - tanh^2, and z / softcap = tanh(.)
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    out.copy_(dz)
    return out


def segment_sum(values, segments, num_segments):
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    keep = segments >= 0
    return out.index_add_(0, segments[keep], values[keep].float())


def loss_pass(policy, ref, cfg: ObjectiveConfig):
    return loss_pass_reference(policy.float(), ref.float(), cfg)
