"""The ``csrc`` backend's row ops: the C++/OpenMP (CPU) and CUDA kernels of ``symmpo_fast._C``.

Same signatures as :mod:`symmpo_fast._ops_torch` (the executable spec).  The kernels are
registered with ``torch.library`` as ``torch.ops.symmpo_fast.*`` (schemas in ``csrc/ops.cpp``);
the fake implementations below give ``torch.compile`` their output shapes, so a compiled
function calls them without a graph break.

This module is imported only when the ``csrc`` backend is picked (:func:`registry.row_ops`), and
raises with the build instructions when the extension is missing.

The kernels read fp32, bf16 and fp16 logits and compute in fp32.  float64 logits (a test's
truth dtype) go to the pure-PyTorch ops, which take any float dtype, so ``backend="auto"``
keeps working for them.
"""

from __future__ import annotations

import torch

from . import _ops_torch
from .objectives import NUM_ROLES, TERMS, ObjectiveConfig
from .registry import _csrc_module


def _load():
    mod, why = _csrc_module()
    if mod is None:
        raise ImportError(why)
    return mod


_C = _load()  # registers torch.ops.symmpo_fast.*
_ops = torch.ops.symmpo_fast


@torch.library.register_fake("symmpo_fast::lse_gather")
def _(logits, labels, softcap, inv_temp):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.register_fake("symmpo_fast::softmax_grad")
def _(logits, labels, lse, grad, softcap, inv_temp, out):
    return None


@torch.library.register_fake("symmpo_fast::segment_sum")
def _(values, segments, num_segments):
    return values.new_empty(num_segments, dtype=torch.float32)


@torch.library.register_fake("symmpo_fast::loss_pass")
def _(policy, ref, beta, dpo_weight, copo_weight, pair_weight, margin_weight, anchor_weight, anchor_delta,
      anchor_contrast):
    B = policy.shape[0]
    return policy.new_empty(B, len(TERMS), dtype=torch.float32), policy.new_empty(B, NUM_ROLES, dtype=torch.float32)


def lse_gather(logits, labels, softcap, inv_temp):
    # logits: [n, V] fp32/bf16/fp16; labels: [n] int64 with -1 for rows to skip -> (logp, lse) [n] fp32
    if logits.dtype == torch.float64:
        return _ops_torch.lse_gather(logits, labels, softcap, inv_temp)
    return _ops.lse_gather(logits, labels.long(), softcap, float(inv_temp))


def softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out):
    # out: [n, V], may be logits itself; gets d(sum_i grad_i * logp_i) / d logits in out's dtype
    if logits.dtype == torch.float64 or out.dtype == torch.float64:
        return _ops_torch.softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out)
    _ops.softmax_grad(logits, labels.long(), lse.float(), grad.float(), softcap, float(inv_temp), out)
    return out


def segment_sum(values, segments, num_segments):
    # values: [n] -> [num_segments] fp32 sums; segment -1 is skipped
    return _ops.segment_sum(values.float(), segments.long(), int(num_segments))


def loss_pass(policy, ref, cfg: ObjectiveConfig):
    # policy, ref: [B, 5] -> (terms [B, len(TERMS)], d sum_b weighted_total_b / d policy [B, 5]), fp32
    return _ops.loss_pass(policy.float(), ref.float(), cfg.beta, cfg.dpo_weight, cfg.copo_weight, cfg.pair_weight,
                          cfg.margin_weight, cfg.anchor_weight, cfg.anchor_delta, cfg.anchor_contrast)
