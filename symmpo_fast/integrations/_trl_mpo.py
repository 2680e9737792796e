"""``SymMPOTrainer`` and ``MDPOTrainer``: SymMPO and mDPO as TRL 1.16 trainers for vision-language models.

    from symmpo_fast.integrations.trl import SymMPOConfig, SymMPOTrainer      # or MDPOConfig, MDPOTrainer

    trainer = SymMPOTrainer(model=model, args=SymMPOConfig(...), train_dataset=ds, processing_class=processor)
    trainer.train()

Subclasses of ``trl.DPOTrainer``: the same constructor, PEFT handling, reference model, logging,
evaluation, callbacks and distributed set-up.  What is ours is the data path and the pass:

* Data: a ``datasets.Dataset`` with TRL's columns ``images`` (one image m per row), ``prompt``,
  ``chosen`` (y_w), ``rejected`` (y_l), and for SymMPO ``contrast_images`` (m') and
  ``contrast_chosen`` (y_w'); mDPO builds its crop m_l itself.  Rows go through
  :class:`symmpo_fast.data.PreferenceCollator` (:func:`record_from_row` says how TRL's columns
  become a record), which tokenizes each record once and holds each distinct image once.
* Prompt: a conversational ``prompt`` (one user turn: an image, then a text) gives the question
  x, which the config's ``prompt_format`` puts into the model family's official input
  (LLaVA-1.5: ``llava_v1``, ``{system} USER: <image>\\n{x} ASSISTANT: {y}</s>``; Qwen-VL: its chat
  template), exactly as symmpo-fast's own trainer builds it from a question.  A plain-text
  ``prompt`` without the image token is the question too; one holding the image token is the
  whole conversation, used as written (mDPO's JSON).
* Pass: :func:`symmpo_fast.layouts.forward_preference` (shared prefix: each image through the
  vision tower once per batch, each (image, question) prefix once for all its responses, the
  fused loss) runs as the wrapped model's forward (:func:`~symmpo_fast.integrations.call_in_forward`),
  so DDP reduces the gradients and FSDP2 unshards the parameters.
* Reference: ``ref_model`` if given; else the policy with its LoRA adapter off (``peft_config``;
  a ``PeftModel`` passed in uses TRL's frozen ``ref`` copy of its adapter); else a frozen copy of
  the policy made at construction; or, with ``precompute_ref_log_probs``, the five sequence
  log-probs of every record computed once before training (keyed by record content) and no
  reference model kept.
* Config: :class:`SymMPOConfig` / :class:`MDPOConfig` are ``DPOConfig`` with the objective's
  weights (defaults: the official code's, ``ObjectiveConfig.symmpo()`` / ``.mdpo()``) and the
  collator's settings.  ``DPOConfig`` options that would change the objective or the data path
  (another ``loss_type``, ``loss_weights``, ``label_smoothing``, ``ld_alpha``,
  ``f_divergence_type``, ``use_weighting``, ``padding_free``, ``pad_to_multiple_of``,
  ``truncation_mode``, ``torch_compile``) raise :class:`UnsupportedOptionError` naming the option.
* Metrics: the names and values symmpo-fast's own trainer logs (``loss/dpo``, ``loss/pair``,
  ``rewards/chosen``, ``accuracy/dpo``, ``margin/pair_m``, ``packing/fill``, ...), means over the
  records of the step on every process, and ``dropped`` / ``truncated``: the records that
  ``max_length`` dropped or cut so far.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ._trl_common import UnsupportedOptionError, check_trainer_models, reference_context, refuse_common

from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..data import COLUMNS, MDPO_CROPS, TRUNCATION, PreferenceCollator
from ..formats import RecordProblem, question_or_conversation
from ..layouts import PACKINGS, forward_preference, sequence_logps
from ..models import adapter_for, load_processor_for
from ..objectives import ROLES, ObjectiveConfig
from ..prompts import PROMPT_FORMATS
from ._forward import call_in_forward, inner_module

__all__ = ["SymMPOConfig", "MDPOConfig", "SymMPOTrainer", "MDPOTrainer", "record_from_row"]

BATCH_KEY = "preference_batch"
"""The one key of the collator's output: a :class:`symmpo_fast.data.PreferenceBatch`."""
_HELP = {
    "dpo_weight": "Weight of DPO(y_w > y_l | m).",
    "copo_weight": "Weight of mDPO's conditional term CoPO(y_w|m > y_w|m_l) (m_l: mDPO's crop; SymMPO: m').",
    "pair_weight": "SymMPO's lambda: weight of Pair(y_w > y_w' | m) + Pair(y_w' > y_w | m').",
    "margin_weight": "SymMPO's gamma: weight of (Delta(m; y_w, y_w') - Delta(m'; y_w', y_w))^2, Delta without beta.",
    "anchor_weight": "eta: weight of the anchor -logsig(r(m, y_w) - delta).",
    "anchor_delta": "delta: the anchor's reward threshold.",
    "anchor_contrast": "Also anchor y_w' given m' (SymMPO).",
    "average_logps": "Sequence log-prob as the mean over response tokens instead of the sum.",
}
_OBJECTIVE_FIELDS = tuple(_HELP)


