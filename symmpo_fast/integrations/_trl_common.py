"""What symmpo-fast's TRL trainers share: TRL's import and version check, the error for an option a
trainer does not implement, the refusals every one of them makes, and the reference pass's context.
"""

from __future__ import annotations

import contextlib
from typing import Any

from packaging.version import Version

try:
    import trl
except ImportError as e:  # exercised in a subprocess without trl (tests/test_trl_options.py)
    raise ImportError("symmpo_fast.integrations.trl needs TRL >= 1.16: pip install 'symmpo-fast[trl]'") from e
if Version(trl.__version__) < Version("1.16.0"):
    raise ImportError(f"symmpo_fast.integrations.trl needs trl >= 1.16, found {trl.__version__}")

import torch
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..registry import resolve


class UnsupportedOptionError(ValueError):
    """A TRL option whose objective a symmpo-fast trainer does not compute; it never trains a different one."""

    def __init__(self, option: str, value: Any, why: str, trainer: str = "FusedDPOTrainer",
                 instead: str = "Use trl.DPOTrainer for it, or change the option."):
        self.option = option
        super().__init__(f"{trainer} does not implement {option}={value!r}: {why}. {instead}")


def refuse_common(args, trainer: str, instead: str | None = None) -> None:
    """The ``DPOConfig`` options that no fused objective computes: LD-DPO, f-DPO, WPO, torch.compile."""
    kw = {"trainer": trainer, **({"instead": instead} if instead else {})}
    if args.ld_alpha is not None:
        raise UnsupportedOptionError("ld_alpha", args.ld_alpha, "LD-DPO weights tokens past the shared length", **kw)
    if args.f_divergence_type != "reverse_kl":
        raise UnsupportedOptionError("f_divergence_type", args.f_divergence_type, "only reverse_kl (DPO) is fused",
                                     **kw)
    if args.use_weighting:
        raise UnsupportedOptionError("use_weighting", True, "WPO weights need log sum p^2 of every token", **kw)
    if args.torch_compile:
        raise UnsupportedOptionError("torch_compile", True, "the fused pass is not traced by torch.compile here", **kw)


def check_trainer_models(trainer, backend: str, instead: str | None = None) -> None:
    """Raise for what a constructed ``DPOTrainer`` subclass brings that the fused pass does not
    compute: an unknown or unavailable backend, an MoE auxiliary loss, a prompt-learning adapter."""
    kw = {"trainer": type(trainer).__name__, **({"instead": instead} if instead else {})}
    resolve(backend, trainer.args.device)  # an unknown or unavailable backend says why
    if trainer.aux_loss_enabled:
        raise UnsupportedOptionError("router_aux_loss_coef", trainer.router_aux_loss_coef,
                                     "the MoE load-balancing loss is not added by the fused pass; set it to 0.0", **kw)
    peft_cfg = getattr(trainer.model, "active_peft_config", None)
    if peft_cfg is not None and peft_cfg.is_prompt_learning:
        raise UnsupportedOptionError("peft_config", type(peft_cfg).__name__,
                                     "prompt-learning adapters prepend virtual tokens the backbone call skips", **kw)


def reference_context(trainer) -> contextlib.ExitStack:
    """What a reference pass of a ``DPOTrainer`` runs under, as TRL's own: no gradient, gradient
    checkpointing off, the policy's adapter switched to TRL's ``ref`` copy (or off) when the
    reference is the policy itself, and the accelerator's autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs))
    if trainer.ref_model is None and is_peft_model(trainer.model):
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        stack.enter_context(use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None))
    stack.enter_context(trainer.accelerator.autocast())
    return stack
