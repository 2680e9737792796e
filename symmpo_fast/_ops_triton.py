"""The ``triton`` backend's row ops: launch wrappers around :mod:`symmpo_fast.kernels`.

Same signatures and results as :mod:`symmpo_fast._ops_torch` (the spec).  On CUDA the head
kernels are autotuned over a short list of tile sizes; under ``TRITON_INTERPRET=1`` (the CPU
test path) a single configuration is used, since benchmarking configs there needs a
``do_bench`` the interpreter lacks.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from symmpo_fast.kernels.head import lse_gather_kernel, softmax_grad_kernel
from symmpo_fast.kernels.loss import loss_pass_kernel, segment_sum_kernel

from .objectives import ObjectiveConfig

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    # 512 splits the tests' V = 1001 into a full and a partial tile, exercising the online rescale.
    _HEAD_CONFIGS = [triton.Config({"BLOCK_V": 512})]
    _SEGMENT_BLOCK, _LOSS_BLOCK = 128, 64
else:
    # The head kernels are memory-bound streams over a row; these cover small to 256k vocabularies.
    _HEAD_CONFIGS = [
        triton.Config({"BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=8),
        triton.Config({"BLOCK_V": 8192}, num_warps=16),
    ]
    _SEGMENT_BLOCK, _LOSS_BLOCK = 1024, 128

_lse_gather = triton.autotune(_HEAD_CONFIGS, key=["V"])(lse_gather_kernel)
# Tuning runs the kernel once per config and out may alias the logits it reads: restore out
# after each trial (a copy of one chunk, once per vocabulary size).
_softmax_grad = triton.autotune(_HEAD_CONFIGS, key=["V"], restore_value=["out_ptr"])(softmax_grad_kernel)


def _device(t: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def lse_gather(logits, labels, softcap, inv_temp):
    # logits: [n, V] fp32/bf16/fp16; labels: [n] int64 with -1 for rows to skip
    # -> logp [n] f32 (0 on skipped rows), lse [n] f32
    n, V = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, lse
    x = _unit_cols(logits)
    with _device(x):
        _lse_gather[(n,)](
            x, labels.long().contiguous(), logp, lse, V, x.stride(0),
            float(softcap or 1.0), float(inv_temp), HAS_SOFTCAP=softcap is not None,
        )
    return logp, lse


def softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out):
    # logits: [n, V]; labels, lse, grad: [n]; out: [n, V], any float dtype, may alias logits.
    # out <- d(sum_i grad_i * logp_i) / d logits
    n, V = logits.shape
    if n == 0:
        return out
    x = _unit_cols(logits)
    dst = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    with _device(x):
        _softmax_grad[(n,)](
            x, labels.long().contiguous(), lse.float().contiguous(), grad.float().contiguous(), dst,
            V, x.stride(0), dst.stride(0), float(softcap or 1.0), float(inv_temp),
            HAS_SOFTCAP=softcap is not None,
        )
    if dst is not out:
        out.copy_(dst)
    return out


def segment_sum(values, segments, num_segments):
    # values: [n] float; segments: [n] int64 in [-1, num_segments) -> [num_segments] f32
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    n = values.numel()
    if n == 0 or num_segments == 0:
        return out
    with _device(values):
        segment_sum_kernel[(triton.cdiv(n, _SEGMENT_BLOCK),)](
            values.contiguous(), segments.long().contiguous(), out, n, BLOCK=_SEGMENT_BLOCK,
        )
    return out


def loss_pass(policy, ref, cfg: ObjectiveConfig):
    # policy, ref: [B, 5] -> terms [B, 5] f32 (objectives.TERMS order), grad [B, 5] f32
    pol = policy.float().contiguous()
    rf = ref.float().contiguous()
    B = pol.shape[0]
    terms = torch.empty((B, 5), dtype=torch.float32, device=pol.device)
    grad = torch.empty_like(terms)
    if B == 0:
        return terms, grad
    used = set(cfg.used_columns)
    with _device(pol):
        loss_pass_kernel[(triton.cdiv(B, _LOSS_BLOCK),)](
            pol, rf, terms, grad, B,
            float(cfg.beta), float(cfg.dpo_weight), float(cfg.copo_weight), float(cfg.pair_weight),
            float(cfg.margin_weight), float(cfg.anchor_weight), float(cfg.anchor_delta),
            DPO=bool(cfg.dpo_weight), COPO=bool(cfg.copo_weight), PAIR=bool(cfg.pair_weight),
            MARGIN=bool(cfg.margin_weight), ANCHOR=bool(cfg.anchor_weight), ANCHOR_CONTRAST=cfg.anchor_contrast,
            USE1=1 in used, USE2=2 in used, USE3=3 in used, USE4=4 in used, BLOCK_B=_LOSS_BLOCK,
        )
    return terms, grad
