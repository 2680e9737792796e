"""The one configuration of a training run: a dataclass whose fields carry their documentation.

Read from YAML (``TrainConfig.from_yaml``) with ``--field-name value`` command-line overrides
(``add_arguments`` / ``from_args``); ``symmpo-fast train --help`` prints every field with its
help text and default.  A run writes the config it used to ``DIR/config.yaml``, which reads back
to an equal config, less ``resume`` and ``overwrite``: how a run was started is not what it
trains, and a config.yaml holding ``overwrite: true`` would make a requeue script that trains from
it delete the run it meant to continue.  A ``--resume`` or ``--overwrite`` on the command line
replaces both of a config file's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..images import MAX_ASPECT_RATIO, MAX_PIXELS, ImagePolicy
from ..objectives import ObjectiveConfig

# ObjectiveConfig fields that a run may override on top of the objective's preset.
# How to start a run, not what it trains: never written to config.yaml, never compared on resume.
RUN_ACTIONS = ("resume", "overwrite")
_OBJECTIVE_FIELDS = ("beta", "dpo_weight", "copo_weight", "pair_weight", "margin_weight", "anchor_weight",
                     "anchor_delta", "anchor_contrast", "average_logps")


def _f(default, help: str, choices: tuple | None = None, group: str = "run"):
    meta = {"help": help, "group": group}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a training run reads; see ``symmpo-fast train --help``."""

    # --- run -----------------------------------------------------------------------------------
    output_dir: str = _f("runs/symmpo", "Directory for metrics.jsonl, checkpoints/, the final model and plots.")
    seed: int = _f(0, "Seed of the data order, the model's random init (tiny) and every RNG.")
    max_steps: int = _f(0, "Optimizer steps to run; 0 means num_epochs passes over the data.")
    num_epochs: float = _f(1.0, "Passes over the training data when max_steps is 0.")
    resume: bool = _f(False, "Continue from the newest intact checkpoint in output_dir/checkpoints (from scratch "
                      "when there is none yet); only the settings listed in docs/reliability.md may change.")
    overwrite: bool = _f(False, "Delete what a previous run left in output_dir (config.yaml, metrics, checkpoints, "
                         "final model) and start over; without it or resume, such a directory is refused.")

    # --- model ---------------------------------------------------------------------------------
    model: str = _f("tiny", "A checkpoint of a supported family (a Hub name or a local path: LLaVA-1.5 in the "
                    "llava-hf layout, e.g. llava-hf/llava-1.5-7b-hf; Qwen2.5-VL, Qwen2-VL, Qwen3-VL; any text "
                    "AutoModelForCausalLM for DPO), an exported run, or a tiny random-init model: 'tiny' (the demo's "
                    "LLaVA), tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-qwen2-vl, tiny-llama, tiny-qwen2, tiny-gemma2.",
                    group="model")
    finetune: str = _f("lora", "'lora' (peft adapters on the language model) or 'full' (language model and "
                       "projector).", choices=("lora", "full"), group="model")
    lora_r: int = _f(128, "LoRA rank.", group="model")
    lora_alpha: int = _f(256, "LoRA alpha (scale alpha / r).", group="model")
    lora_dropout: float = _f(0.05, "LoRA dropout.", group="model")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "Linear layers of the language model that get LoRA adapters.", group="model")
    train_vision_tower: bool = _f(False, "Also train the vision tower (frozen by default, as in the papers).",
                                  group="model")
    gradient_checkpointing: bool = _f(False, "Recompute decoder activations in the backward (less memory).",
                                      group="model")
    dtype: str = _f("auto", "Parameter dtype: 'auto' is bfloat16 on CUDA and float32 on the CPU.",
                    choices=("auto", "float32", "bfloat16"), group="model")
    liger: bool = _f(True, "Liger-Kernel's RMSNorm / RoPE / SwiGLU for the language model (CUDA only; ignored on "
                     "the CPU or when liger-kernel is not installed).", group="model")
    packing: str = _f("shared_prefix", "'shared_prefix': one prompt per image shared by its responses; 'padded': one "
                      "row per sequence, fused head (any attention implementation); 'none': one row per sequence, "
                      "full logits (the official code's layout).", choices=("shared_prefix", "padded", "none"),
                      group="model")
    backend: str = _f("auto", "Backend of the fused head and loss.", choices=("auto", "triton", "csrc", "torch",
                                                                            "reference"), group="model")

    # --- objective -----------------------------------------------------------------------------
    objective: str = _f("symmpo", "Preference objective preset.", choices=("symmpo", "mdpo", "dpo"),
                        group="objective")
    beta: float | None = _f(None, "Override of the preset's beta (reward scale).", group="objective")
    dpo_weight: float | None = _f(None, "Override of the DPO term's weight.", group="objective")
    copo_weight: float | None = _f(None, "Override of mDPO's conditional (CoPO) term's weight.", group="objective")
    pair_weight: float | None = _f(None, "Override of SymMPO's lambda (pair terms).", group="objective")
    margin_weight: float | None = _f(None, "Override of SymMPO's gamma (margin consistency).", group="objective")
    anchor_weight: float | None = _f(None, "Override of eta (anchor term).", group="objective")
    anchor_delta: float | None = _f(None, "Override of delta (anchor threshold).", group="objective")
    anchor_contrast: bool | None = _f(None, "Override: also anchor y_w' given m'.", group="objective")
    average_logps: bool | None = _f(None, "Override: mean instead of sum of response token log-probs.",
                                    group="objective")
    reference: str = _f("auto", "Reference model: 'adapter' (the LoRA model with adapters off), 'copy' (a frozen "
                        "copy), 'cache' (log-probs written by precompute-ref), 'dataset' (the official parquet's "
                        "logps column); 'auto' is adapter for LoRA, copy for full fine-tuning.",
                        choices=("auto", "adapter", "copy", "cache", "dataset"), group="objective")
    ref_cache: str = _f("", "Reference cache directory for reference=cache (default output_dir/ref_cache).",
                        group="objective")

    # --- data ----------------------------------------------------------------------------------
    data: str = _f("synthetic", "Training data: a SymMPO parquet file or directory, an mDPO .json, a .jsonl in "
                   "our field names, 'hf:NAME[:SPLIT]' or a saved `datasets` directory, or 'synthetic'.",
                   group="data")
    data_format: str = _f("auto", "Reader of `data`; 'auto' picks from the path.",
                          choices=("auto", "symmpo_parquet", "mdpo_json", "jsonl", "hf", "synthetic"), group="data")
    image_root: str = _f("", "Directory that relative image paths are resolved against (default: the data "
                         "file's directory).", group="data")
    eval_data: str = _f("", "Held-out data for `eval` and periodic evaluation ('synthetic' = the held-out split "
                        "that breaks the language prior); empty for none.", group="data")
    max_records: int = _f(0, "Use at most this many training records (0: all).", group="data")
    skip_bad_records: bool = _f(False, "Skip and count records that fail validation instead of stopping.",
                                group="data")
    max_image_pixels: int = _f(MAX_PIXELS, "Largest image in pixels (width x height); JPEGs above it are decoded "
                               "at 1/2, 1/4 or 1/8 scale, other formats are bad records.", group="data")
    max_image_aspect_ratio: float = _f(MAX_ASPECT_RATIO, "Widest (or tallest) image shape, long side / short side; "
                                       "thinner images are bad records (a processor resizing the short side would "
                                       "blow them up).", group="data")
    allow_outside_image_root: bool = _f(False, "Read image paths that leave the image root (absolute paths, '..', "
                                        "symbolic links out of it); refused by default.", group="data")
    max_length: int = _f(2048, "Longest sequence (prompt + image tokens + response) in tokens.", group="data")
    truncation: str = _f("drop", "A record longer than max_length: 'drop' it, cut its question ('question'), or cut "
                         "each sequence on the right ('right', the official code's: the response loses its tail); "
                         "all are counted.", choices=("drop", "question", "right"), group="data")
    prompt_format: str = _f("auto", "How a question and answer become token ids: 'llava_v1' (the official LLaVA-1.5 / "
                            "SymMPO training input), 'chat_template' (the processor's own template); 'auto' is the "
                            "model family's official one. A record whose prompt already holds the conversation "
                            "(mDPO's JSON) is used as written.", choices=("auto", "llava_v1", "chat_template"),
                            group="data")
    system_prompt: str | None = _f(None, "Replaces the prompt format's system text (llava_v1: the official one; "
                                   "chat_template: the template's own default, if it has one).", group="data")
    mdpo_crop: str = _f("seeded", "mDPO's cropped image m_l: 'seeded' (one crop of the raw image per record and seed, "
                        "the same every epoch, so a reference cache can hold it) or 'official' (a new random resized "
                        "crop of the processed image on every forward, policy and reference apart, as mDPO's code).",
                        choices=("seeded", "official"), group="data")
    synthetic_records: int = _f(512, "Training records of the synthetic task.", group="data")
    synthetic_eval_records: int = _f(128, "Held-out records of the synthetic task.", group="data")
    num_workers: int = _f(0, "DataLoader worker processes that decode images and collate.", group="data")

    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float = _f(5e-6, "Peak learning rate (AdamW).", group="optim")
    weight_decay: float = _f(0.0, "AdamW weight decay.", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1.", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2.", group="optim")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant"),
                           group="optim")
    warmup_ratio: float = _f(0.05, "Share of max_steps spent warming the learning rate up linearly from 0.",
                             group="optim")
    global_batch_size: int = _f(128, "Records per optimizer step, summed over processes and accumulation.",
                                group="optim")
    micro_batch_size: int = _f(1, "Records per forward/backward on one process; lower it when out of memory "
                               "(accumulation keeps global_batch_size).", group="optim")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: no clipping).", group="optim")
    max_bad_steps: int = _f(3, "Stop after this many consecutive steps with a non-finite loss or gradient.",
                            group="optim")

    # --- distributed, checkpoints, logging -----------------------------------------------------
    parallel: str = _f("auto", "Under torchrun: 'fsdp' (FSDP2 fully_shard), 'ddp', or 'auto' (fsdp when more than "
                       "one process).", choices=("auto", "fsdp", "ddp"), group="distributed")
    save_steps: int = _f(0, "Checkpoint every this many steps (0: only at the end).", group="checkpoint")
    keep_checkpoints: int = _f(2, "Keep the newest this many checkpoints.", group="checkpoint")
    eval_steps: int = _f(0, "Evaluate on eval_data every this many steps (0: never during training).",
                         group="checkpoint")
    tensorboard: bool = _f(True, "Also log to TensorBoard under output_dir/tensorboard when it is installed.",
                           group="checkpoint")
    progress: bool = _f(True, "Show a progress bar.", group="checkpoint")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _base_type(hints[f.name]) is float and v is not None and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, meaning in _NON_NEGATIVE.items():
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 ({meaning}), got {getattr(self, name)}")
        for name, (low, high) in _RANGES.items():
            if not low <= getattr(self, name) < high:
                raise ValueError(f"{name} must be in [{low}, {high}), got {getattr(self, name)}")
        if self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0, got {self.num_epochs}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                             "overwrite deletes it")
        if self.reference == "adapter" and self.finetune != "lora":
            raise ValueError("reference=adapter needs finetune=lora (the reference is the model with adapters off); "
                             "use reference=copy or cache for full fine-tuning")
        if self.reference_mode == "dataset" and self.objective == "mdpo":
            raise ValueError("reference=dataset: the official parquet's logps are SymMPO's columns, whose column 3 is "
                             "y_w given m', and mDPO's is y_w given the crop m_l: use reference=adapter, copy or cache")
        if self.reference_mode == "dataset" and self.truncation == "question":
            raise ValueError("reference=dataset: the official logps are of sequences cut only on the right, as "
                             "truncation=right (or drop) cuts them; truncation=question cuts the question instead: use "
                             "truncation=right or drop, or reference=adapter, copy or cache")
        if self.mdpo_crop == "official" and self.objective == "mdpo" and self.reference_mode in ("cache", "dataset"):
            raise ValueError("mdpo_crop=official draws a new crop on every forward, so no stored reference log-prob "
                             "matches it: use reference=adapter or copy, or mdpo_crop=seeded")
        self.objective_config()  # fail early on an invalid objective

    # ------------------------------------------------------------------------------------------
    def objective_config(self) -> ObjectiveConfig:
        """The preset named by ``objective`` with the fields set here overriding it."""
        overrides = {k: getattr(self, k) for k in _OBJECTIVE_FIELDS if getattr(self, k) is not None}
        return ObjectiveConfig.preset(self.objective, **overrides)

    @property
    def reference_mode(self) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.finetune == "lora" else "copy"

    def collator_kwargs(self, evaluation: bool = False) -> dict:
        """The :class:`symmpo_fast.data.PreferenceCollator` options this run sets; ``evaluation``:
        those of held-out evaluation, whose crops m_l are always the seeded ones (the same numbers
        every time, and no draw from the training run's random stream)."""
        return dict(max_length=self.max_length, truncation=self.truncation, seed=self.seed,
                    prompt_format=self.prompt_format, system_prompt=self.system_prompt,
                    mdpo_crop="seeded" if evaluation else self.mdpo_crop)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Every field but :data:`RUN_ACTIONS` (see the module docstring)."""
        text = yaml.safe_dump({k: v for k, v in self.to_dict().items() if k not in RUN_ACTIONS}, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config is a mapping of field: value, got {type(values).__name__}")
        try:
            return cls.from_dict({**values, **overrides})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(self.max_image_pixels, self.allow_outside_image_root, self.max_image_aspect_ratio)

    def resume_changes(self, saved: dict, where: str, recorded_only: bool = False) -> list[str]:
        """How this config differs from ``saved``, the settings a checkpoint was written with: one
        line per change that :data:`RESUME_MAY_CHANGE` allows (and the loop applies); a change of
        any other field raises, naming every one.  A field ``saved`` lacks (written before the
        field existed) counts as its default.  ``recorded_only`` (a checkpoint of the trainer
        before hashes, which recorded a few settings and no data fingerprint): only the fields
        ``saved`` holds are compared, and the data's may not change, since their records cannot
        be compared."""
        applied, refused = [], []
        if recorded_only:  # what that trainer did where it recorded nothing: its prompt was the chat template
            saved = {**_BEFORE_RECORDING, **saved}
        for f in dataclasses.fields(self):
            if recorded_only and f.name not in saved:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            old, new = saved.get(f.name, default), getattr(self, f.name)
            if old == new or f.name in RUN_ACTIONS:
                continue
            change = f"{f.name} {old!r} -> {new!r}"
            if f.name in RESUME_MAY_CHANGE and not (recorded_only and RESUME_MAY_CHANGE[f.name] == _SAME_DATA):
                applied.append(f"{change}: {RESUME_MAY_CHANGE[f.name]}" if RESUME_MAY_CHANGE[f.name] else change)
            else:
                refused.append(change)
        if refused:
            raise ValueError(f"{where} was written with other settings ({'; '.join(refused)}), which a resumed run "
                             f"may not change (only {', '.join(sorted(RESUME_MAY_CHANGE))} may): resume with the "
                             "run's own config.yaml, or pass --overwrite to start over")
        return applied


# Every positive / non-negative count, every bounded float: validated with the field's name.
_POSITIVE = ("global_batch_size", "micro_batch_size", "max_length", "keep_checkpoints", "max_bad_steps", "lora_r",
             "lora_alpha", "synthetic_records", "synthetic_eval_records", "max_image_pixels", "max_image_aspect_ratio")
_NON_NEGATIVE = {"max_steps": "0: num_epochs passes", "max_records": "0: all records",
                 "save_steps": "0: only at the end", "eval_steps": "0: never during training",
                 "num_workers": "0: load in the training process", "learning_rate": "a step size",
                 "weight_decay": "a decay rate", "max_grad_norm": "0: no clipping"}
_RANGES = {"warmup_ratio": (0, 1), "lora_dropout": (0, 1), "adam_beta1": (0, 1), "adam_beta2": (0, 1)}

# Settings that did not exist when a checkpoint of the trainer before hashes was written, at the
# value that trainer used: a resume must keep them (its default "auto" now means llava_v1 for LLaVA).
_BEFORE_RECORDING = {"prompt_format": "chat_template"}

_SAME_DATA = "the data read must be the same records (checked by content fingerprint)"
_SPEED = "speed and memory only"
# What may differ between a run and its --resume, and what the resumed run does with it.  Every
# other field must equal the checkpoint's: checked before any checkpoint is loaded or file written.
RESUME_MAY_CHANGE = {
    "max_steps": "the schedule is recomputed over the new total, so the resumed steps get the learning rate "
                 "an uninterrupted run of that length has at the same step",
    "num_epochs": "as max_steps",
    "learning_rate": "the new peak, applied from the resumed step on along the same schedule",
    "max_grad_norm": "applied from the resumed step on",
    "max_bad_steps": "applied from the resumed step on",
    "save_steps": "", "keep_checkpoints": "", "eval_steps": "", "eval_data": "", "synthetic_eval_records": "",
    "micro_batch_size": "gradient accumulation changes, the global batch does not",
    "parallel": "the checkpoint's layout must fit (an FSDP checkpoint needs FSDP and its number of processes)",
    "gradient_checkpointing": _SPEED, "liger": _SPEED, "backend": _SPEED, "packing": _SPEED, "num_workers": _SPEED,
    "progress": "", "tensorboard": "", "output_dir": "", "ref_cache": "",
    "data": _SAME_DATA, "data_format": _SAME_DATA, "image_root": _SAME_DATA, "max_records": _SAME_DATA,
    "skip_bad_records": _SAME_DATA, "synthetic_records": _SAME_DATA, "max_image_pixels": _SAME_DATA,
    "allow_outside_image_root": _SAME_DATA, "max_image_aspect_ratio": _SAME_DATA,
}


# ----------------------------------------------------------------------------------------------
# command line


def _base_type(tp):
    """The non-None type of ``X | None`` annotations."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _coerce(cls, name: str, value):
    """YAML values to the field's type (YAML reads 5e-6 as a string; ints are fine as floats)."""
    hints = typing.get_type_hints(cls)
    tp = _base_type(hints[name])
    if value is None:
        return None
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if tp in (int, bool, str, list) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {tp.__name__}, got {value!r}")
    return value


def _parse_optional_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One ``--field-name`` option per field, grouped, with the field's help and default."""
    parser.add_argument("--config", help="YAML file of field: value; options given here override it.")
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "run")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, optional = _base_type(hints[f.name]), type(None) in typing.get_args(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        shown = "preset" if default is None else (",".join(default) if isinstance(default, list) else default)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if tp is bool and not optional:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is bool:
            group.add_argument(flag, type=_parse_optional_bool, metavar="BOOL", **kw)
        elif tp is list:
            group.add_argument(flag, type=lambda s: [v.strip() for v in s.split(",") if v.strip()], metavar="A,B",
                               **kw)
        else:
            group.add_argument(flag, type=tp, choices=f.metadata.get("choices"), **kw)


def from_args(args: argparse.Namespace, cls=TrainConfig) -> TrainConfig:
    """The config of ``--config FILE`` (or the defaults) with every option given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if any(k in overrides for k in RUN_ACTIONS):  # the command line says how to start, whatever the file says
        overrides = {**{k: False for k in RUN_ACTIONS}, **overrides}
    if getattr(args, "config", None):
        return cls.from_yaml(args.config, **overrides)
    return cls.from_dict(overrides)
