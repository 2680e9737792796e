"""The adapter interface: what the packed forward needs from a model family (vision-language or text).

A new family (LLaVA-NeXT, InternVL, ...) is one file with one subclass of :class:`Adapter`, added
to ``ADAPTERS`` in :mod:`symmpo_fast.models`.  The packed forward
(:func:`symmpo_fast.layouts.sequence_logps`), with ``rows`` from :func:`symmpo_fast.packing.pack`::

    images = batch.images(device).select(rows.image_order)    # one image per prefix: 2 per SymMPO record
    hidden = adapter.hidden_states(model, rows, images, mask)  # [R, L, D], final norm applied
    # (with image_index=, each distinct image is encoded once: see image_feature_hook)
    weight, bias = adapter.output_head()                # to sf.token_logps / sf.fused_preference_loss

``hidden_states`` calls the model's own ``forward`` (through whatever wraps it: peft, DDP,
FSDP2, torch.compile, whose hooks must run) with the packed ids, the images
(:class:`symmpo_fast.data.Images`: pixels, and patch grids for dynamic-resolution families), the
position ids and the tree mask, asks it for (almost) no logits, and catches the language
model's output with a forward hook.  The model's forward places the image features at the
placeholders, in row-major order, one image after the other: hence ``image_order``.  The
official layout (``packing="none"``) calls the model on whole right-padded sequences with
:meth:`Adapter.sequence_kwargs` instead, the inputs its processor would give it, so that the
model derives its own positions there: the oracle the packed positions are tested against.

``mask`` follows :attr:`Adapter.attn_implementation`: a dense boolean ``[R, 1, L, L]`` for
``sdpa``, additive float for ``eager``, a FlexAttention ``BlockMask`` for ``flex_attention``;
transformers passes a 4-D mask or a ``BlockMask`` to the attention as it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


def prepare(model):
    """The step every model goes through, tiny or loaded: checks that an adapter exists and turns
    off the KV cache (a training forward has no use for it)."""
    from . import adapter_for

    adapter_for(model)
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    return model


def attn_implementations(language_model: str) -> dict[str, str]:
    """Per-part ``attn_implementation``: the requested one for the language model (it receives
    the tree masks), SDPA for the vision tower (plain full attention within each image)."""
    return {"": language_model, "text_config": language_model, "vision_config": "sdpa"}


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(scale * (h @ W.T + b) / softcap)`` (no tanh when ``softcap`` is None).

    :meth:`from_config` reads it from a model config the way TRL 1.16's fused head does
    (``trl.trainer.utils.add_fused_lm_head``), so a drop-in computes the same distribution.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> "LogitTransform":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        softcap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3
        # Multipliers, in TRL's order of precedence: Cohere's logit_scale, output_multiplier,
        # Falcon-H1's lm_head_multiplier; Granite / MiniCPM3 divide by logits_scaling, which
        # HyperCLOVA X multiplies by instead.
        scale = next((getattr(text, k) for k in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                      if getattr(text, k, None) is not None), None)
        if scale is None and getattr(text, "logits_scaling", None) is not None:
            scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
        scale = 1.0 if scale is None else float(scale)
        name = type(text).__name__
        if not scale > 0:
            raise ValueError(f"{name} declares a logit multiplier of {scale}: the fused head needs one > 0")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"{name}.final_logit_softcapping must be > 0 or None, got {softcap}")
        return cls(scale, None if softcap is None else float(softcap))

    @property
    def head_kwargs(self) -> dict[str, Any]:
        """``softcap`` and ``temperature`` for :func:`symmpo_fast.token_logps` and the fused loss,
        which divide by the temperature before the softcap: a multiplier is 1 / temperature."""
        return {"softcap": self.softcap, "temperature": 1.0 / self.scale}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits * self.scale if self.scale != 1.0 else logits
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap is not None else z


class Adapter:
    """Wraps one unwrapped model (no peft / DDP shell: the LoRA layers live inside its modules).

    A family also says how it is loaded (:meth:`accepts_config`, :meth:`load`) and which of its
    parts a trainer touches (:attr:`vision_tower`, :meth:`full_finetune_modules`,
    :meth:`lora_target_regex`), so that the trainer names no family.
    """

    family: str = ""
    """Short name, as the README and the error messages say it (``llava``, ``qwen2_5_vl``, ...)."""
    has_images: bool = True
    """False for text-only families: no image placeholder, no vision tower; DPO only."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def accepts(model) -> bool:
        """Whether this adapter handles ``model``."""
        raise NotImplementedError

    @classmethod
    def accepts_config(cls, config) -> bool:
        """Whether this family loads the checkpoint whose ``AutoConfig`` is ``config``."""
        raise NotImplementedError

    @classmethod
    def load(cls, name_or_path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None,
             **kwargs):
        """``(model, processor)`` of a checkpoint of this family (a Hub id or a local directory)."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, name_or_path: str):
        """The processor :meth:`load` returns, without the weights (``prepare-data``'s checks, TRL)."""
        raise NotImplementedError

    @property
    def vision_tower(self) -> torch.nn.Module | None:
        """The vision encoder (frozen by default; one FSDP unit), None for text-only families."""
        return None

    def full_finetune_modules(self) -> list[torch.nn.Module]:
        """What ``finetune=full`` trains: the language model, the projector, the LM head."""
        raise NotImplementedError

    # The defaults below are transformers 5's layout of a vision-language model
    # (``model.model.language_model``, ``config.image_token_id``): LLaVA's and Qwen-VL's.

    def lora_target_regex(self, modules: list[str]) -> str:
        """peft's ``target_modules`` regex for the named linear layers of the language model only
        (a vision tower's attention has ``q_proj`` / ``k_proj`` / ``v_proj`` too, Qwen2.5-VL's
        vision MLPs ``gate_proj`` / ``up_proj`` / ``down_proj``)."""
        return r".*language_model.*\.(" + "|".join(modules) + r")$"

    @property
    def image_token_id(self) -> int:
        """Placeholder id that image features replace in the input ids."""
        return self.model.config.image_token_id

    @property
    def attn_implementation(self) -> str:
        """The language model's attention implementation, which decides the mask's form."""
        return self.language_model.config._attn_implementation

    @property
    def language_model(self) -> torch.nn.Module:
        """The module whose output (``last_hidden_state`` or first element) is the hidden state
        after the final norm, ``[R, L, D]``."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the input embeddings: the dtype of an additive (eager) mask."""
        return self.model.get_input_embeddings().weight.dtype

    def position_ids(self, rows) -> torch.Tensor:
        """Position ids of the packed rows, ``[R, L]``.  Families with multi-axis rotary positions
        (Qwen2.5-VL's M-RoPE, ``[3, R, L]``) derive theirs from the same rows here."""
        return rows.position_ids

    def forward_kwargs(self, rows, images, attention_mask, image_index: torch.Tensor | None = None) -> dict:
        """Keyword arguments of the model's ``forward`` for ``rows`` (packed rows, or the official
        layout's :class:`symmpo_fast.packing.UnpackedRows` under ``packing="padded"``) and
        ``images`` (:class:`symmpo_fast.data.Images`).  ``image_index``: ``images`` holds each
        distinct image once and the placeholders show ``images.select(image_index)``, which the
        :meth:`image_feature_hook` in force makes of the features."""
        raise NotImplementedError

    def sequence_kwargs(self, rows, images) -> dict:
        """Keyword arguments of the model's ``forward`` for whole right-padded sequences (the
        official layout, ``rows`` an :class:`symmpo_fast.packing.UnpackedRows`): what the family's
        processor returns, so that the model computes its positions itself."""
        return dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask, pixel_values=images.pixel_values)

    def check_rows(self, rows) -> None:
        """Raise where the packed ``rows`` would not be exact for this model (e.g. longer than a
        sliding window that a tree mask does not apply)."""

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's ``weight [V, D]`` and ``bias [V]`` (or None): the model's output embeddings."""
        head = self.model.get_output_embeddings()
        if hasattr(head, "base_layer"):
            raise NotImplementedError("a LoRA adapter on lm_head is not supported by the fused head: "
                                      "leave lm_head out of target_modules (or train it fully)")
        return head.weight, head.bias

    @property
    def logit_transform(self) -> LogitTransform:
        """What the model's own head does to its logits (soft-capping, a multiplier), read from
        its config as TRL reads it; the fused head applies the same."""
        return LogitTransform.from_config(self.model.config)

    @property
    def logit_softcap(self) -> float | None:
        """``softcap`` of the fused head."""
        return self.logit_transform.softcap

    @property
    def logit_temperature(self) -> float:
        """``temperature`` of the fused head: 1 / the model's logit multiplier."""
        return self.logit_transform.head_kwargs["temperature"]

    def image_feature_hook(self, index: torch.Tensor):
        """A context manager under which the model, given each distinct image once, hands the
        language model the features of the images ``index`` (one entry per placeholder image,
        in order); None where the family cannot, and the images are then repeated before the
        vision tower.  Lets an image that several prefixes of a batch share go through the
        vision tower once."""
        return None

    def hidden_states(self, model, rows, images, attention_mask,
                      image_index: torch.Tensor | None = None) -> torch.Tensor:
        """``[R, L, D]`` final hidden states of ``rows``, from ``model``'s own forward.

        ``images``: :class:`symmpo_fast.data.Images`.  ``image_index``: the images of the rows'
        placeholders, in order, are ``images.select(image_index)``; each distinct one is encoded
        once where the family has an :meth:`image_feature_hook`."""
        caught = []

        def catch(module, args, out):
            caught.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

        expand = None
        if image_index is not None:
            expand = self.image_feature_hook(image_index)
            if expand is None:
                images, image_index = images.select(image_index), None
        handle = self.language_model.register_forward_hook(catch)
        try:
            with expand if expand is not None else contextlib.nullcontext():
                model(**self.forward_kwargs(rows, images, attention_mask, image_index))
        finally:
            handle.remove()
        if len(caught) != 1:
            raise RuntimeError(f"the language model ran {len(caught)} times in one forward; expected once")
        return caught[0]
