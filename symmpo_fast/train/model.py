"""The policy, the reference and the root module a training step calls.

Precision: on CUDA the frozen weights are bfloat16 and the trained ones float32 (the optimizer
updates master weights: a 5e-6 step is below bfloat16's resolution for most weights), the
forward runs under bfloat16 autocast, or under FSDP2 with a bfloat16 gather policy.  On the CPU
everything is float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..layouts import forward_preference, reference_logps, sequence_logps
from ..models import TINY_MODELS, adapter_for, build_tiny, load_model, unwrap
from ..objectives import ObjectiveConfig
from .config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[cfg.dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast when the compute dtype asks for it; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class PreferenceModule(nn.Module):
    """The root of a training step: its ``forward`` runs the whole loss.

    FSDP2 unshards a parameter only inside the forward of the module it was sharded with; the
    LM head and embeddings belong to this root, so computing the fused loss inside this forward
    (and not by reading ``lm_head.weight`` from outside) is what makes it work under FSDP2.

    ``forward(batch, ref_logps)`` -> ``(loss, metrics)``; ``mode="reference"`` returns the
    reference log-probs (LoRA adapters off), ``mode="logps"`` the policy's, both ``[B, 5]``.
    """

    def __init__(self, model: nn.Module, objective: ObjectiveConfig, packing: str = "shared_prefix",
                 backend: str = "auto"):
        super().__init__()
        self.model = model
        self.objective, self.packing, self.backend = objective, packing, backend

    def forward(self, batch, ref_logps: torch.Tensor | None = None, mode: str = "loss"):
        average = self.objective.average_logps
        if mode == "reference":
            return reference_logps(self.model, batch, self.packing, self.backend, average=average)
        if mode == "logps":
            return sequence_logps(self.model, batch, self.packing, self.backend, average=average)
        return forward_preference(self.model, batch, self.objective, ref_logps, self.packing, self.backend)


@dataclass
class Models:
    policy: nn.Module
    processor: object
    reference: nn.Module | None  # the frozen copy for reference=copy
    dtype: torch.dtype  # compute dtype
    fingerprint: str  # of the weights the reference uses (the base model)


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every non-LoRA weight's name, shape, dtype and summary statistics.

    Cheap on a 7B model (a few reductions per tensor, on its device) and different for any other
    checkpoint or any trained weights; it is a change detector, not a cryptographic digest.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if "lora_" in name:
                continue
            t = (p.to_local() if hasattr(p, "to_local") else p).detach().double().flatten()
            stats = torch.stack([t.sum(), t.abs().sum(), (t * t).sum()]).tolist() + t[:4].tolist() + t[-4:].tolist()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{[round(s, 6) for s in stats]}".encode())
    return h.hexdigest()


def _check_path(name: str) -> None:
    path = Path(name)
    if name not in TINY_MODELS and not path.is_dir() and (name.count("/") > 1 or name.startswith((".", "/", "~"))
                                                          or path.exists()):
        raise FileNotFoundError(
            f"model {name!r} is a path (not a tiny model {sorted(TINY_MODELS)}, not a Hub id like "
            f"'llava-hf/llava-1.5-7b-hf') but no such directory exists here; runs write theirs under output_dir "
            f"(`symmpo-fast demo` writes runs/demo/sft, which configs/demo.yaml starts from)")


def model_has_images(name: str) -> bool:
    """Whether model ``name`` (a tiny model, a Hub id, a directory, an exported run) is a
    vision-language model, read from its config without loading weights."""
    from transformers import AutoConfig

    from ..models import ADAPTERS, TINY_TEXT_MODELS

    if name in TINY_MODELS:
        return name not in TINY_TEXT_MODELS
    _check_path(name)
    if (Path(name) / "adapter_config.json").exists():
        return model_has_images(TrainConfig.from_yaml(Path(name) / "train_config.yaml").model)
    config = AutoConfig.from_pretrained(name)
    for cls in ADAPTERS:
        if cls.accepts_config(config):
            return cls.has_images
    raise ValueError(f"{name}: model type {config.model_type!r} is not a supported family; supported: "
                     f"{[cls.family for cls in ADAPTERS]}")


def load_base(name: str, seed: int, device: torch.device, dtype: torch.dtype):
    """``(model, processor)`` of a tiny model, a Hub name, or a directory (a full checkpoint or an exported run)."""
    if name in TINY_MODELS:
        model, processor = build_tiny(name, seed=seed)
        return model.to(device=device, dtype=dtype), processor
    _check_path(name)
    path = Path(name)
    if (path / "adapter_config.json").exists():
        return load_exported_lora(path, device, dtype)
    return load_model(name, dtype=dtype, device=device)


def load_exported_lora(path: Path, device: torch.device, dtype: torch.dtype):
    """An exported LoRA run (``DIR/final``): its base, rebuilt from the run's config, plus the adapters merged in."""
    from peft import PeftModel

    run_cfg = TrainConfig.from_yaml(path / "train_config.yaml")
    base, processor = load_base(run_cfg.model, run_cfg.seed, device, dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload(), processor


def _load_dtype(cfg: TrainConfig, dtype: torch.dtype) -> torch.dtype:
    """Trained weights stay float32 (see the module docstring); LoRA leaves the base frozen, so
    its weights can live in the compute dtype."""
    return dtype if cfg.finetune == "lora" else torch.float32


def build(cfg: TrainConfig, device: torch.device) -> Models:
    """The policy (LoRA-wrapped or fully trainable), its processor and, for reference=copy, a frozen copy."""
    dtype = compute_dtype(cfg, device)
    model, processor = load_base(cfg.model, cfg.seed, device, _load_dtype(cfg, dtype))
    fingerprint = weights_fingerprint(model)
    model.requires_grad_(False)
    reference = None
    if cfg.reference_mode == "copy":
        reference = copy.deepcopy(model).to(dtype=dtype).eval()

    base = unwrap(model)
    adapter = adapter_for(base)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=adapter.lora_target_regex(cfg.lora_target_modules))
        model = get_peft_model(model, lora)  # adapters are created float32 and trainable
    else:
        for module in adapter.full_finetune_modules():
            module.requires_grad_(True)
    if cfg.train_vision_tower:
        if cfg.finetune == "lora":
            raise ValueError("train_vision_tower needs finetune=full: with LoRA the reference is the base model, "
                             "which a trained vision tower would change")
        if adapter.vision_tower is None:
            raise ValueError(f"train_vision_tower: a {adapter.family} model has no vision tower")
        adapter.vision_tower.requires_grad_(True)

    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with FSDP2's hooks.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.liger and device.type == "cuda":
        _apply_liger(base)
    model.train()
    return Models(model, processor, reference, dtype, fingerprint)


