"""Model families: one adapter per family (a file of its own), the registry that picks one, and
the shells (peft, DDP, torch.compile) around a model.

    model, processor = build_tiny_llava()                       # or load_llava("llava-hf/llava-1.5-7b-hf")
    model, processor = load_model("Qwen/Qwen2.5-VL-7B-Instruct", torch.bfloat16, "cuda")   # family from the config
    model, processor = build_tiny("tiny-qwen3-vl")              # any key of TINY_MODELS
    adapter = adapter_for(model)                                 # the family's Adapter

Families: LLaVA-1.5 (``llava.py``), Qwen2.5-VL and Qwen2-VL (``qwen2_5_vl.py``), Qwen3-VL (``qwen3_vl.py``),
text-only causal LMs (``causal_lm.py``, DPO).

The forward layouts of a preference batch (``shared_prefix``, ``padded``, ``none``) live in
:mod:`symmpo_fast.layouts`; their functions are also importable from here under their old names
(``symmpo_fast.models.sequence_logps``, ``reference_logps``, ``forward_preference``).  A new
family is one file with one :class:`Adapter` subclass, listed in :data:`ADAPTERS`.
"""

from __future__ import annotations

import importlib

import torch

from .base import Adapter
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter, load_llava
from .qwen2_5_vl import Qwen2_5_VLAdapter, load_qwen_vl
from .qwen3_vl import Qwen3VLAdapter
from .tiny import build_tiny_llava, load_processor
from .tiny_qwen import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, build_tiny_qwen3_vl
from .tiny_text import FAMILIES as _TEXT_FAMILIES
from .tiny_text import build_tiny_text

__all__ = [
    "Adapter", "LlavaAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "CausalLMAdapter", "ADAPTERS", "TINY_MODELS",
    "TINY_TEXT_MODELS", "adapter_for", "unwrap", "find_peft", "build_tiny", "build_tiny_llava",
    "build_tiny_qwen2_5_vl", "build_tiny_qwen2_vl", "build_tiny_qwen3_vl", "build_tiny_text", "load_model",
    "load_processor_for",
    "load_processor", "load_llava", "load_qwen_vl", "sequence_logps", "reference_logps", "forward_preference",
    "PACKINGS",
]

# Vision-language families first: a text-only adapter would not know what to do with their images.
ADAPTERS: list[type[Adapter]] = [LlavaAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, CausalLMAdapter]
_LAYOUT_NAMES = ("sequence_logps", "reference_logps", "forward_preference", "PACKINGS")


def _shells(model):
    """``model`` and the models inside its peft / torch.compile / DDP shells, outermost first."""
    while model is not None:
        yield model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            model = None


def unwrap(model):
    """The model inside peft, ``torch.compile`` and DDP shells (LoRA layers stay inside it)."""
    *_, inner = _shells(model)
    return inner


def find_peft(model):
    """The peft model among ``model``'s shells, or None."""
    return next((m for m in _shells(model) if hasattr(m, "disable_adapter")), None)


def adapter_for(model) -> Adapter:
    base = unwrap(model)
    for cls in ADAPTERS:
        if cls.accepts(base):
            return cls(base)
    raise TypeError(f"no adapter for {type(base).__name__}; supported: {[a.__name__ for a in ADAPTERS]}")


TINY_TEXT_MODELS = tuple(_TEXT_FAMILIES)
TINY_MODELS = {"tiny": build_tiny_llava, "tiny-qwen2-vl": build_tiny_qwen2_vl, "tiny-qwen2.5-vl": build_tiny_qwen2_5_vl,
               "tiny-qwen3-vl": build_tiny_qwen3_vl,
               **{name: (lambda seed=0, _n=name: build_tiny_text(_n, seed=seed)) for name in _TEXT_FAMILIES}}
"""Random-init models built from configs (tests, the demo): ``--model tiny`` is the tiny LLaVA,
``--model tiny-qwen2.5-vl`` / ``tiny-qwen3-vl`` (and ``tiny-qwen2-vl``) the tiny Qwen-VLs,
``tiny-llama`` / ``tiny-qwen2`` / ``tiny-gemma2`` the text LMs of :mod:`.tiny_text`."""


def build_tiny(name: str, seed: int = 0):
    """``(model, processor)`` of the tiny model ``name`` (a key of :data:`TINY_MODELS`)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_MODELS)}")
    return TINY_MODELS[name](seed=seed)


def load_model(name_or_path: str, dtype: torch.dtype, device, attn_implementation: str | None = None, **kwargs):
    """``(model, processor)`` of any supported checkpoint: the family is read from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    for cls in ADAPTERS:
        if cls.accepts_config(config):
            return cls.load(name_or_path, dtype, torch.device(device), attn_implementation, **kwargs)
    raise ValueError(f"{name_or_path}: model type {config.model_type!r} is not a supported family; supported: "
                     f"{[cls.family for cls in ADAPTERS]}")


def load_processor_for(name_or_path: str):
    """The processor of any supported model (a tiny one, a Hub id, a directory) as its family's
    loader gives it (LLaVA-1.5: the PIL CLIP image processor; Qwen-VL: no video processor; a
    text model: its tokenizer), without loading the weights."""
    from transformers import AutoConfig

    if name_or_path in TINY_MODELS:
        return build_tiny(name_or_path)[1]
    config = AutoConfig.from_pretrained(name_or_path)
    for cls in ADAPTERS:
        if cls.accepts_config(config):
            return cls.load_processor(name_or_path)
    raise ValueError(f"{name_or_path}: model type {config.model_type!r} is not a supported family; supported: "
                     f"{[cls.family for cls in ADAPTERS]}")


def __getattr__(name: str):
    # The layouts import this registry, so they are loaded on first use rather than at import.
    if name in _LAYOUT_NAMES:
        return getattr(importlib.import_module("..layouts", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
