"""The ``triton`` backend's row ops: launch wrappers around :mod:`symmpo_fast.kernels`.

Same signatures and results as :mod:`symmpo_fast._ops_torch` (the spec).  On CUDA the head
kernels are autotuned over a short list of tile sizes, keyed on the vocabulary size, the
softcap switch and (Triton adds them) the tensors' dtypes; under ``TRITON_INTERPRET=1`` (the
CPU test path) a single configuration is used, since benchmarking configs there needs a
``do_bench`` the interpreter lacks.  The CUDA choices (:data:`GPU_HEAD_CONFIGS` and the block
sizes of the loss kernels) are what ``tests/test_aot_triton.py`` compiles for sm_80 and sm_90
without a GPU.
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

# The head kernels are memory-bound streams over a row; these cover small to 256k vocabularies.
GPU_HEAD_CONFIGS = [
    triton.Config({"BLOCK_V": 2048}, num_warps=8),
    triton.Config({"BLOCK_V": 4096}, num_warps=8),
    triton.Config({"BLOCK_V": 8192}, num_warps=16),
]
GPU_SEGMENT_BLOCK, GPU_LOSS_BLOCK = 1024, 128
if _INTERPRET:
    # 512 splits the tests' V = 1001 into a full and a partial tile, exercising the online rescale.
    HEAD_CONFIGS = [triton.Config({"BLOCK_V": 512})]
    SEGMENT_BLOCK, LOSS_BLOCK = 128, 64
else:
    HEAD_CONFIGS = GPU_HEAD_CONFIGS
    SEGMENT_BLOCK, LOSS_BLOCK = GPU_SEGMENT_BLOCK, GPU_LOSS_BLOCK

_HEAD_KEY = ["V", "HAS_SOFTCAP"]
_lse_gather = triton.autotune(HEAD_CONFIGS, key=_HEAD_KEY)(lse_gather_kernel)
# No restore_value: out may alias the logits, so every tuning trial would have to clone the
# chunk (1 GiB) and copy it back.  The first call of a key tunes on a scratch slice instead
# (_tune_softmax_grad), whose output is thrown away.
_softmax_grad = triton.autotune(HEAD_CONFIGS, key=_HEAD_KEY)(softmax_grad_kernel)
_TUNE_BYTES = 256 * 2**20
_tuned: set[tuple] = set()


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


def _launch_softmax_grad(x, labels, lse, grad, dst, softcap, inv_temp):
    _softmax_grad[(x.shape[0],)](
        x, labels, lse, grad, dst, x.shape[1], x.stride(0), dst.stride(0), float(softcap or 1.0), float(inv_temp),
        HAS_SOFTCAP=softcap is not None,
    )


def _tune_softmax_grad(x, labels, lse, grad, out_dtype, softcap, inv_temp):
    """Fill the autotuner's cache for this key from the first rows (at most 256 MiB of them,
    written to a scratch buffer), so that the call on the chunk itself, whose output may alias
    its input, runs one config once.  The slice keeps the key: V, HAS_SOFTCAP and the dtypes."""
    key = (x.shape[1], softcap is not None, x.dtype, out_dtype, x.device)
    if len(HEAD_CONFIGS) == 1 or key in _tuned:
        return
    rows = max(1, min(x.shape[0], _TUNE_BYTES // (x.shape[1] * max(x.element_size(), 4))))
    scratch = torch.empty((rows, x.shape[1]), dtype=out_dtype, device=x.device)
    _launch_softmax_grad(x[:rows], labels[:rows], lse[:rows], grad[:rows], scratch, softcap, inv_temp)
    _tuned.add(key)


def softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out):
    # logits: [n, V]; labels, lse, grad: [n]; out: [n, V], any float dtype, may alias logits.
    # out <- d(sum_i grad_i * logp_i) / d logits, stored in out's dtype (the conversion of fp32
    # logits' gradients to bf16 happens in the store, not in a separate pass)
    n, V = logits.shape
    if n == 0:
        return out
    x = _unit_cols(logits)
    dst = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    labels, lse, grad = labels.long().contiguous(), lse.float().contiguous(), grad.float().contiguous()
    with _device(x):
        _tune_softmax_grad(x, labels, lse, grad, dst.dtype, softcap, inv_temp)
        _launch_softmax_grad(x, labels, lse, grad, dst, softcap, inv_temp)
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
        segment_sum_kernel[(triton.cdiv(n, SEGMENT_BLOCK),)](
            values.contiguous(), segments.long().contiguous(), out, n, BLOCK=SEGMENT_BLOCK,
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
    with _device(pol):
        loss_pass_kernel[(triton.cdiv(B, LOSS_BLOCK),)](
            pol, rf, terms, grad, B,
            float(cfg.beta), float(cfg.dpo_weight), float(cfg.copo_weight), float(cfg.pair_weight),
            float(cfg.margin_weight), float(cfg.anchor_weight), float(cfg.anchor_delta),
            **loss_pass_switches(cfg), BLOCK_B=LOSS_BLOCK,
        )
    return terms, grad


def loss_pass_switches(cfg: ObjectiveConfig) -> dict[str, bool]:
    """The loss-pass kernel's constexpr switches for ``cfg``: one compiled variant per distinct set."""
    used = set(cfg.used_columns)
    return dict(DPO=bool(cfg.dpo_weight), COPO=bool(cfg.copo_weight), PAIR=bool(cfg.pair_weight),
                MARGIN=bool(cfg.margin_weight), ANCHOR=bool(cfg.anchor_weight), ANCHOR_CONTRAST=cfg.anchor_contrast,
                USE1=1 in used, USE2=2 in used, USE3=3 in used, USE4=4 in used)