def build_reference(cfg: TrainConfig, device: torch.device):
    """``(model, processor, dtype, fingerprint)``: the frozen base a run starts from, for precompute-ref."""
    dtype = compute_dtype(cfg, device)
    # Loaded exactly as `build` loads it, so that the fingerprints match.
    model, processor = load_base(cfg.model, cfg.seed, device, _load_dtype(cfg, dtype))
    fingerprint = weights_fingerprint(model)
    model.to(dtype).requires_grad_(False).eval()
    return model, processor, dtype, fingerprint


def _apply_liger(base: nn.Module) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU in the language model (the head is ours, fused already)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        warnings.warn("liger=true but liger-kernel is not installed: pip install liger-kernel; continuing without it")
        return
    lm = adapter_for(base).language_model
    try:
        _apply_liger_kernel_to_instance(model=lm, cross_entropy=False, fused_linear_cross_entropy=False)
    except (TypeError, ValueError, NotImplementedError) as e:
        warnings.warn(f"Liger kernels not applied to {type(lm).__name__}: {e}")


def export(policy: nn.Module, processor, cfg: TrainConfig, out: Path, state_dict: dict | None = None) -> Path:
    """The trained model in the Hugging Face layout: LoRA adapters (peft) or the full model, plus the processor.

    ``state_dict`` is the gathered full state dict under FSDP (keys relative to ``policy``).
    """
    out.mkdir(parents=True, exist_ok=True)
    if cfg.finetune == "lora":
        policy.save_pretrained(str(out), state_dict=state_dict)
    else:
        unwrap(policy).save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(str(out))
    cfg.to_yaml(out / "train_config.yaml")
    return out