def _objective_field(preset: ObjectiveConfig, name: str):
    return field(default=getattr(preset, name), metadata={"help": _HELP[name]})


def _choice(default: str, help: str, choices: tuple[str, ...]):
    return field(default=default, metadata={"help": help, "choices": choices})


_BASE = ObjectiveConfig()


@dataclass
class _PreferenceConfig(DPOConfig):
    """``DPOConfig`` plus the preference objective's weights and symmpo-fast's collator and pass settings."""

    objective: ClassVar[str]
    trainer_name: ClassVar[str]

    max_length: int | None = field(default=2048, metadata={
        "help": "Longest sequence (prompt + image tokens + response) in tokens; None: no bound. What happens to a "
                "longer record is `truncation`'s."})
    truncation: str = _choice("drop", "A record longer than max_length: 'drop' it, cut its question ('question'), "
                              "or cut each sequence on the right ('right', the official code's); counted in the "
                              "logs, never silent.", TRUNCATION)
    prompt_format: str = _choice("auto", "How a question and an answer become token ids: 'llava_v1' (the official "
                                 "LLaVA-1.5 input), 'chat_template' (the processor's template); 'auto' is the model "
                                 "family's official one.", PROMPT_FORMATS)
    system_prompt: str | None = field(default=None, metadata={
        "help": "Replaces the prompt format's system text (llava_v1: the official one; chat_template: none)."})
    packing: str = _choice("shared_prefix", "'shared_prefix': each image and each (image, question) prefix once; "
                           "'padded': one row per sequence, fused head; 'none': the official layout, full logits.",
                           PACKINGS)
    backend: str = field(default="auto", metadata={"help": "Backend of the fused head and loss: auto, triton, "
                                                           "csrc, torch or reference."})
    dpo_weight: float = _objective_field(_BASE, "dpo_weight")
    copo_weight: float = _objective_field(_BASE, "copo_weight")
    pair_weight: float = _objective_field(_BASE, "pair_weight")
    margin_weight: float = _objective_field(_BASE, "margin_weight")
    anchor_weight: float = _objective_field(_BASE, "anchor_weight")
    anchor_delta: float = _objective_field(_BASE, "anchor_delta")
    anchor_contrast: bool = _objective_field(_BASE, "anchor_contrast")
    average_logps: bool = _objective_field(_BASE, "average_logps")

    def __post_init__(self):
        super().__post_init__()
        check_options(self)

    def objective_config(self) -> ObjectiveConfig:
        """The :class:`symmpo_fast.ObjectiveConfig` these fields (and ``beta``) set."""
        return ObjectiveConfig(beta=float(self.beta), **{k: getattr(self, k) for k in _OBJECTIVE_FIELDS})

    def collator_kwargs(self) -> dict[str, Any]:
        """The :class:`symmpo_fast.data.PreferenceCollator` options (the seed fixes mDPO's crops)."""
        # No bound: an int the collator accepts that no sequence reaches.
        max_length = self.max_length if self.max_length is not None else 2**62
        return dict(max_length=max_length, truncation=self.truncation, seed=self.seed,
                    prompt_format=self.prompt_format, system_prompt=self.system_prompt)


