"""Preference objectives over five sequence log-probs per record: DPO, mDPO and SymMPO.

Every objective is a function of ``policy_logps`` and ``ref_logps``, both ``[B, 5]``, in the
column order of :data:`ROLES` (the official SymMPO code's order).  With the log-ratio
``lr_k = policy_k - ref_k`` and the reward ``r_k = beta * lr_k``, the loss of one record is::

    dpo_weight    * -logsig(r_0 - r_1)                          # DPO: y_w > y_l | m
  + copo_weight   * -logsig(r_0 - r_3)                          # mDPO CoPO: y_w|m > y_w|m_l
  + pair_weight   * (-logsig(r_0 - r_2) - logsig(r_4 - r_3))    # SymMPO: y_w > y_w'|m, y_w' > y_w|m'
  + margin_weight * ((lr_0 - lr_2) - (lr_4 - lr_3))**2          # SymMPO margin consistency (unscaled)
  + anchor_weight * (-logsig(r_0 - delta) [- logsig(r_4 - delta) if anchor_contrast])

and the loss is the mean over records.  SymMPO: Liu et al., NeurIPS 2025
(https://arxiv.org/abs/2506.11712); mDPO: Wang et al., EMNLP 2024
(https://arxiv.org/abs/2406.11839).

This module is the pure-PyTorch reference: float64-capable, differentiable with autograd, the
oracle of every backend's loss pass and the fallback of the ``torch`` backend.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROLES: tuple[str, ...] = ("chosen", "rejected", "pair_rejected", "contrast_rejected", "contrast_chosen")
CHOSEN, REJECTED, PAIR_REJECTED, CONTRAST_REJECTED, CONTRAST_CHOSEN = range(5)
NUM_ROLES = len(ROLES)

# Column order of the per-record term tensor that every loss pass (reference, Triton, C++, CUDA)
# returns: unweighted values, one column per term.
TERMS: tuple[str, ...] = ("dpo", "copo", "pair", "margin", "anchor")

# Preference pairs logged as accuracy / margin metrics: name -> (winner column, loser column).
PAIRS: dict[str, tuple[int, int]] = {
    "dpo": (CHOSEN, REJECTED),
    "copo": (CHOSEN, CONTRAST_REJECTED),
    "pair_m": (CHOSEN, PAIR_REJECTED),
    "pair_contrast": (CONTRAST_CHOSEN, CONTRAST_REJECTED),
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights of the preference objective; the presets reproduce the official code.

    Reference log-probs passed with ``average_logps=True`` must be averaged the same way.
    """

    beta: float = 0.1
    """Reward scale: r(m, y) = beta * log(pi_theta(y|m,x) / pi_ref(y|m,x))."""
    dpo_weight: float = 1.0
    """Weight of DPO(y_w > y_l | m)."""
    copo_weight: float = 0.0
    """Weight of mDPO's conditional term CoPO(y_w|m > y_w|m_l); m_l sits in column 3."""
    pair_weight: float = 0.0
    """SymMPO lambda: weight of Pair(y_w > y_w' | m) + Pair(y_w' > y_w | m')."""
    margin_weight: float = 0.0
    """SymMPO gamma: weight of (Delta(m; y_w, y_w') - Delta(m'; y_w', y_w))^2, Delta without beta."""
    anchor_weight: float = 0.0
    """eta: weight of the anchor -logsig(r(m, y_w) - delta)."""
    anchor_delta: float = 0.0
    """delta: the anchor's reward threshold."""
    anchor_contrast: bool = False
    """Also anchor y_w' given m' (SymMPO), not only y_w given m."""
    average_logps: bool = False
    """Sequence log-prob as the mean over response tokens instead of the sum."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise TypeError(f"ObjectiveConfig.{f.name} must be a bool, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"ObjectiveConfig.{f.name} must be a finite number, got {v!r}")
            if f.name.endswith("_weight") and v < 0:
                raise ValueError(f"ObjectiveConfig.{f.name} must be >= 0, got {v}")
        if self.beta <= 0:
            raise ValueError(f"ObjectiveConfig.beta must be > 0, got {self.beta}")
        if not self.used_columns:
            raise ValueError("ObjectiveConfig has every weight at 0: there is nothing to optimise")

    @classmethod
    def symmpo(cls, **overrides) -> "ObjectiveConfig":
        """SymMPO as in the official code: beta 0.1, lambda 0.5, gamma 1e-4, eta 1 on y_w|m and y_w'|m'."""
        kw = dict(beta=0.1, pair_weight=0.5, margin_weight=1e-4, anchor_weight=1.0, anchor_contrast=True)
        return cls(**{**kw, **overrides})

    @classmethod
    def mdpo(cls, **overrides) -> "ObjectiveConfig":
        """mDPO as in the official code: DPO + CoPO + anchor on y_w|m, beta 0.1, delta 0."""
        kw = dict(beta=0.1, copo_weight=1.0, anchor_weight=1.0)
        return cls(**{**kw, **overrides})

    @classmethod
    def dpo(cls, **overrides) -> "ObjectiveConfig":
        """Plain DPO, beta 0.1."""
        return cls(**{"beta": 0.1, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "ObjectiveConfig":
        if name not in ("symmpo", "mdpo", "dpo"):
            raise ValueError(f"unknown objective {name!r}; expected one of 'symmpo', 'mdpo', 'dpo'")
        return getattr(cls, name)(**overrides)

    @property
    def weights(self) -> tuple[float, ...]:
        """Term weights in :data:`TERMS` order."""
        return (self.dpo_weight, self.copo_weight, self.pair_weight, self.margin_weight, self.anchor_weight)

    @property
    def used_columns(self) -> tuple[int, ...]:
        """Role columns the objective reads; the others are never computed."""
        cols: set[int] = set()
        if self.dpo_weight:
            cols |= {CHOSEN, REJECTED}
        if self.copo_weight:
            cols |= {CHOSEN, CONTRAST_REJECTED}
        if self.pair_weight or self.margin_weight:
            cols |= {CHOSEN, PAIR_REJECTED, CONTRAST_REJECTED, CONTRAST_CHOSEN}
        if self.anchor_weight:
            cols |= {CHOSEN} | ({CONTRAST_CHOSEN} if self.anchor_contrast else set())
        return tuple(sorted(cols))

    @property
    def used_pairs(self) -> tuple[str, ...]:
        cols = set(self.used_columns)
        return tuple(p for p, (w, l) in PAIRS.items() if w in cols and l in cols and self._pair_in_use(p))

    def _pair_in_use(self, pair: str) -> bool:
        if pair == "dpo":
            return bool(self.dpo_weight)
        if pair == "copo":
            return bool(self.copo_weight)
        return bool(self.pair_weight or self.margin_weight)


def _check_logps(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
    if policy_logps.dim() != 2 or policy_logps.shape[1] != NUM_ROLES:
        raise ValueError(f"policy_logps must be [B, {NUM_ROLES}] in ROLES order, got {tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps must have policy_logps' shape {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}")
    if policy_logps.shape[0] == 0:
        raise ValueError("preference_loss needs at least one record")


def preference_terms(policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Unweighted per-record loss terms ``[B, len(TERMS)]``; unused terms are 0.

    Only the columns ``cfg.used_columns`` are read, so NaN in an unused column never leaks.
    """
    _check_logps(policy_logps, ref_logps)
    B = policy_logps.shape[0]
    lr = {k: policy_logps[:, k] - ref_logps[:, k] for k in cfg.used_columns}  # log-ratios, [B] each
    r = {k: cfg.beta * v for k, v in lr.items()}
    zero = policy_logps.new_zeros(B)
    terms = [zero] * len(TERMS)
    if cfg.dpo_weight:
        terms[0] = -F.logsigmoid(r[CHOSEN] - r[REJECTED])
    if cfg.copo_weight:
        terms[1] = -F.logsigmoid(r[CHOSEN] - r[CONTRAST_REJECTED])
    if cfg.pair_weight:
        terms[2] = -F.logsigmoid(r[CHOSEN] - r[PAIR_REJECTED]) - F.logsigmoid(r[CONTRAST_CHOSEN] - r[CONTRAST_REJECTED])
    if cfg.margin_weight:
        delta_m = lr[CHOSEN] - lr[PAIR_REJECTED]
        delta_m_contrast = lr[CONTRAST_CHOSEN] - lr[CONTRAST_REJECTED]
        terms[3] = (delta_m - delta_m_contrast) ** 2
    if cfg.anchor_weight:
        anchor = -F.logsigmoid(r[CHOSEN] - cfg.anchor_delta)
        if cfg.anchor_contrast:
            anchor = anchor - F.logsigmoid(r[CONTRAST_CHOSEN] - cfg.anchor_delta)
        terms[4] = anchor
    return torch.stack(terms, dim=1)


