"""What users would run instead of symmpo-fast, written as the benchmarks call it.

* TRL-style: full logits on concatenated rows, then a selective log-softmax that walks the batch
  one row at a time (TRL's way of bounding the log-softmax temporaries; the [rows, T, V] logits
  are still held whole).
* liger-kernel: ``LigerFusedLinearDPOLoss`` (chunked PyTorch under ``torch.compile``; runs on the
  CPU too) and, for token log-probs, ``LigerFusedLinearCrossEntropyLoss(reduction="none")``
  (Triton: CUDA only).
* cut-cross-entropy: ``linear_cross_entropy(..., reduction="none")`` read as ``-log p(label)``;
  its ``cce`` implementation is Triton (CUDA only), its ``torch_compile`` one is full logits
  compiled and runs on the CPU.

Neither liger-kernel nor cut-cross-entropy is a dependency of symmpo-fast: each wrapper raises
:class:`symmpo_fast.bench.Unavailable` with the reason when its package or device is missing.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from symmpo_fast.bench import Unavailable


def _need(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure makes the baseline unavailable
        raise Unavailable(f"{pip_name} not importable ({e.__class__.__name__}); pip install {pip_name}") from e


def _need_cuda(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise Unavailable(f"{what} needs CUDA (Triton GPU kernels)")


# ----------------------------------------------------------------------------------------------
# TRL-style selective log-softmax


def trl_selective_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) from full logits ``[R, T, V]``, one row of the batch at a time, as TRL does.

    fp32/fp64: the label's logit minus a per-row logsumexp (no [R, T, V] log-softmax output);
    16-bit: a per-row ``log_softmax`` then gather, in the logits' dtype (logsumexp in bf16 is
    not accurate enough, so TRL takes the slower path there).
    """
    idx = labels.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return logits.gather(-1, idx).squeeze(-1) - lse
    return torch.stack([torch.log_softmax(row, dim=-1).gather(-1, i).squeeze(-1) for row, i in zip(logits, idx)])


def trl_token_logps(hidden_rows: torch.Tensor, weight: torch.Tensor, labels_rows: torch.Tensor) -> torch.Tensor:
    """``hidden_rows [R, T, D]`` -> ``[R, T]`` via full ``[R, T, V]`` logits in the input dtype."""
    return trl_selective_logps(F.linear(hidden_rows, weight), labels_rows)


# ----------------------------------------------------------------------------------------------
# cut-cross-entropy


def cce_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str = "cce",
                    filter_eps: float | str | None = None) -> torch.Tensor:
    """``-linear_cross_entropy(reduction="none")``: per-token log-probs ``[N]`` (fp32).

    ``filter_eps=None`` asks CCE for the exact gradient; its default ("high") skips the
    gradient of vocabulary entries whose softmax is below a threshold (faster, approximate).
    """
    cce = _need("cut_cross_entropy", "cut-cross-entropy")
    if impl == "cce":
        _need_cuda(hidden, "cut-cross-entropy's cce implementation")
        loss = cce.linear_cross_entropy(hidden, weight, labels, reduction="none", impl="cce", filter_eps=filter_eps)
    else:
        loss = cce.linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
    return -loss.float()


# ----------------------------------------------------------------------------------------------
# liger-kernel


def liger_flce_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-LigerFusedLinearCrossEntropyLoss(reduction="none")``: per-token log-probs ``[N]``."""
    _need("liger_kernel", "liger-kernel")
    _need_cuda(hidden, "liger-kernel's fused linear cross-entropy")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, labels).float()


_LIGER_DPO: dict[tuple, object] = {}


def liger_dpo_loss(hidden_rows: torch.Tensor, weight: torch.Tensor, labels_rows: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """``LigerFusedLinearDPOLoss`` on ``[2B, T, D]`` rows (chosen first), reference log-probs 0.

    With the reference log-probs read from a cache the head does the same work whatever their
    value, so the comparison runs ours with zero reference log-probs too.  Liger's default
    ``compiled=True`` is used: that is what users get (the first call compiles).
    """
    _need("liger_kernel", "liger-kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    key = (beta,)
    if key not in _LIGER_DPO:
        _LIGER_DPO[key] = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False, average_log_prob=False,
                                                  compute_nll_loss=False)
    out = _LIGER_DPO[key](weight, hidden_rows, labels_rows)
    return out[0] if isinstance(out, tuple) else out