_SYMMPO, _MDPO = ObjectiveConfig.symmpo(), ObjectiveConfig.mdpo()


@dataclass
class SymMPOConfig(_PreferenceConfig):
    """``DPOConfig`` for :class:`SymMPOTrainer`.  Objective defaults: the official SymMPO code's
    (``ObjectiveConfig.symmpo()``: beta 0.1, lambda 0.5, gamma 1e-4, eta 1 on y_w|m and y_w'|m')."""

    objective: ClassVar[str] = "symmpo"
    trainer_name: ClassVar[str] = "SymMPOTrainer"

    pair_weight: float = _objective_field(_SYMMPO, "pair_weight")
    margin_weight: float = _objective_field(_SYMMPO, "margin_weight")
    anchor_weight: float = _objective_field(_SYMMPO, "anchor_weight")
    anchor_contrast: bool = _objective_field(_SYMMPO, "anchor_contrast")


@dataclass
class MDPOConfig(_PreferenceConfig):
    """``DPOConfig`` for :class:`MDPOTrainer`.  Objective defaults: the official mDPO code's
    (``ObjectiveConfig.mdpo()``: beta 0.1, DPO + CoPO + anchor on y_w|m, delta 0)."""

    objective: ClassVar[str] = "mdpo"
    trainer_name: ClassVar[str] = "MDPOTrainer"

    copo_weight: float = _objective_field(_MDPO, "copo_weight")
    anchor_weight: float = _objective_field(_MDPO, "anchor_weight")
    mdpo_crop: str = _choice("seeded", "mDPO's cropped image m_l: 'seeded' (one crop of the raw image per record and "
                             "seed, the same every epoch; precomputable) or 'official' (a new random resized crop "
                             "of the processed pixels on every forward, policy and reference apart, as mDPO's code).",
                             MDPO_CROPS)

    def collator_kwargs(self) -> dict[str, Any]:
        return {**super().collator_kwargs(), "mdpo_crop": self.mdpo_crop}


def check_options(args: _PreferenceConfig) -> None:
    """Raise, naming the option, for a ``DPOConfig`` setting the trainer does not implement or a
    value out of range; build the objective (its own checks name the field)."""
    trainer = args.trainer_name
    instead = "Change the option (the objective is set by the config's weights)."

    def refuse(option, why):
        raise UnsupportedOptionError(option, getattr(args, option), why, trainer=trainer, instead=instead)

    if list(args.loss_type) != ["sigmoid"]:
        refuse("loss_type", "the objective is the config's weighted terms, whose DPO term is TRL's sigmoid")
    if args.loss_weights is not None:
        refuse("loss_weights", "weigh the terms with dpo_weight, copo_weight, pair_weight, margin_weight, anchor_weight")
    if args.label_smoothing != 0:
        refuse("label_smoothing", "robust DPO's flipped-label term is not part of the objective")
    if args.padding_free:
        refuse("padding_free", "the rows are packed by `packing` (shared_prefix); leave padding_free False")
    if args.pad_to_multiple_of is not None:
        refuse("pad_to_multiple_of", "the packed rows are padded by the layout")
    if args.truncation_mode != "keep_start":
        refuse("truncation_mode", "a record longer than max_length is handled by `truncation` (drop, question, "
                                  "right); images are never cut")
    refuse_common(args, trainer, instead)
    for name in ("truncation", "prompt_format", "packing") + (("mdpo_crop",) if args.objective == "mdpo" else ()):
        choices = args.__dataclass_fields__[name].metadata["choices"]
        if getattr(args, name) not in choices:
            raise ValueError(f"{type(args).__name__}.{name} must be one of {choices}, got {getattr(args, name)!r}")
    if args.max_length is not None and (not isinstance(args.max_length, int) or args.max_length < 1):
        raise ValueError(f"{type(args).__name__}.max_length must be a positive int or None, got {args.max_length!r}")
    cfg = args.objective_config()
    missing = sorted(set(cfg.used_columns) - set(COLUMNS[args.objective]))
    if missing:
        raise ValueError(f"{type(args).__name__}: these weights read the roles {[ROLES[k] for k in missing]}, which "
                         f"{args.objective} records do not hold (use SymMPOConfig for y_w' and m')")
    if args.objective == "mdpo" and args.mdpo_crop == "official" and args.precompute_ref_log_probs:
        raise ValueError("MDPOConfig: mdpo_crop='official' draws a new crop on every forward, so no precomputed "
                         "reference log-prob matches it; use mdpo_crop='seeded' or precompute_ref_log_probs=False")


