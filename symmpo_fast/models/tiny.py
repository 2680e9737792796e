"""A tiny random-init LLaVA-1.5 for tests and the demo: no download, built from configs.

Same architecture as ``llava-hf/llava-1.5-7b-hf`` (CLIP vision tower, 2-layer GELU projector,
Llama language model, ``vision_feature_layer=-2``, CLS dropped), scaled down: 32 x 32 images in
8 x 8 patches -> 16 image tokens, hidden 64, 2 layers, a 1000-token byte-level BPE tokenizer
shipped in ``symmpo_fast/assets/tokenizer/`` (see ``assets/build_tokenizer.py``).

    model, processor = build_tiny_llava(seed=0)                    # fp32, CPU, SDPA
    model, processor = build_tiny_llava(image_size=96, hidden_size=256)   # larger geometry
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny model; any field can be overridden by name in :func:`build_tiny_llava`."""

    image_size: int = 32
    """Side of the square image the vision tower sees (the processor resizes and crops to it)."""
    patch_size: int = 8
    """CLIP patch side: (image_size / patch_size)**2 image tokens per image."""
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    """At least 2: LLaVA-1.5 takes the features of the second-to-last layer."""
    vision_heads: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Fewer than the query heads, so grouped-query attention is exercised."""
    max_position_embeddings: int = 4096
    attn_implementation: str = "sdpa"
    """Of the language model: ``sdpa`` (dense masks), ``eager`` or ``flex_attention`` (CUDA)."""
    dtype: torch.dtype = torch.float32


def load_processor(image_size: int = 32, patch_size: int = 8):
    """``LlavaProcessor`` of the tiny model: the shipped tokenizer and a CLIP image processor.

    The PIL-backed CLIP processor, as for real LLaVA-1.5 checkpoints (:func:`load_llava`).
    """
    from transformers import AutoTokenizer, LlavaProcessor

    from .llava import clip_image_processor_pil

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    image_processor = clip_image_processor_pil()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=(TOKENIZER_DIR / "chat_template.jinja").read_text(),
    )


def tiny_llava_config(spec: TinyLlavaSpec, tokenizer):
    """The ``LlavaConfig`` of ``spec``, with token ids taken from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_tiny_llava(seed: int = 0, **overrides):
    """``(model, processor)``: a random-init ``LlavaForConditionalGeneration`` and its processor.

    ``overrides`` are :class:`TinyLlavaSpec` fields.  The weights depend on ``seed`` only: the
    global RNG is left as it was.  The model goes through :func:`symmpo_fast.models.llava.prepare`,
    the same step :func:`symmpo_fast.models.load_llava` applies to real checkpoints.
    """
    from transformers import LlavaForConditionalGeneration

    from .llava import attn_implementations, prepare

    unknown = set(overrides) - {f.name for f in dataclasses.fields(TinyLlavaSpec)}
    if unknown:
        raise TypeError(f"build_tiny_llava got unknown overrides {sorted(unknown)}; "
                        f"fields are {[f.name for f in dataclasses.fields(TinyLlavaSpec)]}")
    spec = dataclasses.replace(TinyLlavaSpec(), **overrides)
    processor = load_processor(spec.image_size, spec.patch_size)
    config = tiny_llava_config(spec, processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementations(spec.attn_implementation), dtype=spec.dtype)
    return prepare(model), processor