def weighted_total(terms: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Per-record weighted loss ``[B]`` from the ``[B, len(TERMS)]`` term tensor."""
    w = torch.tensor(cfg.weights, dtype=terms.dtype, device=terms.device)
    return terms @ w


@torch.no_grad()
def preference_metrics(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, terms: torch.Tensor, cfg: ObjectiveConfig
) -> dict[str, torch.Tensor]:
    """Metrics as TRL and the official code log them: 0-dim detached tensors, means over records.

    ``loss/<term>`` (unweighted), ``rewards/<role>`` (beta * log-ratio), ``logps/<role>`` (policy),
    and for each preference pair ``accuracy/<pair>`` (winner's reward > loser's) and
    ``margin/<pair>`` (winner's reward - loser's).  Nothing here syncs with the host.
    """
    cols = cfg.used_columns
    out: dict[str, torch.Tensor] = {}
    for i, (name, w) in enumerate(zip(TERMS, cfg.weights)):
        if w:
            out[f"loss/{name}"] = terms[:, i].float().mean()
    rewards = {k: cfg.beta * (policy_logps[:, k].float() - ref_logps[:, k].float()) for k in cols}
    for k in cols:
        out[f"rewards/{ROLES[k]}"] = rewards[k].mean()
        out[f"logps/{ROLES[k]}"] = policy_logps[:, k].float().mean()
    for pair in cfg.used_pairs:
        w, l = PAIRS[pair]
        out[f"accuracy/{pair}"] = (rewards[w] > rewards[l]).float().mean()
        out[f"margin/{pair}"] = (rewards[w] - rewards[l]).mean()
    return out


def preference_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss, metrics`` from ``[B, 5]`` sequence log-probs of the policy and the reference.

    Differentiable in both inputs (the reference usually carries no grad).  See the module
    docstring for the formula.  ``loss`` is the mean of the weighted per-record terms.
    """
    terms = preference_terms(policy_logps, ref_logps, cfg)
    loss = weighted_total(terms, cfg).mean()
    metrics = preference_metrics(policy_logps.detach(), ref_logps.detach(), terms.detach(), cfg)
    metrics["loss"] = loss.detach()
    return loss, metrics


def loss_pass_reference(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss pass every backend implements: ``terms [B, T]`` and ``d sum_b total_b / d policy [B, 5]``.

    Computed with autograd on :func:`preference_terms`, so the closed forms of the Triton, C++
    and CUDA passes are checked against the same math the reference loss uses.  Columns the
    objective does not read get a zero gradient.
    """
    with torch.enable_grad():
        pol = policy_logps.detach().requires_grad_(True)
        terms = preference_terms(pol, ref_logps.detach(), cfg)
        (grad,) = torch.autograd.grad(weighted_total(terms, cfg).sum(), pol)
    return terms.detach(), grad