# ----------------------------------------------------------------------------------------------
# TRL's rows -> symmpo-fast records

# The record field each role's text and image come from, and the TRL columns that hold them.
_IMAGE_COLUMNS = {"image": ("images", "image"), "contrast_image": ("contrast_images", "contrast_image")}
_TEXT_COLUMNS = {"symmpo": ("prompt", "chosen", "rejected", "contrast_chosen"),
                 "mdpo": ("prompt", "chosen", "rejected")}
_RECORD_IMAGES = {"symmpo": ("image", "contrast_image"), "mdpo": ("image",)}


def _text_part(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if (isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict)
            and content[0].get("type") == "text"):
        return content[0]["text"]
    raise ValueError(f"{where}: a message's content must be a string or one text part, got {content!r:.120}")


def _answer(value, where: str) -> str:
    """A completion: a string, or TRL's conversational form, one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        return _text_part(value[0].get("content"), where)
    raise ValueError(f"{where}: a completion must be a string or one assistant message, got {value!r:.120}")


def _prompt(value, image_token: str, where: str) -> dict[str, str]:
    """``{"question": x}`` or ``{"prompt": conversation}``; see the module docstring.  A string is
    read as our own readers read one (:func:`symmpo_fast.formats.question_or_conversation`)."""
    if isinstance(value, str):
        try:
            return question_or_conversation(value, image_token)
        except RecordProblem as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "user":
        content = value[0].get("content")
        if (isinstance(content, list) and len(content) == 2 and all(isinstance(c, dict) for c in content)
                and content[0].get("type") == "image" and content[1].get("type") == "text"):
            return {"question": content[1]["text"]}
    raise ValueError(f"{where}: a conversational prompt must be one user turn whose content is an image, then a text "
                     f"(the question); give the system text as the config's system_prompt. Got {value!r:.160}")


def _one_image(row: dict, field_name: str, where: str):
    names = _IMAGE_COLUMNS[field_name]
    present = [n for n in names if row.get(n) is not None]
    if not present:
        raise ValueError(f"{where} has no {names[0]!r} (or {names[1]!r}) column")
    value = row[present[0]]
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{where}: {present[0]!r} holds {len(value)} images; a record has exactly one")
        value = value[0]
    return value


def record_from_row(row: dict, objective: str, image_token: str, where: str = "row") -> dict:
    """A TRL row as a :class:`symmpo_fast.data.PreferenceCollator` record.

    ``images`` (or ``image``): m; ``contrast_images`` (``contrast_image``): m' (SymMPO); ``prompt``:
    the question (see the module docstring); ``chosen``, ``rejected``, ``contrast_chosen``: y_w,
    y_l, y_w' as strings or one assistant message each.  Other columns are ignored.
    """
    record = {name: _one_image(row, name, where) for name in _RECORD_IMAGES[objective]}
    for name in _TEXT_COLUMNS[objective]:
        if name not in row:
            raise ValueError(f"{where} has no {name!r} column, which {objective} needs")
    record.update(_prompt(row["prompt"], image_token, f"{where}: 'prompt'"))
    for name in _TEXT_COLUMNS[objective][1:]:
        record[name] = _answer(row[name], f"{where}: {name!r}")
    return record


class TRLRowCollator:
    """TRL rows -> records -> :class:`symmpo_fast.data.PreferenceCollator` -> ``{BATCH_KEY: batch}``."""

    def __init__(self, processor, objective: str, **collator_kwargs):
        self.collator = PreferenceCollator(processor, objective, **collator_kwargs)
        self.objective = objective

    def __call__(self, rows: list[dict]) -> dict:
        token = self.collator.image_token
        records = [record_from_row(r, self.objective, token, f"row {i} of the batch") for i, r in enumerate(rows)]
        return {BATCH_KEY: self.collator(records)}


# ----------------------------------------------------------------------------------------------
# the trainers


class _PreferenceTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with symmpo-fast's collator, packed layout and fused preference loss."""

    config_class: ClassVar[type[_PreferenceConfig]]

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        name, cls = type(self).__name__, self.config_class
        if args is None:
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            args = cls(f"{model_id.split('/')[-1] or 'model'}-{cls.objective}")
        if not isinstance(args, cls):
            raise TypeError(f"{name} takes a {cls.__name__} (a DPOConfig with the objective's weights), "
                            f"got {type(args).__name__}")
        check_options(args)  # again: a field may have changed since the config was made
        for option, value in (("data_collator", data_collator), ("compute_metrics", compute_metrics)):
            if value is not None:
                why = ("the batch is symmpo-fast's PreferenceCollator's (see the config's collator settings)"
                       if option == "data_collator" else "it needs logits, which the fused pass never builds")
                raise UnsupportedOptionError(option, type(value).__name__, why, trainer=name,
                                             instead="Leave it None.")
        if processing_class is None:
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            # As our trainer loads it: LLaVA-1.5's PIL image processor, Qwen-VL's without torchvision.
            processing_class = load_processor_for(model_id)
        if not isinstance(processing_class, ProcessorMixin) or not hasattr(processing_class, "image_processor"):
            raise TypeError(f"{name} trains vision-language models: processing_class must be the model's processor "
                            f"(a tokenizer and an image processor), got {type(processing_class).__name__}")
        if not isinstance(model, str):  # a hub id or a directory: TRL loads it (and the reference)
            adapter_for(model)  # a supported family, or a TypeError naming them
            adapter_off = peft_config is not None or is_peft_model(model)
            if ref_model is None and not adapter_off and not args.precompute_ref_log_probs:
                # TRL would reload the policy from its hub id; a copy needs none and is the same weights.
                ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        self._sf_cfg = args.objective_config()
        self._sf_ref_logps: dict[str, torch.Tensor] = {}
        self._sf_counts = {mode: {"dropped": 0, "truncated": 0} for mode in ("train", "eval")}
        self._sf_checked = False
        collator = TRLRowCollator(processing_class, cls.objective, **args.collator_kwargs())
        super().__init__(model, ref_model, args, collator, train_dataset, eval_dataset, processing_class, None,
                         callbacks, optimizers, quantization_config, peft_config)
        self._check_models()

    # DPOTrainer reads `_is_vision_dataset` (set from the first row) to refuse precompute_ref_log_probs
    # for images, to skip `_prepare_dataset` and, in `evaluate`, the precompute of a new eval set,
    # and to pick its own vision collator.  Here every row holds images and each of those steps is
    # ours (`_prepare_dataset`, `_precompute_ref_logps`, the collator), so TRL must take the path
    # that calls them: the attribute always reads False.
    @property
    def _is_vision_dataset(self) -> bool:
        return False

    @_is_vision_dataset.setter
    def _is_vision_dataset(self, value: bool) -> None:
        pass

    def _check_models(self) -> None:
        if self._sf_checked:
            return
        check_trainer_models(self, self.args.backend, instead="Change the option.")
        for model in (self.model, self.ref_model):
            if model is not None and not adapter_for(inner_module(model)).has_images:
                raise TypeError(f"{type(self).__name__} trains vision-language models; "
                                f"{type(inner_module(model)).__name__} has no vision tower")
        self._sf_checked = True

    def _check_rows(self, dataset: Dataset, name: str, processor, args) -> None:
        """The columns are there and every row maps onto a record the collator keeps, as our
        trainer checks its data when it is read (the texts, the tokenizer's special tokens, the
        length under the config's max_length and truncation, mDPO's crop of a small image): a bad
        row is named by its index before anything is trained, not mid-run (where, under DDP, the
        other processes would wait in a collective for the one that raised)."""
        from ..train.prepare import record_check

        image_token = processor.image_token
        objective = self.config_class.objective
        needed = [*_TEXT_COLUMNS[objective], *(_IMAGE_COLUMNS[f] for f in _RECORD_IMAGES[objective])]
        for column in needed:  # a text column's name, or an image field's (plural, singular) names
            names = column if isinstance(column, tuple) else (column,)
            if not set(names) & set(dataset.column_names):
                raise ValueError(f"{name} has no {names[0]!r} column, which {objective} needs; columns: "
                                 f"{dataset.column_names}")
        for i, row in enumerate(dataset.select_columns(list(_TEXT_COLUMNS[objective]))):
            where = f"{name} row {i}"
            _prompt(row["prompt"], image_token, f"{where}: 'prompt'")
            for c in _TEXT_COLUMNS[objective][1:]:
                _answer(row[c], f"{where}: {c!r}")
        collate = args.collator_kwargs()
        collator = PreferenceCollator(processor, objective, **collate)
        crop = objective == "mdpo" and collate.get("mdpo_crop", "seeded") == "seeded"
        check = record_check(processor, collate["seed"], crop=crop)
        for i, row in enumerate(dataset):
            where = f"{name} row {i}"
            record = record_from_row(row, objective, image_token, where)
            try:
                check(record)
                kept, longest, _ = collator.measure(record)
            except RecordProblem as e:
                raise ValueError(f"{where}: {e}; fix: {e.fix}") from None
            except ValueError as e:  # the collator's own refusal ("record 0: ..."): this row's
                raise ValueError(f"{where}: {e}") from None
            if not kept:
                raise ValueError(f"{where}: its longest sequence is {longest} tokens, above max_length="
                                 f"{collate['max_length']} with truncation={collate['truncation']}: raise max_length, "
                                 "set truncation, or remove the row")

    # ------------------------------------------------------------------------------------------
    # TRL's hooks

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Nothing to tokenize ahead: the collator tokenizes each batch (and holds each image once).
        if isinstance(dataset, Dataset):
            self._check_rows(dataset, dataset_name, processing_class, args)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [c for cols in _IMAGE_COLUMNS.values() for c in cols] + list(
                _TEXT_COLUMNS["symmpo"])

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Fill the reference table for ``dataset`` (``[5]`` log-probs per record key, every process
        the whole table) and return the data set as it is."""
        self._check_models()
        if not isinstance(dataset, Dataset):
            raise ValueError("precompute_ref_log_probs=True needs a map-style Dataset, not an IterableDataset")
        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     num_workers=self.args.dataloader_num_workers, shuffle=False))
        model = self.ref_model if self.ref_model is not None else self.model
        pairs: list[tuple[str, list[float]]] = []
        for inputs in loader:
            batch = inputs[BATCH_KEY]
            logps = self._reference_pass(model, batch).float().cpu()
            pairs += zip(batch.record_keys, logps.tolist())
        # Each process computed its shard; the table is every process's.
        self._sf_ref_logps.update({k: torch.tensor(v) for k, v in gather_object(pairs)})
        return dataset

    def _reference_pass(self, model, batch) -> torch.Tensor:
        """``[B, 5]`` sequence log-probs of ``model`` (the reference, or the policy with its adapter
        switched as TRL does), in the packed layout, under no_grad, as the model's forward."""
        run = functools.partial(sequence_logps, inner_module(model), batch, self.args.packing, self.args.backend,
                                average=self._sf_cfg.average_logps)
        with reference_context(self):
            return call_in_forward(model, run)

    def _reference(self, batch) -> torch.Tensor:
        if not self.precompute_ref_logps:
            return self._reference_pass(self.ref_model if self.ref_model is not None else self.model, batch)
        missing = [k for k in batch.record_keys if k not in self._sf_ref_logps]
        if missing:
            raise RuntimeError(f"{len(missing)} record(s) of this batch have no precomputed reference log-probs (e.g. "
                               f"key {missing[0][:16]}...): they were not in the data set the trainer precomputed, "
                               "or their content or collation changed since; pass them as eval_dataset or to "
                               "evaluate()")
        return torch.stack([self._sf_ref_logps[k] for k in batch.record_keys])

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} returns no logits (the fused pass never builds them): use "
                             "evaluate(), or predict() with prediction_loss_only=True")
        mode = "train" if self.model.training else "eval"
        batch = inputs[BATCH_KEY]
        ref = self._reference(batch)
        run = functools.partial(forward_preference, inner_module(model), batch, self._sf_cfg, ref, self.args.packing,
                                self.args.backend)
        # The accelerator's autocast wraps the model's own forward, which call_in_forward stands in
        # for (and is absent before the model is prepared): the body runs under it here, the head
        # outside it (the head switches autocast off itself), as in the reference pass.
        with self.accelerator.autocast():
            loss, metrics = call_in_forward(model, run)
        self._log_metrics(mode, batch, metrics)
        return loss

    def _log_metrics(self, mode: str, batch, metrics: dict[str, torch.Tensor]) -> None:
        """Each metric's mean over the records of every process (the loss is the Trainer's to log),
        and how many records the collator dropped or truncated so far (``max_length``), in total."""
        names = [k for k in metrics if k != "loss"]
        device = metrics[names[0]].device
        local = torch.cat([torch.stack([metrics[k].detach().float().reshape(()) for k in names]) * batch.num_records,
                           torch.tensor([batch.num_records, batch.num_dropped, batch.num_truncated],
                                        dtype=torch.float32, device=device)])
        sums = self.accelerator.gather(local[None]).sum(0).tolist()  # one collective, one host sync per micro-batch
        records, dropped, truncated = sums[len(names):]
        for k, v in zip(names, sums):
            self._metrics[mode][k].append(v / records)
        totals = self._sf_counts[mode]
        totals["dropped"] += int(dropped)
        totals["truncated"] += int(truncated)
        for k, v in totals.items():
            self._metrics[mode][k] = [v]


