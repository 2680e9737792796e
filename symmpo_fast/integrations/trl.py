"""``FusedDPOTrainer``: TRL 1.16's ``DPOTrainer`` with symmpo-fast's fused head and loss.

    from trl import DPOConfig
    from symmpo_fast.integrations.trl import FusedDPOTrainer      # pip install 'symmpo-fast[trl]'

    trainer = FusedDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()

Same constructor, ``DPOConfig``, data sets, collators and logged metrics as ``trl.DPOTrainer``
(text models and the vision-language models TRL supports).  What changes is the head:

* the policy's loss and gradients come from one :func:`symmpo_fast.fused_preference_loss` pass
  over the completion tokens (6NDV, no recomputation in the backward, one chunk of logits alive);
* the reference's sequence log-probs (online, or ``precompute_ref_log_probs``) come from
  :func:`symmpo_fast.token_logps` under ``no_grad``;
* both run inside the wrapped model's forward (:func:`~symmpo_fast.integrations.call_in_forward`),
  so DDP reduces the gradients and FSDP2 / DeepSpeed ZeRO-3 unshard the parameters as usual.

Loss types: ``sigmoid`` (DPO), ``sigmoid_norm`` (length-normalised DPO: the fused pass with
``average_logps``) and ``robust`` at ``label_smoothing=0`` (which is ``sigmoid``), each with any
positive ``loss_weights``.  Any other loss type, a mixture, ``ld_alpha``, a non-default
``f_divergence_type``, ``use_weighting``, an MoE auxiliary loss, prompt-learning PEFT or
``torch_compile`` raises :class:`UnsupportedOptionError` at construction, naming the option.

Metrics: TRL's names and values.  ``rewards/*``, ``logps/*`` come from the fused pass.
``entropy``, ``mean_token_accuracy``, ``logits/chosen`` and ``logits/rejected`` need the
logits, which the fused pass never keeps: with ``FusedOptions(logit_metrics=True)`` (the
default) one more no-grad head forward over the policy's completion tokens computes them
exactly (2NDV more); ``logit_metrics=False`` skips it and those four are not logged.

Also here: ``SymMPOTrainer`` / ``MDPOTrainer`` with ``SymMPOConfig`` / ``MDPOConfig``, SymMPO and
mDPO as TRL trainers for vision-language models (defined in :mod:`._trl_mpo`, which says how).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

# First: it checks that TRL is installed and recent enough, with a message saying what to install.
from ._trl_common import UnsupportedOptionError, check_trainer_models, reference_context, refuse_common

from datasets.fingerprint import Hasher
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .. import __version__
from ..objectives import NUM_ROLES, ObjectiveConfig
from ._forward import call_in_forward, inner_module
from ._hf import STATS, LogitTransform, fused_loss_pass, output_head, pretrained, sequence_logps_pass
from ._trl_mpo import MDPOConfig, MDPOTrainer, SymMPOConfig, SymMPOTrainer

__all__ = ["FusedDPOTrainer", "FusedOptions", "UnsupportedOptionError", "objective_for", "SymMPOTrainer",
           "SymMPOConfig", "MDPOTrainer", "MDPOConfig"]

LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust")
"""TRL loss types that are exactly a symmpo-fast DPO objective over sequence log-probs."""

CHOSEN, REJECTED = 0, 1  # symmpo-fast role columns of TRL's chosen / rejected completions


@dataclass(frozen=True)
class FusedOptions:
    """How FusedDPOTrainer runs symmpo-fast's head; the objective comes from the ``DPOConfig``."""

    backend: str = "auto"
    """symmpo-fast backend of the head and the loss: auto, triton, csrc, torch or reference."""
    logit_metrics: bool = True
    """Log TRL's logit-based metrics (entropy, mean_token_accuracy, logits/chosen, logits/rejected),
    exactly, from one more no-grad head forward over the policy's completion tokens (2NDV, a third
    of the fused pass's 6NDV).  False: they are not logged.  ``sigmoid_norm`` runs that forward
    whatever this says (TRL logs its rewards from sums; the fused pass reduces by mean), and then
    logs them too."""


