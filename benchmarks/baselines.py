"""What users would run instead of symmpo-fast, written as the benchmarks call it.

* TRL 1.16: ``trl.kernels.ChunkedLogProbFunction``, the fused LM head its ``DPOTrainer`` always
  uses: tiles of 4096 tokens x 32768 vocabulary entries, online log-sum-exp (a Triton kernel on
  CUDA, whole-tile PyTorch elsewhere), the backward recomputes each tile (8NDV in all).
* liger-kernel: ``LigerFusedLinearDPOLoss`` (chunked PyTorch under ``torch.compile``; runs on the
  CPU too) and, for token log-probs, ``LigerFusedLinearCrossEntropyLoss(reduction="none")``
  (Triton: CUDA only).
* cut-cross-entropy: ``linear_cross_entropy(..., reduction="none")`` read as ``-log p(label)``;
  its ``cce`` implementation is Triton (CUDA only), its ``torch_compile`` one is full logits
  compiled and runs on the CPU.

None of TRL, liger-kernel and cut-cross-entropy is a dependency of symmpo-fast: each wrapper raises
:class:`symmpo_fast.bench.Unavailable` with the reason when its package or device is missing.
"""

from __future__ import annotations

import importlib

import torch

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
# TRL 1.16's chunked log-prob head


def trl_chunked_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[N]`` by ``trl.kernels.ChunkedLogProbFunction`` as ``DPOTrainer`` calls it.

    TRL's vocabulary tile (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, 32768), temperature
    1, no softcap, log-probs only (``DPOTrainer`` also asks for entropy, mean logit and top-1 for
    its metrics: a few more reductions per tile).  Every label is real, so this is its compact
    path (CUDA) and its all-positions path (CPU) alike.
    """
    kernels = _need("trl.kernels", "trl")
    chunk = getattr(_need("trl.trainer.utils", "trl"), "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return kernels.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ("log_probs",))[0]


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