class SymMPOTrainer(_PreferenceTrainer):
    """SymMPO (Liu et al., NeurIPS 2025, https://arxiv.org/abs/2506.11712) as a ``trl.DPOTrainer``.

    Takes every argument of ``trl.DPOTrainer`` 1.16 with a :class:`SymMPOConfig`; rows need
    ``images``, ``prompt``, ``chosen``, ``rejected``, ``contrast_images`` and ``contrast_chosen``.
    See the module docstring for the data, the reference and what raises.
    """

    config_class = SymMPOConfig
    _tag_names = [*DPOTrainer._tag_names, "symmpo-fast", "symmpo"]
    _name = "SymMPO"
    _paper = {  # the model card's citation, as the official repository gives it
        "title": "Mitigating Hallucination Through Theory-Consistent Symmetric Multimodal Preference Optimization",
        "id": "2506.11712",
        "citation": "@article{liu2025mitigating,\n"
                    "  title={Mitigating Hallucination Through Theory-Consistent Symmetric Multimodal Preference "
                    "Optimization},\n"
                    "  author={Liu, Wenqi and Song, Xuemeng and Li, Jiaxi and Wei, Yinwei and Zheng, Na and Yin, "
                    "Jianhua and Nie, Liqiang},\n"
                    "  journal={arXiv preprint arXiv:2506.11712},\n  year={2025}\n}",
    }


class MDPOTrainer(_PreferenceTrainer):
    """mDPO (Wang et al., EMNLP 2024, https://arxiv.org/abs/2406.11839) as a ``trl.DPOTrainer``.

    Takes every argument of ``trl.DPOTrainer`` 1.16 with an :class:`MDPOConfig`; rows need
    ``images``, ``prompt``, ``chosen`` and ``rejected`` (the crop m_l is made from the image).
    """

    config_class = MDPOConfig
    _tag_names = [*DPOTrainer._tag_names, "symmpo-fast", "mdpo"]
    _name = "mDPO"
    _paper = {
        "title": "mDPO: Conditional Preference Optimization for Multimodal Large Language Models",
        "id": "2406.11839",
        "citation": "@article{wang2024mdpo,\n"
                    "  title={mDPO: Conditional Preference Optimization for Multimodal Large Language Models},\n"
                    "  author={Wang, Fei and Zhou, Wenxuan and Huang, James Y and Xu, Nan and Zhang, Sheng and "
                    "Poon, Hoifung and Chen, Muhao},\n"
                    "  journal={arXiv preprint arXiv:2406.11839},\n  year={2024}\n}",
    }
