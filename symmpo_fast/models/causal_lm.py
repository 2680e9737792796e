"""Text-only causal LMs (any ``AutoModelForCausalLM``: Llama, Qwen2/Qwen3, Mistral, Gemma, ...):
DPO with one shared prefix (the prompt) and two responses per record through the fused head.

The packed rows go through the model's own ``forward`` with our position ids and tree mask
(transformers passes a 4-D mask or a ``BlockMask`` to the attention as it is) and
``logits_to_keep=1``; the decoder's output (after its final norm) is caught with a forward hook.
The head's options come from the config, as the model's own head applies them
(:class:`symmpo_fast.models.base.LogitTransform`): Gemma's ``final_logit_softcapping`` is the
fused head's ``softcap``; Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier`` and
Granite's ``logits_scaling`` its temperature.  mDPO and SymMPO need images and are refused by the collator.

Sliding-window attention (Gemma 2/3, Mistral) is not applied to a tree mask: packed rows stay
exact only while every sequence is within the window, which :meth:`CausalLMAdapter.check_rows`
enforces.
"""

from __future__ import annotations

import torch

from .base import Adapter, prepare


def _is_vision_language(config) -> bool:
    return any(hasattr(config, name) for name in ("vision_config", "vision_tower", "mm_vision_tower"))


class CausalLMAdapter(Adapter):
    """:class:`Adapter` for ``*ForCausalLM`` models with a ``model`` decoder and an ``lm_head``."""

    family = "causal_lm"
    has_images = False

    @staticmethod
    def accepts(model) -> bool:
        from transformers import PreTrainedModel

        return (isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM")
                and hasattr(model, "model") and hasattr(model, "lm_head") and not _is_vision_language(model.config))

    @classmethod
    def accepts_config(cls, config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not _is_vision_language(config)

    @classmethod
    def load(cls, name_or_path, dtype, device, attn_implementation=None, **kwargs):
        """``(model, tokenizer)``; the tokenizer is the "processor" of a text model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if attn_implementation is None:
            attn_implementation = "flex_attention" if device.type == "cuda" else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return prepare(model.to(device)), tokenizer

    @classmethod
    def load_processor(cls, name_or_path: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)

    @property
    def image_token_id(self) -> None:
        return None

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation


    def check_rows(self, rows) -> None:
        window = getattr(self.model.config, "sliding_window", None)
        longest = int(rows.position_ids.max()) + 1 if rows.position_ids.numel() else 0
        if window and longest > window:
            raise ValueError(f"a sequence of {longest} tokens is longer than the sliding window ({window}) of this "
                             "model, which a tree mask does not apply: use packing='padded' or a shorter max_length")

    def forward_kwargs(self, rows, images, attention_mask, image_index=None) -> dict:
        return dict(input_ids=rows.input_ids, attention_mask=attention_mask, position_ids=self.position_ids(rows),
                    logits_to_keep=1, use_cache=False)

    def sequence_kwargs(self, rows, images) -> dict:
        return dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask)

    def full_finetune_modules(self) -> list[torch.nn.Module]:
        return [self.model.model, self.model.lm_head]

    def lora_target_regex(self, modules: list[str]) -> str:
        return r".*\.(" + "|".join(modules) + r")$"