def objective_for(args: DPOConfig) -> ObjectiveConfig:
    """The symmpo-fast objective equal to ``args``' DPO loss, or :class:`UnsupportedOptionError`.

    ``sigmoid``: ``weight * -logsig(beta * (lr_c - lr_r))`` with ``lr`` the policy-reference log
    ratio of summed sequence log-probs: symmpo-fast's DPO term.  ``sigmoid_norm``: the same over
    per-token means (``average_logps``).  ``robust`` at ``label_smoothing=0`` reduces to
    ``sigmoid``.  Options that only TRL's other losses read (``label_smoothing`` outside
    ``robust``, ``discopop_tau``) do not change these objectives, as in TRL.
    """
    losses = list(args.loss_type)
    if len(losses) != 1:
        raise UnsupportedOptionError("loss_type", losses, "a mixture of loss types is not one fused objective")
    (loss_type,) = losses
    if loss_type not in LOSS_TYPES:
        raise UnsupportedOptionError("loss_type", loss_type, f"only {list(LOSS_TYPES)} are exact over sequence "
                                     "log-probs in the fused pass")
    if loss_type == "robust" and args.label_smoothing != 0:
        raise UnsupportedOptionError("label_smoothing", args.label_smoothing,
                                     "robust DPO with label smoothing needs -logsig(-x) terms the fused pass lacks")
    weight = float((args.loss_weights or [1.0])[0])
    if not weight > 0:
        raise UnsupportedOptionError("loss_weights", args.loss_weights, "the weight must be > 0")
    refuse_common(args, "FusedDPOTrainer")
    if not args.beta > 0:
        raise UnsupportedOptionError("beta", args.beta, "beta must be > 0")
    return ObjectiveConfig.dpo(beta=float(args.beta), dpo_weight=weight, average_logps=loss_type == "sigmoid_norm")


@dataclass(frozen=True)
class _Pairs:
    """TRL's DPO batch as symmpo-fast sequences.

    TRL stacks ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` as rows of
    ``input_ids [2B, T]`` with ``completion_mask [2B, T]``; position t predicts token t + 1, so
    the completion's positions are ``completion_mask[:, 1:]``.  Record b's chosen completion is
    symmpo-fast sequence ``b * 5 + 0``, its rejected one ``b * 5 + 1``.
    """

    labels: torch.Tensor  # [2B, T-1] the next token of each position
    seq_index: torch.Tensor  # [2B, T-1] b * 5 + column at completion positions, -1 elsewhere
    records: int

    @classmethod
    def of(cls, inputs: dict[str, torch.Tensor]) -> "_Pairs":
        ids, completion = inputs["input_ids"], inputs["completion_mask"]
        rows = ids.shape[0]
        if ids.dim() != 2 or rows % 2 or completion.shape != ids.shape:
            raise ValueError(f"a DPO batch has input_ids and completion_mask [2B, T] (chosen rows, then rejected); "
                             f"got {tuple(ids.shape)} and {tuple(completion.shape)}")
        B = rows // 2
        r = torch.arange(rows, device=ids.device)
        seq_of_row = (r % B) * NUM_ROLES + (r >= B).long() * REJECTED
        seq_index = torch.where(completion[:, 1:].bool(), seq_of_row.unsqueeze(1), -1)
        return cls(ids[:, 1:], seq_index, B)

    def head_inputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden [2B, T, D]`` -> ``(h [n, D], labels [n], seq_index [n])`` of the completion tokens only."""
        if hidden.shape[:2] != (self.labels.shape[0], self.labels.shape[1] + 1):
            raise ValueError(f"the backbone returned hidden states {tuple(hidden.shape)} for input_ids "
                             f"{(self.labels.shape[0], self.labels.shape[1] + 1)}")
        keep = self.seq_index >= 0
        return hidden[:, :-1][keep], self.labels[keep], self.seq_index[keep]

    def table(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``[B, 5]`` with chosen / rejected in their columns and 0 in the unused ones."""
        out = chosen.new_zeros(self.records, NUM_ROLES, dtype=torch.float32)
        out[:, CHOSEN], out[:, REJECTED] = chosen.float(), rejected.float()
        return out

    def token_counts(self) -> torch.Tensor:
        """``[B, 5]`` completion tokens that go through the head, per sequence."""
        seg = self.seq_index[self.seq_index >= 0]
        return torch.bincount(seg, minlength=self.records * NUM_ROLES).view(self.records, NUM_ROLES)


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probs and loss come from symmpo-fast.

    Takes every argument of ``trl.DPOTrainer`` 1.16, plus ``fused`` (:class:`FusedOptions`,
    keyword only).  See the module docstring for what is supported and what raises.
    """

    _tag_names = [*DPOTrainer._tag_names, "symmpo-fast"]

    def __init__(self, *args, fused: FusedOptions | None = None, **kwargs):
        self._sf_options = fused or FusedOptions()
        self._sf_checked = False
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        # The options are checked before TRL tokenises the data, builds a reference or precomputes.
        self._sf_cfg = objective_for(config) if config is not None else None
        super().__init__(*args, **kwargs)
        if self._sf_cfg is None:
            self._sf_cfg = objective_for(self.args)
        self._check_models()

    # ------------------------------------------------------------------------------------------
    # construction-time checks that need the models

    def _check_models(self) -> None:
        """Raise for what the models bring that the fused pass does not compute; once."""
        if self._sf_checked:
            return
        check_trainer_models(self, self._sf_options.backend)
        for model in (self.model, self.ref_model):
            if model is not None:
                net = pretrained(inner_module(model))
                LogitTransform.from_config(net.config)
                with output_head(net, maybe_gather_lm_head_ctx):
                    pass
        self._sf_checked = True

    @staticmethod
    def _model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        return {**{k: v for k, v in inputs.items() if k not in skip}, "use_cache": False}

    def _reference_sums(self, model, inputs: dict[str, Any], pairs: _Pairs) -> torch.Tensor:
        """``[B, 5]`` reference sums: ``model`` (the reference, or the policy with its adapter off)."""
        run = functools.partial(sequence_logps_pass, pretrained(inner_module(model)), pairs.head_inputs, pairs.records,
                                self._sf_options.backend, maybe_gather_lm_head_ctx)
        with reference_context(self):
            return call_in_forward(model, run, **self._model_kwargs(inputs))

    # ------------------------------------------------------------------------------------------
    # TRL's hooks

    def compute_ref_log_probs(self, model, inputs):
        """Reference ``(chosen [B], rejected [B])`` sums for ``precompute_ref_log_probs``, by our head."""
        self._check_models()
        ref = self._reference_sums(model, inputs, _Pairs.of(inputs))
        return ref[:, CHOSEN], ref[:, REJECTED]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches precomputed reference log-probs in a file keyed by the data set's fingerprint
        # and a hash of the model: salt the hash, so that a cache TRL's head wrote is never read as
        # ours (nor ours as TRL's).
        model_hash = self._precompute_model_hash
        self._precompute_model_hash = Hasher.hash(("symmpo-fast", __version__, model_hash))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = model_hash

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        pairs = _Pairs.of(inputs)
        if self.precompute_ref_logps:
            ref = pairs.table(inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        else:
            ref = self._reference_sums(self.model if self.ref_model is None else self.ref_model, inputs, pairs)
        counts = pairs.token_counts()
        if self._sf_cfg.average_logps:
            if bool(inputs["completion_mask"][:, 0].any()):
                raise ValueError("sigmoid_norm: a completion starts at position 0, so TRL's length (completion_mask) "
                                 "counts a token no position predicts and the fused mean cannot equal it")
            ref_in = ref / counts.clamp(min=1)
        else:
            ref_in = ref
        stats = self._sf_options.logit_metrics or self._sf_cfg.average_logps
        run = functools.partial(fused_loss_pass, pretrained(inner_module(model)), pairs.head_inputs, ref_in,
                                self._sf_cfg, self._sf_options.backend, stats, maybe_gather_lm_head_ctx)
        # The accelerator's autocast wraps the model's own forward, which call_in_forward stands in
        # for: without it a bf16 run would compute the policy's backbone in fp32, unlike stock's.
        # The head runs outside it (the head switches autocast off itself), as in the reference pass.
        with self.accelerator.autocast():
            loss, metrics, per_seq = call_in_forward(model, run, **self._model_kwargs(inputs))
        self._log_fused_metrics(mode, inputs, pairs, counts, ref, metrics, per_seq)
        if return_outputs:
            warnings.warn("return_outputs=True (compute_metrics) recomputes the full logits with one more forward; "
                          "TRL deprecates it for v2.0.0", FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

    # ------------------------------------------------------------------------------------------
    # metrics, as TRL 1.16 logs them

    def _log_fused_metrics(self, mode, inputs, pairs: _Pairs, counts, ref, metrics, per_seq) -> None:
        """Append TRL's metrics, gathered across processes with TRL's two reductions.

        TRL gathers each record's reward (``gather``) and each process's token sums
        (``gather_for_metrics``); here the same sums travel as one vector per reduction, so the
        means are TRL's (two collectives instead of fourteen).
        """
        acc, B = self.accelerator, pairs.records
        stat = {name: per_seq[..., i].double() for i, name in enumerate(STATS)} if per_seq is not None else {}
        if self._sf_cfg.average_logps:
            # TRL's rewards and logps of sigmoid_norm are over sums; the fused pass's over means.
            policy = stat["logps"][:, :2]
            rewards = self.beta * (policy - ref[:, :2])
            per_record = torch.stack([rewards[:, 0], rewards[:, 1], (rewards[:, 0] > rewards[:, 1]).float(),
                                      rewards[:, 0] - rewards[:, 1], policy[:, 0], policy[:, 1]]).sum(1)
        else:
            names = ("rewards/chosen", "rewards/rejected", "accuracy/dpo", "margin/dpo", "logps/chosen",
                     "logps/rejected")
            per_record = torch.stack([metrics[k] for k in names]).double() * B
        record_sums = acc.gather(torch.cat([per_record.double(), per_record.new_tensor([B])])[None]).sum(0)
        n_records = record_sums[-1]

        tokens = [inputs["attention_mask"].sum().double()]
        if per_seq is not None:  # [B, 5] per-sequence sums; TRL's chosen / rejected are columns 0 / 1
            c, logits = counts.double(), stat["mean_logits"]
            tokens += [stat["entropy"][:, :2].sum(), c[:, :2].sum(), logits[:, CHOSEN].sum(), c[:, CHOSEN].sum(),
                       logits[:, REJECTED].sum(), c[:, REJECTED].sum(), stat["is_top1"][:, CHOSEN].sum()]
        token_sums = acc.gather_for_metrics(torch.stack(tokens)[None]).sum(0).tolist()

        log = self._metrics[mode]
        if per_seq is not None:
            _, ent, n_tok, logit_c, n_c, logit_r, n_r, top1 = token_sums
            log["entropy"].append(ent / n_tok if n_tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(token_sums[0]) // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]
        if per_seq is not None:
            log["logits/chosen"].append(logit_c / n_c if n_c > 0 else 0.0)
            log["logits/rejected"].append(logit_r / n_r if n_r > 0 else 0.0)
            log["mean_token_accuracy"].append(top1 / n_c if n_c > 0 else 0.0)
        means = (record_sums[:-1] / n_records).tolist()
        for name, value in zip(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                "logps/chosen", "logps/rejected"), means):
            log[name].append(value)
